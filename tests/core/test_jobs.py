"""Tests for core.jobs: the one-job lock, launching, stopping (through the run folder's stop request) and resuming
real (tiny, random-weight, CPU) training subprocesses, process identity through psutil, run states from folders."""
from __future__ import annotations

import json
import os
from dataclasses import replace
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from PIL import Image

from core import appstate, jobs, reports, runfolder
from core.jobs import TrainRequest, TrainingBusy
from core.manifest import write_manifest


# ------------------------------------------------------------------ helpers
def synthetic_dataset(folder: Path, n: int = 24, size: int = 48) -> Path:
    """n small images, one patient each, alternating labels (malignant ones darker), and a manifest."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = i % 2
        base = 90 if label else 180
        arr = np.clip(rng.normal(base, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img{i:02d}.jpg"
        Image.fromarray(arr).save(path)
        rows.append({"image": str(path), "label": label, "patient_id": f"p{i}"})
    return write_manifest(pd.DataFrame(rows), folder / "manifest.csv")


def tiny_recipe(path: Path, manifest: Path, epochs: int) -> Path:
    recipe = {"name": "tiny", "backbone": "mobilenetv2_100", "weights": "none", "input_size": 64,
              "num_workers": 0, "n_boot": 10, "device": "cpu", "channels_last": False,
              "split": {"val": 0.25, "test": 0.0, "seed": 0},
              "threshold": {"rule": "sensitivity", "target": 0.9},
              "stages": [{"name": "only", "data": [{"manifest": str(manifest), "domain": "synthetic"}],
                          "epochs": epochs, "lr": 1e-3, "batch_size": 8, "augment": "smartphone"}]}
    path.write_text(yaml.safe_dump(recipe))
    return path


def wait_epochs(run: Path, n: int, timeout: float = 90.0) -> None:
    """Wait until n epochs are in metrics.csv (and so in the checkpoint, written just before)."""
    deadline = time.time() + timeout
    while len(runfolder.read_metrics(run)) < n:
        assert time.time() < deadline, runfolder.log_tail(run, runfolder.CONSOLE, 40)
        time.sleep(0.2)


def wait_state(run: Path, states: set[str], timeout: float = 60.0) -> jobs.RunInfo:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = jobs.run_info(run)
        if info.state in states:
            return info
        time.sleep(0.2)
    raise AssertionError(f"{run.name} never reached {states}: {jobs.run_info(run)}\n"
                         f"{runfolder.log_tail(run, runfolder.CONSOLE, 40)}")


# ------------------------------------------------------------------ real training subprocesses
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_launch_finish_second_job_refused_stop_and_resume(tmp_path):
    root = tmp_path / "runs"
    manifest = synthetic_dataset(tmp_path / "data")
    short = tiny_recipe(tmp_path / "short.yaml", manifest, epochs=1)
    long = tiny_recipe(tmp_path / "long.yaml", manifest, epochs=500)

    # 1. a one-epoch run goes starting/running -> finished, leaves a bundle, and frees the lock
    rec = jobs.start_training(TrainRequest(recipe=str(short), name="short", device="cpu"), root)
    assert jobs.read_lock(root)["pid"] == rec["pid"] and rec["device"] == "cpu"
    assert jobs.run_info(root / "short").state in ("starting", "running", "finished", "stopping")
    with pytest.raises(TrainingBusy, match="already running: run 'short'"):
        jobs.start_training(TrainRequest(recipe=str(short), name="second", device="cpu"), root)
    assert not (root / "second").exists()
    assert jobs.wait_for(root / "short", timeout=90)
    info = jobs.run_info(root / "short")
    assert info.state == "finished", runfolder.log_tail(root / "short", runfolder.CONSOLE, 40)
    assert info.has_bundle and not info.alive
    assert jobs.current_job(root) is None and not (root / jobs.LOCK_NAME).exists()  # stale lock cleared
    assert [b.label for b in appstate.list_bundles(root)] == ["short"]
    assert len(runfolder.read_metrics(root / "short")) == 1
    assert "val_report.json" in [p.name for p in reports.find_reports(root)]

    # 2. a long run is stopped through a stop request in its folder (no signal: the same on every OS); it stops
    # at a step boundary with status 'stopped', resumable, the request consumed and the lock free
    rec = jobs.start_training(TrainRequest(recipe=str(long), name="long", device="cpu"), root)
    run = root / "long"
    assert rec["create_time"] == psutil.Process(rec["pid"]).create_time()
    wait_epochs(run, 1)
    assert jobs.run_info(run).state == "running"
    assert "asked long to stop" in jobs.stop_training(run)
    assert jobs.run_info(run).state in ("stopping", "stopped")
    assert jobs.wait_for(run, timeout=30)
    info = jobs.run_info(run)
    assert info.state == "stopped" and info.resumable, runfolder.log_tail(run, runfolder.CONSOLE, 40)
    assert "stopped on request (stop requested in the run folder" in runfolder.log_tail(run)
    assert not runfolder.stop_requested(run)
    assert jobs.current_job(root) is None
    assert "not running" in jobs.stop_training(run)
    states = {r.name: r.state for r in jobs.list_runs(root)}
    assert states == {"short": "finished", "long": "stopped"}
    done = len(runfolder.read_metrics(run))

    # 3. resumed, it continues after its last finished epoch (a stale stop request does not stop it); a forced
    # stop kills it and its children: 'interrupted', still resumable from its checkpoint
    runfolder.request_stop(run)  # e.g. a second click that came too late: the launch clears it
    with pytest.raises(jobs.LaunchError, match="no checkpoint"):
        jobs.resume_training(root / "short_no_ckpt", root)
    rec = jobs.resume_training(run, root)
    assert rec["device"] == "cpu" and jobs.read_lock(root)["pid"] == rec["pid"]
    wait_epochs(run, done + 1)
    m = runfolder.read_metrics(run)
    assert m["epoch"].tolist()[:done + 1] == list(range(done + 1))  # no epoch repeated or skipped
    assert "resuming: stage 0, after epoch" in runfolder.log_tail(run, lines=200)
    assert "killed long" in jobs.stop_training(run, force=True)
    assert not psutil.pid_exists(rec["pid"]) or psutil.Process(rec["pid"]).status() == psutil.STATUS_ZOMBIE
    info = jobs.run_info(run)
    assert info.state == "interrupted" and info.resumable and not info.alive
    assert jobs.current_job(root) is None


def test_name_and_recipe_checks(tmp_path):
    root = tmp_path / "runs"
    (root / "taken").mkdir(parents=True)
    (root / "taken" / "x").write_text("")
    recipe = str(jobs.list_recipes()[0])
    with pytest.raises(jobs.LaunchError, match="run name"):
        jobs.start_training(TrainRequest(recipe=recipe, name="../evil"), root)
    with pytest.raises(jobs.LaunchError, match="already exists"):
        jobs.start_training(TrainRequest(recipe=recipe, name="taken"), root)
    with pytest.raises(jobs.LaunchError, match="recipe not found"):
        jobs.start_training(TrainRequest(recipe=str(tmp_path / "nope.yaml"), name="ok"), root)
    assert jobs.current_job(root) is None


@pytest.mark.parametrize("name, why", [("run.", "not ending in '.'"), ("con", "device name on Windows"),
                                       ("NUL.v2", "device name on Windows"), ("com1", "device name on Windows"),
                                       ("x" * 81, "max 80"), ("", "starting with a letter")])
def test_run_names_a_windows_laptop_cannot_make_are_refused(tmp_path, name, why):
    """Windows drops a trailing '.' (the folder would not match the run's name) and reserves device names."""
    said = jobs.request_problems(TrainRequest(recipe=str(jobs.list_recipes()[0]), name=name), tmp_path)
    assert len(said) == 1 and why in said[0]


@pytest.mark.parametrize("name", ["a", "run.v2", "console", "com10", "lpt_1", "x" * 80, "demo-1_b"])
def test_ordinary_run_names_pass(tmp_path, name):
    assert jobs.request_problems(TrainRequest(recipe=str(jobs.list_recipes()[0]), name=name), tmp_path) == []


def test_a_run_that_would_fail_on_its_inputs_is_refused_with_every_reason_before_it_starts(tmp_path):
    """train.fit --check builds the config as the run will: a bad learning rate, a manifest and a weights file that
    do not exist, and a run to start from that is not one are said at once, and nothing is launched."""
    root = tmp_path / "runs"
    manifest = synthetic_dataset(tmp_path / "data")
    recipe = str(tiny_recipe(tmp_path / "r.yaml", manifest, epochs=1))
    with pytest.raises(jobs.LaunchError, match=r"learning rate 'fast' is not a number"):
        jobs.parse_lr("fast")
    with pytest.raises(jobs.LaunchError, match=r"learning rate -5 must be a positive number"):
        jobs.parse_lr("-5")
    assert jobs.parse_lr(" ") is None and jobs.parse_lr(None) is None and jobs.parse_lr("1e-4") == 1e-4
    for bad in (-5.0, 0.0, float("nan")):  # numbers through the Python API are checked the same way
        with pytest.raises(jobs.LaunchError, match="must be a positive number"):
            jobs.parse_lr(bad)
    with pytest.raises(jobs.LaunchError) as refused:
        jobs.start_training(TrainRequest(recipe=recipe, name="bad", manifest=str(tmp_path / "gone.csv"),
                                         weights=str(tmp_path / "gone.safetensors"), device="cpu"), root)
    said = str(refused.value)
    assert f"data manifest not found: {tmp_path / 'gone.csv'}" in said
    assert f"weights file not found: {tmp_path / 'gone.safetensors'}" in said
    with pytest.raises(jobs.LaunchError) as refused:  # the form's own mistakes, all at once
        jobs.start_training(TrainRequest(recipe=recipe, name="my run!", lr="fast", folds=1), root)
    said = str(refused.value)
    assert "run name 'my run!'" in said and "learning rate 'fast' is not a number" in said and "not 1" in said
    with pytest.raises(jobs.LaunchError, match=r"init_from .*elsewhere: .*not found"):
        jobs.start_training(TrainRequest(recipe=recipe, name="bad", init_from=str(tmp_path / "elsewhere"),
                                         device="cpu"), root)
    with pytest.raises(jobs.LaunchError, match=r"'mobilenetv2_100_tflite' has no downloadable ImageNet weights"):
        jobs.start_training(TrainRequest(recipe=recipe, name="bad", backbone="mobilenetv2_100_tflite",
                                         weights="imagenet", device="cpu"), root)  # found before, not in the run
    assert not (root / "bad").exists() and jobs.current_job(root) is None


def test_training_command_overrides():
    recipe = jobs.RECIPES_DIR / "paper_transfer.yaml"  # two stages
    req = TrainRequest(recipe=str(recipe), name="x", backbone="resnet18", weights="none", init_from="runs/a",
                       epochs=3, lr=2e-4, device="cpu", manifest="/d/m.csv", domain="midas")
    cmd = jobs.training_command(req, "/r/x", python="py")
    assert cmd[:8] == ["py", "-m", "train.fit", "--config", str(recipe), "--out", "/r/x", "--name"]
    joined = " ".join(cmd)
    for part in ("--device cpu", "--backbone resnet18", "--init-from runs/a", "--epochs 3",
                 "stages.0.lr=0.0002", "stages.1.lr=0.0002",
                 'stages.1.data=[{"manifest": "/d/m.csv", "domain": "midas"}]'):
        assert part in joined
    assert "--weights" not in cmd  # the initial run's bundle fixes the weights
    no_parent = jobs.training_command(replace(req, init_from=None), "/r/x", python="py")
    assert no_parent[no_parent.index("--weights") + 1] == "none"
    # the data override parses as the YAML the trainer's --set reads
    from core.config import apply_override
    raw = yaml.safe_load(recipe.read_text())
    apply_override(raw, cmd[cmd.index('stages.0.data=[{"manifest": "/d/m.csv", "domain": "midas"}]')])
    assert raw["stages"][0]["data"] == [{"manifest": "/d/m.csv", "domain": "midas"}]
    assert "--device" not in jobs.training_command(TrainRequest(recipe=str(recipe), name="x"), "/o")


def test_folds_reach_the_command_and_the_recipe_summary_and_one_fold_is_refused(tmp_path):
    recipe = jobs.RECIPES_DIR / "shared_demo_cv.yaml"
    assert jobs.recipe_summary(recipe)["folds"] == 5
    assert jobs.recipe_summary(jobs.RECIPES_DIR / "shared_demo.yaml")["folds"] == 0
    cmd = jobs.training_command(TrainRequest(recipe=str(recipe), name="x", folds=3), "/o", python="py")
    assert cmd[cmd.index("--folds") + 1] == "3"
    assert "--folds" not in jobs.training_command(TrainRequest(recipe=str(recipe), name="x"), "/o")
    no_cv = jobs.training_command(TrainRequest(recipe=str(recipe), name="x", folds=0), "/o")
    assert no_cv[no_cv.index("--folds") + 1] == "0"  # 0 turns a recipe's cross-validation off
    with pytest.raises(jobs.LaunchError, match="folds must be 0 .* or at least 2, not 1"):
        jobs.start_training(TrainRequest(recipe=str(recipe), name="one", folds=1), tmp_path / "runs")


def test_a_cross_validation_run_shows_its_fold_and_resumes_without_a_top_checkpoint(tmp_path):
    run = tmp_path / "cv"
    run.mkdir()
    (run / runfolder.FOLDS).write_text("image,label,split,fold\n/a.png,0,train,0\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": dead.pid, "updated": time.time(),
                                                 "cv": {"folds": 5, "fold": 2, "done": [0, 1]},
                                                 "stage": 1, "stage_name": "finetune", "epoch": 3, "epochs": 8}))
    info = jobs.run_info(run)
    assert info.state == "interrupted" and info.resumable  # the fold runs hold the checkpoints
    assert info.progress() == "fold 3/5, stage finetune, epoch 4/8"
    assert jobs.runs_table([info]).loc[0, "stage"] == "fold 3/5: finetune"
    info.cv = {"folds": 5, "fold": None, "done": [0, 1, 2, 3, 4]}
    info.stage = info.stage_name = info.epoch = None
    assert info.progress() == "5 of 5 folds done"


