"""Where per-user caches live: $SKINSCREEN_CACHE, else the platform's user cache folder (via platformdirs)."""
from __future__ import annotations

import os
from pathlib import Path

ENV = "SKINSCREEN_CACHE"
APP = "skinscreen"


def cache_root() -> Path:
    """$SKINSCREEN_CACHE when set, else ~/.cache/skinscreen on Linux (or $XDG_CACHE_HOME/skinscreen),
    ~/Library/Caches/skinscreen on macOS, %LOCALAPPDATA%\\skinscreen\\Cache on Windows."""
    env = os.environ.get(ENV, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs
    return Path(platformdirs.user_cache_dir(APP, appauthor=False))


def cache_dir(kind: str) -> Path:
    """The folder for one kind of cache (e.g. 'embeddings'); not created here."""
    return cache_root() / kind


def writable(folder: Path) -> str | None:
    """None when `folder` can be created and written to, else why not (a cache must never stop a command)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None
