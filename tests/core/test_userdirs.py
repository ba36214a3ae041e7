"""The per-user cache folder: $SKINSCREEN_CACHE wins, else the platform's user cache folder."""
from __future__ import annotations

import sys
from pathlib import Path

import platformdirs

from core import userdirs


def test_environment_variable_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("SKINSCREEN_CACHE", str(tmp_path / "mine"))
    assert userdirs.cache_dir("embeddings") == tmp_path / "mine" / "embeddings"


def test_platform_default_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("SKINSCREEN_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # never the real home, whatever the platform reads
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    got = userdirs.cache_dir("embeddings")
    assert got == Path(platformdirs.user_cache_dir("skinscreen", appauthor=False)) / "embeddings"
    if sys.platform.startswith("linux"):
        assert got == tmp_path / "xdg" / "skinscreen" / "embeddings"
    assert not got.exists()  # resolving a folder creates nothing


def test_writable_says_why_not(tmp_path):
    assert userdirs.writable(tmp_path / "new" / "deep") is None and (tmp_path / "new" / "deep").is_dir()
    assert list((tmp_path / "new" / "deep").iterdir()) == []  # the probe is removed
    (tmp_path / "f").write_text("x")
    assert "Error" in userdirs.writable(tmp_path / "f" / "sub")
