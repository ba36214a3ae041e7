"""Tests for core.runfolder: the one module that writes and reads a run folder (status, log, metrics, checkpoint,
stop requests, launch record)."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from core import runfolder
from core.runfolder import RunFolder


def test_status_merges_stamps_and_drops_an_old_error(tmp_path):
    assert runfolder.read_status(tmp_path) == {}
    runfolder.update_status(tmp_path, state="failed", error="OSError: disk full", stage=1)
    first = runfolder.read_status(tmp_path)
    assert first["state"] == "failed" and first["error"] == "OSError: disk full" and first["pid"] == os.getpid()
    runfolder.update_status(tmp_path, state="running", epoch=3)  # a resume: the old failure must not linger
    status = runfolder.read_status(tmp_path)
    assert status["stage"] == 1 and status["epoch"] == 3 and "error" not in status
    assert status["updated"] >= first["updated"]
    (tmp_path / runfolder.STATUS).write_text('{"state": "runn')  # half-written by some other tool
    assert runfolder.read_status(tmp_path) == {}


def test_log_append_and_tail(tmp_path):
    for i in range(100):
        runfolder.append_log(tmp_path, f"line {i}")
    assert runfolder.log_tail(tmp_path, lines=3) == "line 97\nline 98\nline 99"
    assert runfolder.log_tail(tmp_path, lines=2, max_bytes=20) == "line 98\nline 99"
    assert runfolder.log_tail(tmp_path, runfolder.CONSOLE) == ""


def test_metrics_round_trip_with_step_across_stages(tmp_path):
    assert runfolder.read_metrics(tmp_path).empty
    rows = [{"stage": 0, "epoch": 0, "train_loss": 1.0, "val_roc_auc": 0.5},
            {"stage": 1, "epoch": 0, "train_loss": 0.8, "val_roc_auc": None},
            {"stage": 1, "epoch": 1, "train_loss": np.float64(0.7), "val_roc_auc": 0.6}]
    runfolder.write_metrics(tmp_path, rows)
    df = runfolder.read_metrics(tmp_path)
    assert df["step"].tolist() == [1, 2, 3] and df["train_loss"].tolist() == [1.0, 0.8, 0.7]
    assert np.isnan(df.loc[1, "val_roc_auc"])
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    state = {"stage": 1, "epoch": 2, "best_score": [float("-inf"), 0.5], "history": [{"epoch": np.int64(0)}]}
    runfolder.save_checkpoint(tmp_path, model.state_dict(), opt.state_dict(), {}, state)
    blob = runfolder.load_checkpoint(tmp_path)
    assert blob["state"] == {**state, "history": [{"epoch": 0}]}
    assert torch.equal(blob["model"]["weight"], model.weight.detach())
    assert blob["optimizer"]["state"][0]["step"] == 1
    assert runfolder.load_checkpoint(tmp_path / "none") is None
    # a checkpoint that carries code is refused, not executed
    torch.save({"model": {}, "state": "{}", "evil": print}, tmp_path / runfolder.CHECKPOINT)
    with pytest.raises(runfolder.CheckpointError, match="refused, it holds more than tensors.*[Ww]eights only"):
        runfolder.load_checkpoint(tmp_path)
    # a file cut short (a damaged disk; writes are atomic, so a kill cannot do it) says so and what to do
    runfolder.save_checkpoint(tmp_path, model.state_dict(), opt.state_dict(), {}, state)
    data = (tmp_path / runfolder.CHECKPOINT).read_bytes()
    (tmp_path / runfolder.CHECKPOINT).write_bytes(data[: len(data) // 2])
    with pytest.raises(runfolder.CheckpointError, match="damaged, it cannot be resumed .*start the run again"):
        runfolder.load_checkpoint(tmp_path)


def test_stop_request_set_seen_and_cleared(tmp_path):
    assert not runfolder.stop_requested(tmp_path)
    runfolder.request_stop(tmp_path, by="test")
    assert runfolder.stop_requested(tmp_path)
    assert json.loads((tmp_path / runfolder.STOP).read_text())["by"] == "test"
    runfolder.clear_stop(tmp_path, older_than=time.time() - 3600)  # made after that: kept
    assert runfolder.stop_requested(tmp_path)
    runfolder.clear_stop(tmp_path, older_than=time.time() + 1)     # made before: stale, removed
    assert not runfolder.stop_requested(tmp_path)
    runfolder.request_stop(tmp_path)
    runfolder.clear_stop(tmp_path)
    assert not runfolder.stop_requested(tmp_path)
    runfolder.clear_stop(tmp_path)  # nothing to clear: no error


def test_run_folder_handle_writes_only_on_the_main_rank(tmp_path):
    main, other = RunFolder(tmp_path / "run"), RunFolder(tmp_path / "run", is_main=False)
    assert (tmp_path / "run" / runfolder.SPLITS).is_dir()
    other.log("from rank 1")
    other.status(state="running")
    other.write_metrics([{"stage": 0, "epoch": 0}])
    assert not (tmp_path / "run" / runfolder.LOG).exists() and runfolder.read_status(main.out) == {}
    main.log("from rank 0")
    main.status(state="running")
    assert "from rank 0" in runfolder.log_tail(main.out) and runfolder.read_status(main.out)["state"] == "running"
    runfolder.request_stop(main.out)
    other.clear_stop()
    assert other.stop_requested()  # only rank 0 clears
    main.clear_stop()
    assert not other.stop_requested()
    assert main.best_path(1).name == "best_stage1.safetensors"
    assert main.split_path(0, "head") == tmp_path / "run" / "splits" / "0_head.csv"


def test_markers_launch_record_and_bundle(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    assert not runfolder.is_run_folder(run) and not runfolder.has_bundle(run) and not runfolder.has_checkpoint(run)
    runfolder.write_launch(run, {"pid": 1, "create_time": 12.5})
    assert runfolder.is_run_folder(run) and runfolder.read_launch(run) == {"pid": 1, "create_time": 12.5}
    assert runfolder.read_launch(tmp_path) == {}
    (run / "bundle").mkdir()
    (run / "bundle" / "model.json").write_text("{}")
    assert runfolder.has_bundle(run)
    hidden = tmp_path / ".hidden"
    hidden.mkdir()
    (hidden / runfolder.STATUS).write_text("{}")
    assert not runfolder.is_run_folder(hidden)


def test_the_trainer_names_run_folder_files_through_this_module():
    """core.training writes bundle/, splits/ and the reports: by this module's names, never its own spelling."""
    import re
    from pathlib import Path
    source = (Path(__file__).resolve().parents[2] / "core" / "training.py").read_text()
    assert re.findall(r"""["'](bundle|splits|val_report\.json|test_report\.json)["']""", source) == []