# ------------------------------------------------------------------ lock
def test_lock_held_by_live_process_refuses_and_stale_lock_is_cleared(tmp_path):
    root = tmp_path / "runs"
    me = {"pid": os.getpid(), "create_time": psutil.Process().create_time(), "run": "busy", "device": "cuda",
          "started": time.time()}
    jobs.acquire_lock(root, me)
    with pytest.raises(TrainingBusy, match="run 'busy' on device 'cuda'"):
        jobs.acquire_lock(root, {**me, "run": "other"})
    assert jobs.current_job(root)["run"] == "busy"
    # the same pid with another creation time is a reused pid: stale
    jobs._write_lock(root, {**me, "create_time": me["create_time"] - 100})
    assert jobs.current_job(root) is None and not (root / jobs.LOCK_NAME).exists()
    # a dead pid: stale, and a new job may take the lock
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    jobs._write_lock(root, {**me, "pid": dead.pid, "create_time": None})
    assert jobs.acquire_lock(root, {**me, "run": "new"})["run"] == "new"
    jobs.release_lock(root, pid=12345)  # not the holder: kept
    assert jobs.read_lock(root)["run"] == "new"
    jobs.release_lock(root)
    assert jobs.read_lock(root) is None


def test_run_states_from_folders(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("name: r\n")
    assert jobs.run_info(run).state == "unknown"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": dead.pid, "stage": 0, "epoch": 2,
                                                 "epochs": 5, "updated": time.time()}))
    (run / "checkpoint.pt").write_bytes(b"x")
    info = jobs.run_info(run)
    assert info.state == "interrupted" and info.resumable and info.epoch == 2
    # a live pid in status.json counts only if it runs train.fit (else it is a reused pid)
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid(), "updated": 1}))
    assert jobs.run_info(run).state == "interrupted"
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train.fit"])
    try:
        (run / "status.json").write_text(json.dumps({"state": "running", "pid": trainer.pid, "updated": 1}))
        assert jobs.run_info(run).state == "running"
        # stopped, then resumed by the app: the new process counts before its first status update
        (run / "status.json").write_text(json.dumps({"state": "stopped", "pid": dead.pid, "updated": 1}))
        launch = {"pid": trainer.pid, "started": 2, "create_time": psutil.Process(trainer.pid).create_time()}
        (run / runfolder.LAUNCH).write_text(json.dumps(launch))
        info = jobs.run_info(run)
        assert info.state == "starting" and info.alive and info.pid == trainer.pid and not info.resumable
        # the launch record's pid, reused by a process created at another time: not our trainer
        (run / runfolder.LAUNCH).write_text(json.dumps({**launch, "create_time": launch["create_time"] - 5}))
        assert not jobs.run_info(run).alive and not jobs.process_alive(trainer.pid, launch["create_time"] - 5)
        assert jobs.process_alive(trainer.pid, launch["create_time"])
        (run / runfolder.LAUNCH).write_text(json.dumps(launch))
    finally:
        trainer.kill()
        trainer.wait()
    info = jobs.run_info(run)
    assert info.state == "failed" and not info.alive  # the relaunch died before writing any status
    other = tmp_path / "launched"
    other.mkdir()
    (other / runfolder.LAUNCH).write_text(json.dumps({"pid": dead.pid, "started": time.time()}))
    info = jobs.run_info(other)
    assert info.state == "failed" and runfolder.CONSOLE in info.error
    table = jobs.runs_table(jobs.list_runs(tmp_path))
    assert set(table["run"]) == {"r", "launched"} and "state" in table


