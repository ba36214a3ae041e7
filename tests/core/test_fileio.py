"""Atomic writes leave the old file intact on failure; tolerant JSON reads."""
import json
import os

import numpy as np
import pytest

from core.fileio import atomic_write, atomic_write_json, portable_path, read_json_or_none


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"v": 1})

    def boom(tmp):
        tmp.write_text("{half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert json.loads(p.read_text()) == {"v": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind


def test_atomic_write_json_numpy_and_tuples(tmp_path):
    p = atomic_write_json(tmp_path / "sub" / "b.json", {"x": np.float32(0.5), "t": (1, 2), "a": np.arange(2)})
    assert json.loads(p.read_text()) == {"x": 0.5, "t": [1, 2], "a": [0, 1]}


def test_read_json_or_none(tmp_path):
    assert read_json_or_none(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert read_json_or_none(tmp_path / "bad.json") is None
    (tmp_path / "ok.json").write_text('{"k": [1]}')
    assert read_json_or_none(tmp_path / "ok.json") == {"k": [1]}


def test_written_files_get_the_usual_permissions_not_owner_only(tmp_path):
    # a fresh interpreter under umask 022 (the mode is read at import; reloading the module here would give the
    # other tests' imported names stale exception classes)
    import subprocess
    import sys
    code = ("import os, sys; os.umask(0o022); from core.fileio import atomic_write_json; "
            "print(oct(atomic_write_json(sys.argv[1], {}).stat().st_mode & 0o777))")
    from core.appstate import PROJECT_ROOT
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.json")], cwd=PROJECT_ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "0o644"


def test_report_data_makes_reports_strict_json_undefined_values_null():
    import json
    from pathlib import Path

    import numpy as np

    from core.fileio import report_data
    report = {"auc": np.float32(0.75), "n": np.int64(3), "ece": float("nan"),
              "rows": [{"fitzpatrick": np.float64("nan"), "score": float("-inf")}], "image": Path("a/b.jpg")}
    out = report_data(report)
    assert out == {"auc": 0.75, "n": 3, "ece": None, "rows": [{"fitzpatrick": None, "score": None}], "image": "a/b.jpg"}
    json.dumps(out, allow_nan=False)  # raises on any NaN or infinity left


def test_check_writable_finds_what_would_fail_after_the_work(tmp_path, monkeypatch):
    """Checked before scoring starts: a folder in the way, a file where a folder should be, a refusal to create
    files (root passes permission bits, so the refusal is simulated; a read-only mount refuses the same way)."""
    import tempfile

    from core.fileio import UnwritableError, check_writable
    assert check_writable(tmp_path / "new" / "deeper" / "out.csv") == tmp_path / "new" / "deeper" / "out.csv"
    assert (tmp_path / "new" / "deeper").is_dir() and not list((tmp_path / "new" / "deeper").iterdir())
    with pytest.raises(UnwritableError, match="is a folder; give the name of the file to write"):
        check_writable(tmp_path / "new")
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(UnwritableError, match=r"photo.jpg is a file, not a folder"):
        check_writable(tmp_path / "photo.jpg" / "sub" / "out.csv")

    def refuse(**kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(UnwritableError, match=r"out.csv: cannot be written \(Permission denied\)"):
        check_writable(tmp_path / "out.csv")


def test_portable_path_is_relative_with_slashes_or_absolute_across_drives(tmp_path, monkeypatch):
    assert portable_path(tmp_path / "photos" / "a.jpg", tmp_path / "manifests") == "../photos/a.jpg"

    def other_drive(path, start):  # what ntpath.relpath does for D:\\photos\\a.jpg from C:\\project
        raise ValueError("path is on mount 'D:', start on mount 'C:'")
    monkeypatch.setattr("core.fileio.os.path.relpath", other_drive)
    assert portable_path(tmp_path / "photos" / "a.jpg", tmp_path) == (tmp_path / "photos" / "a.jpg").as_posix()


def test_on_windows_a_file_held_open_a_moment_is_replaced_once_it_is_let_go(tmp_path, monkeypatch):
    """Windows refuses to replace a file another program holds open (PermissionError); a scanner or the app's
    status read lets go within moments, Excel does not: the write is retried a moment, then the error is raised."""
    import core.fileio as fileio
    real, calls = os.replace, []

    def held(src, dst, times):
        calls.append(dst)
        if len(calls) <= times:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        real(src, dst)
    monkeypatch.setattr(fileio, "_WINDOWS", True)
    monkeypatch.setattr(fileio, "_REPLACE_WAITS", (0.001,) * 5)
    monkeypatch.setattr(fileio.os, "replace", lambda s, d: held(s, d, 2))
    atomic_write_json(tmp_path / "status.json", {"v": 2})
    assert json.loads((tmp_path / "status.json").read_text()) == {"v": 2} and len(calls) == 3
    calls.clear()
    monkeypatch.setattr(fileio.os, "replace", lambda s, d: held(s, d, 99))
    with pytest.raises(PermissionError):
        atomic_write_json(tmp_path / "status.json", {"v": 3})
    assert len(calls) == 6 and json.loads((tmp_path / "status.json").read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary file left behind
    monkeypatch.setattr(fileio, "_WINDOWS", False)  # elsewhere a PermissionError is a real one: no retry
    calls.clear()
    with pytest.raises(PermissionError):
        atomic_write_json(tmp_path / "status.json", {"v": 4})
    assert len(calls) == 1


def test_a_metrics_file_held_open_does_not_stop_the_training(tmp_path, monkeypatch):
    from core import runfolder

    def held(run, rows):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(runfolder, "write_metrics", held)
    rf = runfolder.RunFolder(tmp_path)
    rf.write_metrics([{"epoch": 0}])
    assert "metrics.csv could not be written (Permission denied; is it open in another program?)" in \
        runfolder.log_tail(tmp_path)


def test_a_written_file_gets_the_permissions_of_any_new_file_whoever_wrote_it(tmp_path):
    """safetensors writes its own temporary file and renames it over ours: the bundle came out owner-only (0600),
    unreadable by a colleague or by the app under another account."""
    import stat

    import torch
    from safetensors.torch import save_file

    from core.fileio import _FILE_MODE
    atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    atomic_write(tmp_path / "t.txt", lambda tmp: tmp.write_text("x", encoding="utf-8"))
    assert [stat.S_IMODE(os.stat(tmp_path / n).st_mode) for n in ("w.safetensors", "t.txt")] == [_FILE_MODE] * 2