def test_a_fold_run_mirrors_its_log_and_progress_into_its_parent_and_obeys_the_parents_stop(tmp_path):
    top = tmp_path / "cv"
    fold = RunFolder(runfolder.fold_path(top, 2), parent=top)
    assert fold.out == top / "folds" / "fold_2"
    runfolder.update_status(top, state="running", cv={"folds": 5, "fold": 2, "done": [0, 1]})
    fold.status(state="finished", stage=1, stage_name="finetune", epoch=3, epochs=8)
    assert runfolder.read_status(fold.out)["state"] == "finished"
    parent = runfolder.read_status(top)
    assert parent["state"] == "running" and parent["cv"]["fold"] == 2  # the fold's own state stays its own
    assert (parent["stage_name"], parent["epoch"], parent["epochs"]) == ("finetune", 3, 8)
    fold.log("stage 1 epoch 3: done")
    assert "stage 1 epoch 3: done" in runfolder.log_tail(fold.out)
    assert "[fold_2] stage 1 epoch 3: done" in runfolder.log_tail(top)
    assert fold.stop_folder() is None
    runfolder.request_stop(top)
    assert fold.stop_requested() and fold.stop_folder() == top
    fold.clear_stop()  # the fold clears its own requests; the top one is the cross-validation's to clear
    assert runfolder.stop_requested(top)


def test_a_cross_validation_holds_a_resumable_run_without_a_checkpoint(tmp_path):
    import pandas as pd
    run = tmp_path / "cv"
    run.mkdir()
    assert not runfolder.holds_run(run) and not runfolder.is_cv_run(run)
    folds = pd.DataFrame({"image": ["/a.png", "/b.png"], "label": [0, 1], "patient_id": ["007", "8"],
                          "split": ["train", "test"], "fold": [0, -1], "extra": [1, 2]})
    runfolder.write_folds(run, folds)
    assert runfolder.holds_run(run) and runfolder.is_cv_run(run) and not runfolder.has_checkpoint(run)
    back = runfolder.read_folds(run)
    assert list(back.columns) == ["image", "label", "patient_id", "split", "fold"]
    assert back["patient_id"].tolist() == ["007", "8"]  # ids stay text
    assert runfolder.read_fold_metrics(run).empty
    for k in (0, 1):
        runfolder.write_metrics(runfolder.fold_path(run, k), [{"stage": 0, "epoch": e} for e in range(k + 1)])
    m = runfolder.read_fold_metrics(run)
    assert m["fold"].tolist() == [0, 1, 1] and m["step"].tolist() == [1, 1, 2]


def test_a_cut_best_epoch_file_is_a_checkpoint_error_naming_it(tmp_path):
    """A resume reading a damaged best_stage0.safetensors stopped with a SafetensorError traceback."""
    import torch
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(64)}, str(runfolder.best_path(tmp_path, 0)))
    assert runfolder.load_best(tmp_path, 0)["w"].shape == (64,)
    data = runfolder.best_path(tmp_path, 0).read_bytes()
    runfolder.best_path(tmp_path, 0).write_bytes(data[: len(data) // 2])
    with pytest.raises(runfolder.CheckpointError, match=r"best_stage0.safetensors: damaged or missing"):
        runfolder.load_best(tmp_path, 0)
    with pytest.raises(runfolder.CheckpointError, match=r"best_stage1.safetensors: damaged or missing"):
        runfolder.load_best(tmp_path, 1)
