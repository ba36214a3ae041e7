"""`python -m train.fit --devices 2` on the CPU (gloo DDP, two processes): the same bundle format as one process,
complete validation predictions with uneven shards, files written by rank 0 only, and the frozen -> unfrozen stage
switch under DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from core import runfolder
from core.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES, PER_PATIENT = 24, 3  # 8 patients: the split puts 3 images in validation, an uneven 2 + 1 across ranks

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="needs torch.distributed with gloo"), pytest.mark.slow]


def write_data(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["image,label,patient_id"]
    for i in range(N_IMAGES):
        a = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
        Image.fromarray(a).resize((96, 80), Image.BICUBIC).save(d / f"img{i}.png")
        rows.append(f"img{i}.png,{i % 2},P{i // PER_PATIENT}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    data = f"[{{csv: {d / 'labels.csv'}, images: {d}}}]"
    cfg = d / "cfg.yaml"
    cfg.write_text(f"""name: ddp-test
backbone: mobilenetv2_100
weights: none
device: cpu
input_size: 64
n_boot: 20
num_workers: 0
select_metric: loss
stages:
  - {{name: head, data: {data}, freeze_backbone: true, epochs: 1, lr: 1e-2, weight_decay: 0, batch_size: 4}}
  - {{name: finetune, data: {data}, epochs: 1, lr: 1e-2, weight_decay: 0, batch_size: 4}}
