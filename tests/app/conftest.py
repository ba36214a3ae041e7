"""Fixtures for the app tests: a RUNS_DIR holding one finished run with a small random-weight bundle (no
downloads), its val_report.json, metrics, status and log, a PCA output folder, and synthetic lesion photos."""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "app.py")
RUN_NAME = "demo_run"


def dashboard_with(report: str, runs: Path, monkeypatch, no_evidence: Path):
    """The app's Dashboard over the run folders in `runs` (no built-in evidence) with one report chosen, e.g.
    'straight/cv_report.json'; returns the AppTest, run, with the page's charts' specs parsed."""
    from streamlit.testing.v1 import AppTest

    from core import builtin
    monkeypatch.setenv("RUNS_DIR", str(runs))
    monkeypatch.setattr(builtin, "DEMO_EVIDENCE", no_evidence)
    at = AppTest.from_file(APP, default_timeout=60).run().switch_page("ui/dashboard.py").run()
    at.multiselect(key="dash_reports").set_value([report]).run()
    at.chart_specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return at


def lesion_photo(seed: int = 0, size=(480, 360), malignant: bool = False) -> Image.Image:
    """A synthetic 'lesion on skin': skin-tone background with texture and an irregular brown blob."""
    rng = np.random.default_rng(seed)
    w, h = size
    skin = np.array([222, 178, 150]) + rng.normal(0, 6, 3)
    arr = np.clip(skin + rng.normal(0, 9, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    cx, cy, r = w / 2 + rng.uniform(-30, 30), h / 2 + rng.uniform(-20, 20), min(w, h) * rng.uniform(0.15, 0.25)
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    radii = r * (1 + rng.uniform(-0.35 if malignant else -0.1, 0.35 if malignant else 0.1, len(angles)))
    pts = [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for a, rr in zip(angles, radii)]
    colour = (70, 40, 30) if malignant else (140, 90, 60)
    draw.polygon(pts, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    noise = rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, float) + noise, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, exif_orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kw = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif
    img.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


@dataclass(frozen=True)
class AppEnv:
    runs: Path          # RUNS_DIR with demo_run
    empty_runs: Path    # a RUNS_DIR with nothing in it
    run: Path
    bundle: Path
    photo: Path         # a synthetic lesion JPEG
    images: Path        # the synthetic dataset folder (manifest.csv inside)
    manifest: Path


THRESHOLD = {"value": 0.5, "rule": "sensitivity", "target": 0.9, "chosen_on": "validation split of the last stage",
             "val_sensitivity": {"value": 0.9, "ci95": [0.8, 0.97]},
             "val_specificity": {"value": 0.55, "ci95": [0.41, 0.68]}, "n_val": 40, "n_val_malignant": 16}


def _provenance() -> dict:
    return {"run_name": RUN_NAME, "weights": "none",
            "data": [[{"manifest": "/data/pad_ufes.csv", "sha256": "0" * 64, "images": 200, "malignant": 80,
                       "domain": "pad_ufes_20"}]],
            "stages": [{"name": "finetune"}],
            "split_counts": {"train": {"images": 140, "malignant": 56, "patient_ids": 100},
                             "val": {"images": 40, "malignant": 16, "patient_ids": 30},
                             "test": {"images": 20, "malignant": 8, "patient_ids": 15}},
            "validation_metrics": {"roc_auc": {"value": 0.81, "ci95": [0.7, 0.9]},
                                   "recall": THRESHOLD["val_sensitivity"],
                                   "specificity": THRESHOLD["val_specificity"]}}


@pytest.fixture(scope="session")
def app_env(tmp_path_factory) -> AppEnv:
    import torch

    from core.backbones import get_spec
    from core.bundle import save_bundle
    from core.evaluation import build_report
    from core.manifest import write_manifest
    from core.model import HeadConfig, LesionClassifier

    base = tmp_path_factory.mktemp("app")
    runs, empty = base / "runs", base / "empty_runs"
    run = runs / RUN_NAME
    empty.mkdir(parents=True)
    torch.manual_seed(0)
    model = LesionClassifier(get_spec("mobilenetv2_100"), HeadConfig(), weights="none").eval()
    bundle = save_bundle(model, run / "bundle", threshold=THRESHOLD, provenance=_provenance())

    images = base / "images"
    images.mkdir()
    rows = []
    for i in range(8):
        label = i % 2
        path = images / f"lesion_{i}.jpg"
        path.write_bytes(jpeg_bytes(lesion_photo(i, malignant=bool(label))))
        rows.append({"image": str(path), "label": label, "patient_id": f"p{i}", "domain": "synthetic",
                     "fitzpatrick": ["II", "IV"][i % 2 == 0]})
    df = pd.DataFrame(rows)
    manifest = write_manifest(df, images / "manifest.csv")
    probs = np.array([0.2, 0.8, 0.6, 0.3, 0.1, 0.9, 0.45, 0.7])
    report = build_report(df, probs, THRESHOLD["value"], n_boot=50, seed=0, split="val")
    report["model"] = {"run": RUN_NAME, "bundle": str(bundle)}
    (run / "val_report.json").write_text(json.dumps(report))

    now = time.time()
    (run / "status.json").write_text(json.dumps({"state": "finished", "stage": 0, "stage_name": "finetune",
                                                 "epoch": 2, "epochs": 3, "pid": 999999, "updated": now,
                                                 "finished": now}))
    pd.DataFrame({"stage": [0, 0, 0], "stage_name": ["finetune"] * 3, "epoch": [0, 1, 2],
                  "train_loss": [0.69, 0.6, 0.55], "val_loss": [0.7, 0.65, 0.64],
                  "val_roc_auc": [0.6, 0.75, 0.81], "val_recall": [0.5, 0.8, 0.9]}).to_csv(run / "metrics.csv",
                                                                                            index=False)
    (run / "train.log").write_text("2025-01-01 00:00:00 stage 0 epoch 2: train_loss 0.55 val_auc 0.810\n")
    (run / "config.yaml").write_text(f"name: {RUN_NAME}\n")

    pca = runs / "pca_demo"
    pca.mkdir()
    (pca / "summary.json").write_text(json.dumps({"pca": {"explained_variance_ratio": [0.31, 0.12]}}))
    rng = np.random.default_rng(1)
    pd.DataFrame({"pc1": rng.normal(size=30), "pc2": rng.normal(size=30),
                  "domain": ["isic", "midas", "midas_cropped"] * 10, "label": [0, 1] * 15}).to_csv(
        pca / "pixels_pca.csv", index=False)

    photo = base / "lesion.jpg"
    photo.write_bytes(jpeg_bytes(lesion_photo(42, size=(640, 480), malignant=True)))
    return AppEnv(runs=runs, empty_runs=empty, run=run, bundle=bundle, photo=photo, images=images,
                  manifest=manifest)


@pytest.fixture
def with_model(app_env, monkeypatch) -> AppEnv:
    monkeypatch.setenv("RUNS_DIR", str(app_env.runs))
    return app_env


@pytest.fixture(scope="session")
def trusted_runs(app_env, tmp_path_factory) -> Path:
    """A RUNS_DIR whose one bundle has an out-of-distribution gate, a calibration map and similar cases, fitted
    from 36 synthetic lesion photos (24 train, 12 validation) as training would fit them."""
    import torch

    from core.backbones import get_spec
    from core.bundle import save_bundle
    from core.model import HeadConfig, LesionClassifier
    from core.trust import fit_trust
    base = tmp_path_factory.mktemp("trusted")
    rows = []
    for i in range(36):
        path = base / f"t{i}.jpg"
        path.write_bytes(jpeg_bytes(lesion_photo(100 + i, malignant=bool(i % 2))))
        rows.append({"image": str(path), "label": i % 2, "patient_id": f"t{i}", "diagnosis": ["NEV", "MEL"][i % 2],
                     "split": "train" if i < 24 else "val"})
    torch.manual_seed(0)
    model = LesionClassifier(get_spec("mobilenetv2_100"), HeadConfig(), weights="none").eval()
    parts = fit_trust(model, pd.DataFrame(rows))
    save_bundle(model, base / "runs" / "trusted_run" / "bundle", threshold=THRESHOLD, provenance=_provenance(),
                gate=parts.gate, calibration=parts.calibration, similar=parts.similar)
    return base / "runs"


@pytest.fixture
def with_trusted_model(app_env, trusted_runs, monkeypatch) -> AppEnv:
    monkeypatch.setenv("RUNS_DIR", str(trusted_runs))
    return app_env


@pytest.fixture
def without_model(app_env, monkeypatch) -> AppEnv:
    monkeypatch.setenv("RUNS_DIR", str(app_env.empty_runs))
    return app_env


# a cross-validated run's threshold rule judged on new patients (core.cv.threshold_transfer's form, abridged)
NEW_PATIENTS = {"image": {"per_fold": [{"fold": 0}, {"fold": 1}], "sensitivity": {"value": 0.85, "ci95": [0.7, 0.95]},
                          "specificity": {"value": 0.61, "ci95": [0.45, 0.75]}}, "fused": None}


@pytest.fixture(scope="session")
def ensemble_runs(app_env, tmp_path_factory) -> Path:
    """A RUNS_DIR whose one bundle is a 2-member ensemble (random weights, two seeds), its threshold chosen on
    out-of-fold predictions as a cross-validated run chooses it."""
    import torch

    from core.backbones import get_spec
    from core.bundle import Threshold, load_bundle, save_bundle
    from core.calibration import Calibration
    from core.ensemble import save_ensemble
    from core.model import HeadConfig, LesionClassifier
    from tests.conftest import spread_logits
    base = tmp_path_factory.mktemp("ensemble")
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = LesionClassifier(get_spec("mobilenetv2_100"), HeadConfig(), weights="none").eval()
        spread_logits(model, std=3.0)
        members.append(load_bundle(save_bundle(model, base / f"m{seed}", threshold=THRESHOLD)))
    threshold = Threshold(**{**THRESHOLD, "chosen_on": "out-of-fold predictions (2 folds)"})
    calibration = Calibration("platt", 1.2, -0.3, 40, 0.4, "given", fitted_on="out-of-fold")
    save_ensemble(members, base / "runs" / "cv_run" / "bundle", threshold=threshold, calibration=calibration,
                  provenance={**_provenance(), "run_name": "cv_run", "threshold_on_new_patients": NEW_PATIENTS},
                  member_info=[{"fold": 0}, {"fold": 1}])
    return base / "runs"


@pytest.fixture
def with_ensemble(app_env, ensemble_runs, monkeypatch) -> AppEnv:
    monkeypatch.setenv("RUNS_DIR", str(ensemble_runs))
    return app_env
