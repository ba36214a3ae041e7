"""Tests for core.jobs: the one-job lock, launching and stopping real (tiny, random-weight, CPU) training
subprocesses, run states from their folders, metrics and log tails."""
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
import pytest
import yaml
from PIL import Image

from core import appstate, jobs, reports
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


def wait_state(run: Path, states: set[str], timeout: float = 60.0) -> jobs.RunInfo:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = jobs.run_info(run)
        if info.state in states:
            return info
        time.sleep(0.2)
    raise AssertionError(f"{run.name} never reached {states}: {jobs.run_info(run)}\n"
                         f"{jobs.log_tail(run, jobs.CONSOLE_LOG, 40)}")


# ------------------------------------------------------------------ real training subprocesses
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_launch_finish_second_job_refused_and_stop(tmp_path):
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
    assert info.state == "finished", jobs.log_tail(root / "short", jobs.CONSOLE_LOG, 40)
    assert info.has_bundle and not info.alive
    assert jobs.current_job(root) is None and not (root / jobs.LOCK_NAME).exists()  # stale lock cleared
    assert [b.label for b in appstate.list_bundles(root)] == ["short"]
    assert len(jobs.read_metrics(root / "short")) == 1
    assert "val_report.json" in [p.name for p in reports.find_reports(root)]

    # 2. a long run is stopped with SIGTERM to its process group: status 'stopped', resumable, lock free
    jobs.start_training(TrainRequest(recipe=str(long), name="long", device="cpu"), root)
    run = root / "long"
    deadline = time.time() + 60
    while not (run / "checkpoint.pt").exists() and time.time() < deadline:  # written after each epoch
        time.sleep(0.2)
    assert jobs.run_info(run).state == "running"
    assert "SIGTERM" in jobs.stop_training(run)
    assert jobs.wait_for(run, timeout=30)
    info = jobs.run_info(run)
    assert info.state == "stopped" and info.resumable, jobs.log_tail(run, jobs.CONSOLE_LOG, 40)
    assert jobs.current_job(root) is None
    assert "not running" in jobs.stop_training(run)
    states = {r.name: r.state for r in jobs.list_runs(root)}
    assert states == {"short": "finished", "long": "stopped"}


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


# ------------------------------------------------------------------ lock
def test_lock_held_by_live_process_refuses_and_stale_lock_is_cleared(tmp_path):
    root = tmp_path / "runs"
    me = {"pid": os.getpid(), "start": jobs._proc_start(os.getpid()), "run": "busy", "device": "cuda",
          "started": time.time()}
    jobs.acquire_lock(root, me)
    with pytest.raises(TrainingBusy, match="run 'busy' on device 'cuda'"):
        jobs.acquire_lock(root, {**me, "run": "other"})
    assert jobs.current_job(root)["run"] == "busy"
    # the same pid with another start time is a reused pid: stale
    jobs._write_lock(root, {**me, "start": "1"})
    assert jobs.current_job(root) is None and not (root / jobs.LOCK_NAME).exists()
    # a dead pid: stale, and a new job may take the lock
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    jobs._write_lock(root, {**me, "pid": dead.pid, "start": None})
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
        (run / jobs.LAUNCH_NAME).write_text(json.dumps({"pid": trainer.pid, "started": 2,
                                                            "start": jobs._proc_start(trainer.pid)}))
        info = jobs.run_info(run)
        assert info.state == "starting" and info.alive and info.pid == trainer.pid and not info.resumable
    finally:
        trainer.kill()
        trainer.wait()
    info = jobs.run_info(run)
    assert info.state == "failed" and not info.alive  # the relaunch died before writing any status
    other = tmp_path / "launched"
    other.mkdir()
    (other / jobs.LAUNCH_NAME).write_text(json.dumps({"pid": dead.pid, "started": time.time()}))
    info = jobs.run_info(other)
    assert info.state == "failed" and jobs.CONSOLE_LOG in info.error
    table = jobs.runs_table(jobs.list_runs(tmp_path))
    assert set(table["run"]) == {"r", "launched"} and "state" in table


def test_log_tail_and_metrics(tmp_path):
    (tmp_path / "train.log").write_text("".join(f"line {i}\n" for i in range(100)))
    assert jobs.log_tail(tmp_path, lines=3) == "line 97\nline 98\nline 99"
    assert jobs.log_tail(tmp_path, "missing.log") == ""
    assert jobs.read_metrics(tmp_path).empty
    pd.DataFrame({"stage": [0, 0, 1], "epoch": [0, 1, 0], "train_loss": [1, 0.8, 0.7],
                  "val_roc_auc": [0.5, 0.6, None]}).to_csv(tmp_path / "metrics.csv", index=False)
    assert jobs.read_metrics(tmp_path)["step"].tolist() == [1, 2, 3]


def test_force_stop_kills_the_process_group_and_never_a_stranger(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    # a "trainer" with a child in its own process group, as start_training makes them
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, "train.fit"], start_new_session=True)
    try:
        (run / jobs.LAUNCH_NAME).write_text(json.dumps({"pid": proc.pid, "pgid": proc.pid, "started": 1,
                                                            "start": jobs._proc_start(proc.pid)}))
        time.sleep(0.5)
        assert jobs.run_info(run).alive
        assert "SIGKILL" in jobs.stop_training(run, force=True)
        proc.wait(10)
        time.sleep(0.2)
        group = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert not [pid for pid in group if jobs.process_alive(int(pid))]  # zombies await their reaper
    finally:
        if proc.poll() is None:
            proc.kill()
    # a status.json pid that now belongs to an unrelated process is never signalled
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / jobs.LAUNCH_NAME).unlink()
        (run / "status.json").write_text(json.dumps({"state": "running", "pid": stranger.pid, "updated": 1}))
        assert "not running" in jobs.stop_training(run, force=True)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