""")
    return cfg


def fit(cfg: Path, out: Path, devices: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "train.fit", "--config", str(cfg), "--out", str(out),
                           "--devices", str(devices)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    cfg = write_data(base / "data")
    out = {}
    for devices in (1, 2):
        proc = fit(cfg, base / f"run{devices}", devices)
        out[devices] = (proc, base / f"run{devices}")
    return out, cfg


def _ok(runs, devices):
    proc, run = runs[0][devices]
    assert proc.returncode == 0, f"--devices {devices} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return run


def test_ddp_run_finishes_with_the_single_process_bundle_format(runs):
    single, ddp = _ok(runs, 1), _ok(runs, 2)
    m1 = json.loads((single / "bundle" / "model.json").read_text())
    m2 = json.loads((ddp / "bundle" / "model.json").read_text())
    assert m1.keys() == m2.keys() and m1["provenance"].keys() == m2["provenance"].keys()
    assert m1["preprocessing"] == m2["preprocessing"] and m1["backbone"] == m2["backbone"]
    b1, b2 = load_bundle(single), load_bundle(ddp)
    assert b1.model.state_dict().keys() == b2.model.state_dict().keys()
    assert all(torch.isfinite(t).all() for t in b2.model.state_dict().values() if t.is_floating_point())
    assert 0.0 <= b2.threshold <= 1.0


def test_validation_predictions_are_complete_with_uneven_shards(runs):
    for devices in (1, 2):
        run = _ok(runs, devices)
        report = json.loads((run / "val_report.json").read_text())
        probs = [row["prob"] for row in report["predictions"]]
        assert len(probs) == 3  # odd: rank 1's shard is padded by the sampler, the padding must be dropped
        assert all(p is not None and np.isfinite(p) and 0 <= p <= 1 for p in probs)
        assert sorted(row["image"] for row in report["predictions"]) == sorted(set(r["image"] for r in
                                                                                 report["predictions"]))


def test_only_rank_zero_writes_the_run_files(runs):
    run = _ok(runs, 2)
    log = (run / "train.log").read_text().splitlines()
    assert sum("stage 0 epoch 0:" in line for line in log) == 1
    assert sum("stage 1 epoch 0:" in line for line in log) == 1
    assert len(log) == len(set(log)), "duplicate log lines: more than one rank wrote train.log"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished"
    metrics = pd.read_csv(run / "metrics.csv")
    assert len(metrics) == 2  # one epoch per stage
    # per-epoch validation gathers (probability, row) pairs from both ranks' padded shards: nothing may be missing
    assert np.isfinite(metrics["val_loss"]).all() and metrics["val_roc_auc"].notna().all()
    assert not list(run.rglob("*.tmp")), "a temporary file was left behind"


def test_stage_switch_frozen_then_unfrozen_under_ddp(runs):
    run = _ok(runs, 2)
    import yaml
    from lightning_fabric.utilities.seed import seed_everything

    from core.config import run_config_from_dict
    from core.training import initial_model
    cfg = run_config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    seed_everything(cfg.seed, verbose=False)
    init = initial_model(cfg)[0].state_dict()  # the weights fit() started from (same seed, same order)
    s0, s1 = load_file(str(run / "best_stage0.safetensors")), load_file(str(run / "best_stage1.safetensors"))
    backbone = [k for k in init if k.startswith("backbone.") and init[k].is_floating_point()]
    head = [k for k in init if k.startswith("head.")]
    # stage 0: backbone frozen (weights and BN statistics untouched), head trained
    assert all(torch.equal(s0[k], init[k]) for k in backbone)
    assert any(not torch.equal(s0[k], init[k]) for k in head)
    # stage 1: the backbone is trained too
    changed = [k for k in backbone if k.endswith(".weight") and not torch.equal(s1[k], s0[k])]
    assert len(changed) > len(backbone) // 4


def _fit_processes(out: Path) -> list[int]:
    """PIDs of train.fit processes (any rank) writing to `out`."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"train.fit" in cmd and str(out).encode() in cmd:
                pids.append(int(p.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
@pytest.mark.parametrize("how", ["stop_file", "sigterm_to_rank_zero"])
def test_a_stop_stops_every_rank_at_the_same_step(tmp_path, how):
    """The app's stop button writes a stop request into the run folder; SIGTERM from a terminal may reach the
    trainer (rank 0) alone. Either way every rank must stop, none may hang in a collective, and the run must be
    left 'stopped' with a checkpoint to resume from."""
    import signal
    import time
    cfg = write_data(tmp_path / "data")
    lines = [line.replace("epochs: 1,", "epochs: 500,") if "finetune" in line else line
             for line in cfg.read_text().splitlines()]
    cfg.write_text("\n".join(lines) + "\n")  # a stage long enough to be stopped in
    out = tmp_path / "run"
    log_path = tmp_path / "fit.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(log_path, "w") as log_file:  # a file, not a pipe: a surviving rank cannot block the test
        proc = subprocess.Popen([sys.executable, "-m", "train.fit", "--config", str(cfg), "--out", str(out),
                                 "--devices", "2"], cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    survivors = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "metrics.csv").exists():  # training has started
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(1.0)
        assert len(_fit_processes(out)) == 2, "expected two ranks"
        if how == "stop_file":
            runfolder.request_stop(out, by="test")
        else:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        deadline = time.time() + 30
        while _fit_processes(out) and time.time() < deadline:
            time.sleep(0.5)
        survivors = _fit_processes(out)
    finally:
        for pid in _fit_processes(out):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
    log = log_path.read_text()
    assert not survivors, f"a rank was still running after rank 0 stopped:\n{log[-3000:]}"
    assert rc == 130, log[-3000:]
    # both ranks left through the stop path (not rank 1 crashing on a closed connection)
    assert "stopped; continue with --resume" in log and "rank 1: stopped with the run" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert json.loads((out / "status.json").read_text())["state"] == "stopped"
    assert (out / "checkpoint.pt").exists()
    # (rank 0 may be told by the all-reduce that another rank saw the file first: "stop requested on another rank")
    expected = "stopped on request (stop requested" if how == "stop_file" else f"signal {int(signal.SIGTERM)}"
    assert expected in (out / "train.log").read_text()
    assert not runfolder.stop_requested(out)


def test_a_cross_validation_under_ddp_trains_every_fold_and_rank_zero_writes_the_top_folder(tmp_path):
    """--folds with --devices 2: every rank trains each fold run in turn (the ranks a DDP launch starts find rank
    0's fold assignment already there and must not refuse it), and the top folder is written once."""
    import yaml

    from tests.conftest import make_images, tiny_config
    make_images(tmp_path / "images", n=48).to_csv(tmp_path / "labels.csv", index=False)
    raw = tiny_config(tmp_path / "labels.csv", tmp_path / "images", channels_last=False)
    for stage in raw["stages"]:
        stage["epochs"] = 1
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "train.fit", "--config", str(cfg), "--out", str(tmp_path / "run"),
                           "--devices", "2", "--folds", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run = tmp_path / "run"
    assert len(load_bundle(run).model.members) == 2
    oof = pd.read_csv(run / runfolder.OOF)
    folds = runfolder.read_folds(run)
    assert sorted(oof["image"]) == sorted(folds.loc[folds["fold"] >= 0, "image"])
    log = (run / "train.log").read_text().splitlines()
    assert sum(line.endswith("fold 2/2: folds/fold_1") for line in log) == 1  # one writer
    assert sum("[fold_1] stage 1 epoch 0:" in line for line in log) == 1
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
