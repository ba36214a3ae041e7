"""Tests for core.appstate: bundles and runs in RUNS_DIR, the one-job lock, launching and stopping real
(tiny, random-weight, CPU) training subprocesses, reports, PCA discovery and crop-labelling helpers."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from core import appstate
from core.appstate import TrainRequest, TrainingBusy
from core.bundle import BundleError
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


def wait_state(run: Path, states: set[str], timeout: float = 60.0) -> appstate.RunInfo:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = appstate.run_info(run)
        if info.state in states:
            return info
        time.sleep(0.2)
    raise AssertionError(f"{run.name} never reached {states}: {appstate.run_info(run)}\n"
                         f"{appstate.log_tail(run, appstate.CONSOLE_LOG, 40)}")


# ------------------------------------------------------------------ real training subprocesses
@pytest.mark.timeout(120)
def test_launch_finish_second_job_refused_and_stop(tmp_path):
    root = tmp_path / "runs"
    manifest = synthetic_dataset(tmp_path / "data")
    short = tiny_recipe(tmp_path / "short.yaml", manifest, epochs=1)
    long = tiny_recipe(tmp_path / "long.yaml", manifest, epochs=500)

    # 1. a one-epoch run goes starting/running -> finished, leaves a bundle, and frees the lock
    rec = appstate.start_training(TrainRequest(recipe=str(short), name="short", device="cpu"), root)
    assert appstate.read_lock(root)["pid"] == rec["pid"] and rec["device"] == "cpu"
    assert appstate.run_info(root / "short").state in ("starting", "running", "finished", "stopping")
    with pytest.raises(TrainingBusy, match="already running: run 'short'"):
        appstate.start_training(TrainRequest(recipe=str(short), name="second", device="cpu"), root)
    assert not (root / "second").exists()
    assert appstate.wait_for(root / "short", timeout=90)
    info = appstate.run_info(root / "short")
    assert info.state == "finished", appstate.log_tail(root / "short", appstate.CONSOLE_LOG, 40)
    assert info.has_bundle and not info.alive
    assert appstate.current_job(root) is None and not (root / appstate.LOCK_NAME).exists()  # stale lock cleared
    assert [b.label for b in appstate.list_bundles(root)] == ["short"]
    assert len(appstate.read_metrics(root / "short")) == 1
    assert "val_report.json" in [p.name for p in appstate.find_reports(root)]

    # 2. a long run is stopped with SIGTERM to its process group: status 'stopped', resumable, lock free
    appstate.start_training(TrainRequest(recipe=str(long), name="long", device="cpu"), root)
    run = root / "long"
    deadline = time.time() + 60
    while not (run / "checkpoint.pt").exists() and time.time() < deadline:  # written after each epoch
        time.sleep(0.2)
    assert appstate.run_info(run).state == "running"
    assert "SIGTERM" in appstate.stop_training(run)
    assert appstate.wait_for(run, timeout=30)
    info = appstate.run_info(run)
    assert info.state == "stopped" and info.resumable, appstate.log_tail(run, appstate.CONSOLE_LOG, 40)
    assert appstate.current_job(root) is None
    assert "not running" in appstate.stop_training(run)
    states = {r.name: r.state for r in appstate.list_runs(root)}
    assert states == {"short": "finished", "long": "stopped"}


def test_name_and_recipe_checks(tmp_path):
    root = tmp_path / "runs"
    (root / "taken").mkdir(parents=True)
    (root / "taken" / "x").write_text("")
    recipe = str(appstate.list_recipes()[0])
    with pytest.raises(appstate.LaunchError, match="run name"):
        appstate.start_training(TrainRequest(recipe=recipe, name="../evil"), root)
    with pytest.raises(appstate.LaunchError, match="already exists"):
        appstate.start_training(TrainRequest(recipe=recipe, name="taken"), root)
    with pytest.raises(appstate.LaunchError, match="recipe not found"):
        appstate.start_training(TrainRequest(recipe=str(tmp_path / "nope.yaml"), name="ok"), root)
    assert appstate.current_job(root) is None


def test_training_command_overrides():
    recipe = appstate.RECIPES_DIR / "paper_transfer.yaml"  # two stages
    req = TrainRequest(recipe=str(recipe), name="x", backbone="resnet18", weights="none", init_from="runs/a",
                       epochs=3, lr=2e-4, device="cpu", manifest="/d/m.csv", domain="midas")
    cmd = appstate.training_command(req, "/r/x", python="py")
    assert cmd[:8] == ["py", "-m", "train.fit", "--config", str(recipe), "--out", "/r/x", "--name"]
    joined = " ".join(cmd)
    for part in ("--device cpu", "--backbone resnet18", "--weights none", "--init-from runs/a", "--epochs 3",
                 "stages.0.lr=0.0002", "stages.1.lr=0.0002",
                 'stages.1.data=[{"manifest": "/d/m.csv", "domain": "midas"}]'):
        assert part in joined
    # the data override parses as the YAML the trainer's --set reads
    from core.config import apply_override
    raw = yaml.safe_load(recipe.read_text())
    apply_override(raw, cmd[cmd.index('stages.0.data=[{"manifest": "/d/m.csv", "domain": "midas"}]')])
    assert raw["stages"][0]["data"] == [{"manifest": "/d/m.csv", "domain": "midas"}]
    assert "--device" not in appstate.training_command(TrainRequest(recipe=str(recipe), name="x"), "/o")


# ------------------------------------------------------------------ lock
def test_lock_held_by_live_process_refuses_and_stale_lock_is_cleared(tmp_path):
    root = tmp_path / "runs"
    me = {"pid": os.getpid(), "start": appstate._proc_start(os.getpid()), "run": "busy", "device": "cuda",
          "started": time.time()}
    appstate.acquire_lock(root, me)
    with pytest.raises(TrainingBusy, match="run 'busy' on device 'cuda'"):
        appstate.acquire_lock(root, {**me, "run": "other"})
    assert appstate.current_job(root)["run"] == "busy"
    # the same pid with another start time is a reused pid: stale
    appstate._write_lock(root, {**me, "start": "1"})
    assert appstate.current_job(root) is None and not (root / appstate.LOCK_NAME).exists()
    # a dead pid: stale, and a new job may take the lock
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    appstate._write_lock(root, {**me, "pid": dead.pid, "start": None})
    assert appstate.acquire_lock(root, {**me, "run": "new"})["run"] == "new"
    appstate.release_lock(root, pid=12345)  # not the holder: kept
    assert appstate.read_lock(root)["run"] == "new"
    appstate.release_lock(root)
    assert appstate.read_lock(root) is None


def test_run_states_from_folders(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("name: r\n")
    assert appstate.run_info(run).state == "unknown"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": dead.pid, "stage": 0, "epoch": 2,
                                                 "epochs": 5, "updated": time.time()}))
    (run / "checkpoint.pt").write_bytes(b"x")
    info = appstate.run_info(run)
    assert info.state == "interrupted" and info.resumable and info.epoch == 2
    # a live pid in status.json counts only if it runs train.fit (else it is a reused pid)
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid(), "updated": 1}))
    assert appstate.run_info(run).state == "interrupted"
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train.fit"])
    try:
        (run / "status.json").write_text(json.dumps({"state": "running", "pid": trainer.pid, "updated": 1}))
        assert appstate.run_info(run).state == "running"
        # stopped, then resumed by the app: the new process counts before its first status update
        (run / "status.json").write_text(json.dumps({"state": "stopped", "pid": dead.pid, "updated": 1}))
        (run / appstate.LAUNCH_NAME).write_text(json.dumps({"pid": trainer.pid, "started": 2,
                                                            "start": appstate._proc_start(trainer.pid)}))
        info = appstate.run_info(run)
        assert info.state == "starting" and info.alive and info.pid == trainer.pid and not info.resumable
    finally:
        trainer.kill()
        trainer.wait()
    info = appstate.run_info(run)
    assert info.state == "failed" and not info.alive  # the relaunch died before writing any status
    other = tmp_path / "launched"
    other.mkdir()
    (other / appstate.LAUNCH_NAME).write_text(json.dumps({"pid": dead.pid, "started": time.time()}))
    info = appstate.run_info(other)
    assert info.state == "failed" and appstate.CONSOLE_LOG in info.error
    table = appstate.runs_table(appstate.list_runs(tmp_path))
    assert set(table["run"]) == {"r", "launched"} and "state" in table


def test_log_tail_and_metrics(tmp_path):
    (tmp_path / "train.log").write_text("".join(f"line {i}\n" for i in range(100)))
    assert appstate.log_tail(tmp_path, lines=3) == "line 97\nline 98\nline 99"
    assert appstate.log_tail(tmp_path, "missing.log") == ""
    assert appstate.read_metrics(tmp_path).empty
    pd.DataFrame({"stage": [0, 0, 1], "epoch": [0, 1, 0], "train_loss": [1, 0.8, 0.7],
                  "val_roc_auc": [0.5, 0.6, None]}).to_csv(tmp_path / "metrics.csv", index=False)
    assert appstate.read_metrics(tmp_path)["step"].tolist() == [1, 2, 3]


# ------------------------------------------------------------------ bundles
@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from core.backbones import get_spec
    from core.bundle import save_bundle
    from core.model import HeadConfig, LesionClassifier
    model = LesionClassifier(get_spec("mobilenetv2_100"), HeadConfig(), weights="none")
    thr = {"value": 0.4, "rule": "sensitivity", "target": 0.9, "n_val": 30, "n_val_malignant": 12,
           "val_sensitivity": {"value": 0.9, "ci95": [0.8, 0.97]},
           "val_specificity": {"value": 0.55, "ci95": [0.4, 0.7]}}
    prov = {"run_name": "demo", "weights": "none",
            "data": [[{"manifest": "/d/midas.csv", "domain": "midas", "images": 100, "malignant": 40}]],
            "stages": [{"name": "finetune"}],
            "split_counts": {"train": {"images": 70, "malignant": 28}, "val": {"images": 30, "malignant": 12}},
            "validation_metrics": {"roc_auc": {"value": 0.8, "ci95": [0.7, 0.9]}}}
    root = tmp_path_factory.mktemp("bundles")
    save_bundle(model, root / "run_a" / "bundle", threshold=thr, provenance=prov)
    return root


def test_list_bundles_and_describe(bundle_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("model.json", "model.safetensors"):
        (bare / f).write_bytes((bundle_dir / "run_a" / "bundle" / f).read_bytes())
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((bare / "model.json").read_text()) | {"format_version": 99}
    (old / "model.json").write_text(json.dumps(meta))
    (tmp_path / "not_a_model").mkdir()
    entries = {e.label: e for e in appstate.list_bundles(tmp_path)}
    assert set(entries) == {"bare", "old"}
    assert entries["bare"].meta and entries["bare"].path == bare
    assert "version 99" in entries["old"].error
    d = appstate.describe_model(entries["bare"].meta)
    assert d["backbone"] == "mobilenetv2_100" and d["threshold"] == 0.4
    assert d["sensitivity"] == "90% (95% CI 80%–97%)" and d["specificity"].startswith("55%")
    assert d["n_val"] == 30 and "midas.csv" in d["training_data"][0] and "train 70" in d["splits"]
    assert "not a diagnostic device" in d["intended_use"]
    assert appstate.list_bundles(tmp_path / "missing") == []


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_extract_bundle_zip(bundle_dir, tmp_path):
    src = bundle_dir / "run_a" / "bundle"
    files = {f"mybundle/{f}": (src / f).read_bytes() for f in ("model.json", "model.safetensors")}
    data = _zip(files | {"../../evil.txt": b"x"})
    out = appstate.extract_bundle_zip(data, tmp_path / "x")
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    assert not list(tmp_path.rglob("evil.txt"))
    assert appstate.extract_bundle_zip(data, tmp_path / "x") == out  # unpacked once per content
    with pytest.raises(BundleError, match="not a zip"):
        appstate.extract_bundle_zip(b"hello", tmp_path / "x")
    with pytest.raises(BundleError, match="no model.safetensors"):
        appstate.extract_bundle_zip(_zip({"model.json": b"{}"}), tmp_path / "x")
    meta = json.loads((src / "model.json").read_text()) | {"format_version": 2}
    bad = _zip({"model.json": json.dumps(meta).encode(), "model.safetensors": b"0"})
    with pytest.raises(BundleError, match="format version 2 but this tool reads version 1"):
        appstate.extract_bundle_zip(bad, tmp_path / "x")


# ------------------------------------------------------------------ reports, PCA, photos, crops
def _report(probs, labels, thr=0.5):
    from core.evaluation import build_report
    df = pd.DataFrame({"image": [f"/nope/{i}.jpg" for i in range(len(labels))], "label": labels,
                       "fitzpatrick": ["II", "V"] * (len(labels) // 2)})
    return build_report(df, np.asarray(probs, float), thr, n_boot=20, split="val")


def test_reports_tables_and_examples(tmp_path):
    rep = _report([0.9, 0.2, 0.7, 0.4, 0.1, 0.6], [1, 0, 0, 1, 0, 1])
    for rel in ("a/val_report.json", "a/test_report.json", "b/report_pad_test.json", "b/bundle/val_report.json",
                "c/report_other.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(rep if "other" not in rel else {"hello": 1}))
    found = [appstate.report_label(p, tmp_path) for p in appstate.find_reports(tmp_path)]
    assert found == ["a/test_report.json", "a/val_report.json", "b/report_pad_test.json", "c/report_other.json"]
    loaded = appstate.load_report(tmp_path / "a/val_report.json")
    table = appstate.metrics_table({"A (val)": loaded})
    assert list(table.columns[:7]) == ["Model", "Accuracy", "Precision", "Recall", "Specificity", "F1", "ROC-AUC"]
    assert table.loc[0, "Accuracy"].startswith("0.667") and table.loc[0, "n"] == 6
    subs = appstate.subgroup_tables(loaded)
    assert list(subs["fitzpatrick"]["fitzpatrick"]) == ["II", "V"]
    ex = appstate.example_predictions(loaded, n=2)
    assert [r["prob"] for r in ex["correct"]] == [0.9, 0.1]
    assert [r["prob"] for r in ex["incorrect"]] == [0.7, 0.4]
    assert appstate.thumbnail("/nope/0.jpg") is None
    with pytest.raises(ValueError, match="not an evaluation report"):
        appstate.load_report(tmp_path / "c/report_other.json")


def test_find_pca(tmp_path):
    d = tmp_path / "pca"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"pca": {"explained_variance_ratio": [0.3, 0.1]}}))
    pd.DataFrame({"pc1": [0.1], "pc2": [0.2], "domain": ["isic"], "label": [1]}).to_csv(d / "pixels.csv", index=False)
    (d / "other.csv").write_text("a,b\n1,2\n")
    (d / "pca.html").write_text("<html></html>")
    found = appstate.find_pca([tmp_path, tmp_path / "absent"])
    assert len(found) == 1 and found[0].tables == (d / "pixels.csv",) and found[0].html == (d / "pca.html",)
    assert appstate.read_pca_table(found[0].tables[0])["domain"].tolist() == ["isic"]


def test_preview_and_box_scaling():
    img = Image.new("RGB", (2800, 1400), (200, 100, 90))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright photo is 1400 x 2800
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    disp, size = appstate.preview(buf.getvalue(), max_side=700)
    assert size == (1400, 2800) and disp.size == (350, 700)
    box = appstate.to_original({"left": 35, "top": 70, "width": 100, "height": 200}, disp.size, size)
    assert box == {"left": 140, "top": 280, "width": 400, "height": 800}
    assert appstate.to_display(box, disp.size, size) == {"left": 35, "top": 70, "width": 100, "height": 200}
    png = Image.open(io.BytesIO(appstate.crop_png(buf.getvalue(), "p.jpg", box)))
    assert png.format == "PNG" and png.size == (400, 800)
    clamped = appstate.to_original({"left": 300, "top": 650, "width": 100, "height": 100}, disp.size, size)
    assert clamped["left"] + clamped["width"] <= 1400 and clamped["top"] + clamped["height"] <= 2800


def test_crop_progress(tmp_path):
    from core.cropbox import read_crops, upsert_crop
    from core.manifest import read_manifest
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30)).save(imgs / f"p{i}.jpg")
    manifest = write_manifest(pd.DataFrame({"image": [str(imgs / f"p{i}.jpg") for i in range(3)],
                                            "label": [0, 1, 0]}), tmp_path / "m.csv")
    df = read_manifest(manifest)
    key = appstate.image_id_for(df["image"][0], df)
    assert key == os.path.join("images", "p0.jpg")
    crops = tmp_path / "crops.csv"
    upsert_crop(crops, key, {"left": 1, "top": 2, "width": 10, "height": 10})
    upsert_crop(crops, "p2.jpg", None, unusable=True, note="blurry")
    entries = appstate.crop_entries(df, read_crops(crops))
    assert appstate.crop_progress(entries) == (2, 3)
    assert appstate.entry_box(entries[0]) == {"left": 1, "top": 2, "width": 10, "height": 10}
    assert entries[1] is None and appstate.entry_box(entries[2]) is None and entries[2]["unusable"] == 1


def test_appstate_never_imports_streamlit():
    code = "import sys, core.appstate; sys.exit('streamlit' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=appstate.PROJECT_ROOT).returncode == 0


def test_force_stop_kills_the_process_group_and_never_a_stranger(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    # a "trainer" with a child in its own process group, as start_training makes them
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, "train.fit"], start_new_session=True)
    try:
        (run / appstate.LAUNCH_NAME).write_text(json.dumps({"pid": proc.pid, "pgid": proc.pid, "started": 1,
                                                            "start": appstate._proc_start(proc.pid)}))
        time.sleep(0.5)
        assert appstate.run_info(run).alive
        assert "SIGKILL" in appstate.stop_training(run, force=True)
        proc.wait(10)
        time.sleep(0.2)
        group = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert not [pid for pid in group if appstate.process_alive(int(pid))]  # zombies await their reaper
    finally:
        if proc.poll() is None:
            proc.kill()
    # a status.json pid that now belongs to an unrelated process is never signalled
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / appstate.LAUNCH_NAME).unlink()
        (run / "status.json").write_text(json.dumps({"state": "running", "pid": stranger.pid, "updated": 1}))
        assert "not running" in appstate.stop_training(run, force=True)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