def test_force_stop_kills_the_process_tree_and_never_a_stranger(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    # a "trainer" with a child (a data-loader worker), started as start_training starts them
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, "train.fit"], **jobs.popen_kwargs())
    try:
        trainer = psutil.Process(proc.pid)
        deadline = time.time() + 10
        while not trainer.children() and time.time() < deadline:
            time.sleep(0.1)
        (child,) = trainer.children()
        launch = {"pid": proc.pid, "started": 1, "create_time": trainer.create_time()}
        # a launch record whose pid was reused (another creation time) is never killed
        (run / runfolder.LAUNCH).write_text(json.dumps({**launch, "create_time": launch["create_time"] + 3}))
        assert "not running" in jobs.stop_training(run, force=True)
        assert proc.poll() is None and child.is_running()
        (run / runfolder.LAUNCH).write_text(json.dumps(launch))
        assert jobs.run_info(run).alive
        assert "killed r (pid" in jobs.stop_training(run, force=True)
        assert proc.wait(10) is not None
        psutil.wait_procs([child], timeout=10)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            proc.kill()
    # a status.json pid that now belongs to an unrelated process is never signalled
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / runfolder.LAUNCH).unlink()
        (run / "status.json").write_text(json.dumps({"state": "running", "pid": stranger.pid, "updated": 1}))
        assert not jobs.is_trainer(stranger.pid)
        assert "not running" in jobs.stop_training(run, force=True)
        assert "not running" in jobs.stop_training(run)
        assert stranger.poll() is None and not runfolder.stop_requested(run)
    finally:
        stranger.kill()
        stranger.wait()


def test_launch_detaches_the_trainer_portably(monkeypatch):
    """Windows: its own process group and no console window (closing the app's window must not kill it)."""
    with monkeypatch.context() as m:  # os.name is global: restored before anything asserts (pytest needs it)
        m.setattr(jobs.os, "name", "nt")
        m.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
        m.setattr(subprocess, "CREATE_NO_WINDOW", 0x08000000, raising=False)
        on_windows = jobs.popen_kwargs()
    assert on_windows == {"creationflags": 0x08000200}
    with monkeypatch.context() as m:
        m.setattr(jobs.os, "name", "posix")
        on_posix = jobs.popen_kwargs()
    assert on_posix == {"start_new_session": True}
