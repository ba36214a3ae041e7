"""Atomic file writes and tolerant JSON reads: the one place a half-written file is prevented."""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; a written file should get the permissions any new file would
# (a run folder on a shared filesystem is read by colleagues and by the app under another account).
_FILE_MODE = 0o666 & ~_umask()
_WINDOWS = os.name == "nt"
_REPLACE_WAITS = (0.05, 0.1, 0.2, 0.4, 0.8)  # seconds, then one last try that raises


class UnwritableError(ValueError):
    """An output path that cannot be written, found before the work that would fill it."""


def check_writable(path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Fail before the work, not after it: `path` can be written (its folder created if need be), tried by
    creating and removing a file beside it, which also catches what permission bits do not (a read-only mount,
    a folder in the way, a full quota); and it is none of the command's `inputs` (a photo, the manifest), which
    the output would replace."""
    path = Path(path)
    if path.is_dir():
        raise UnwritableError(f"{path}: is a folder; give the name of the file to write")
    if (same := _same_as_input(path, inputs)) is not None:
        raise UnwritableError(f"{path}: is an input of this command ({same}); writing the output there would replace "
                              "it. Give another output file")
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        raise UnwritableError(f"{path}: {existing} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".check")
        os.close(fd)
        os.unlink(tmp)
        if _WINDOWS and path.is_file():  # a file open in Excel there cannot be replaced: found now, not at the end
            open(path, "ab").close()
    except OSError as e:
        held = " (is it open in another program?)" if isinstance(e, PermissionError) and _WINDOWS else ""
        raise UnwritableError(f"{path}: cannot be written ({e.strerror or e}){held}") from None
    return path


def _same_as_input(path: Path, inputs: Iterable[str | Path]) -> str | None:
    """The input `path` names (symlinks followed; case-blind where the file system is), or None."""
    key = lambda p: os.path.normcase(str(Path(p).resolve()))  # noqa: E731
    target = key(path)
    return next((str(p) for p in inputs if p is not None and key(p) == target), None)


def portable_path(path: str | Path, base: str | Path) -> str:
    """`path` as a file written for other machines names it: relative to `base` with '/' separators (a manifest
    made on Windows opens on macOS and Linux, and Windows reads '/'), or absolute where no relative path exists
    (on Windows, another drive or a network share)."""
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # ntpath.relpath: "path is on mount 'D:', start on mount 'C:'"
        return Path(path).as_posix()


def native_path(written: str) -> str:
    """A path as a file wrote it, for this OS: '\\' from a file written on Windows is a separator here too (no one
    names a photo with a backslash)."""
    return written.replace("\\", "/") if os.sep == "/" else written


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary file beside path, then rename it into place.

    os.replace is atomic on Linux, macOS and Windows: readers (another session, a DataLoader worker,
    a resumed run) see either the old file or the whole new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _FILE_MODE)  # after writing: a writer may put its own new file there (safetensors does)
        _replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _replace(tmp: str, path: Path) -> None:
    """os.replace, retried a moment on Windows: there a file another program holds open (a virus scanner, a
    sync client, the app reading status.json) cannot be replaced until it lets go."""
    for wait in _REPLACE_WAITS if _WINDOWS else ():
        try:
            return os.replace(tmp, path)
        except PermissionError:
            time.sleep(wait)
    os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def to_jsonable(o: Any) -> Any:
    """json.dumps default=: tuples/sets as lists, paths as strings, numpy/torch scalars as numbers."""
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def report_data(report: Any) -> Any:
    """A report as strict JSON data: numpy numbers as numbers, NaN and infinities as null (an undefined value;
    a bare NaN token is refused by strict JSON readers such as browsers and R's jsonlite), anything else as text."""
    return _finite(json.loads(json.dumps(report, default=_report_default)))


def _report_default(o: Any) -> Any:
    try:
        return to_jsonable(o)
    except TypeError:
        return str(o)


def _finite(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    return None if isinstance(o, float) and not math.isfinite(o) else o


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=to_jsonable))


def read_json_or_none(path: str | Path) -> Any | None:
    """The parsed file, or None when it is missing, unreadable or not valid JSON (e.g. mid-write by an old tool)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
