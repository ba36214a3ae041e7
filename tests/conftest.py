"""Shared test fixtures: synthetic lesion-like images with patient ids, tiny run configs, shared-data paths."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts) -> Path:
    """A path under ../shared, or skip the test when that folder is absent (it is in CI)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


def make_images(folder: Path, n: int = 40, seed: int = 0, size=(96, 80), images_per_patient: int = 2):
    """Write n synthetic photos: malignant ones have a darker, larger blob, so a model can learn something."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        w, h = size
        yy, xx = np.mgrid[:h, :w]
        r = (0.35 if label else 0.18) * min(w, h)
        blob = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) < r ** 2
        img = np.full((h, w, 3), 200.0) + rng.normal(0, 12, (h, w, 3))
        img[blob] = np.array([90, 50, 40]) if label else np.array([160, 120, 100])
        name = f"img{i:03d}.png"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / name)
        # the first half come in pairs per patient (a split must keep them together), the rest are singles
        patient = f"P{i // images_per_patient:03d}" if i < n // 2 else f"Q{i:03d}"
        rows.append({"image": name, "label": label, "patient_id": patient})
    return pd.DataFrame(rows)


def synthetic_set(root: Path) -> Path:
    """root with make_images' 40 photos in images/ and their labels.csv; returns root."""
    make_images(root / "images").to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="session", autouse=True)
def private_user_cache(tmp_path_factory):
    """Commands cache embeddings in a per-user folder by default: point it at a temporary one, so no test (nor a
    subprocess it starts) reads or fills the real user cache."""
    import os
    before = os.environ.get("SKINSCREEN_CACHE")
    os.environ["SKINSCREEN_CACHE"] = str(tmp_path_factory.mktemp("user_cache"))
    yield
    if before is None:
        os.environ.pop("SKINSCREEN_CACHE", None)
    else:
        os.environ["SKINSCREEN_CACHE"] = before


@pytest.fixture(scope="session", autouse=True)
def pytorch_engine_by_default():
    """Every Predictor in the tests runs PyTorch unless a test asks for another engine: the automatic choice
    depends on timings (results would depend on the machine's load) and exports an ONNX graph per model
    (seconds each). tests/core/test_engine.py exercises the choice and ONNX Runtime explicitly."""
    import os
    before = os.environ.get("SKINSCREEN_ENGINE")
    os.environ["SKINSCREEN_ENGINE"] = "pytorch"
    yield
    if before is None:
        os.environ.pop("SKINSCREEN_ENGINE", None)
    else:
        os.environ["SKINSCREEN_ENGINE"] = before


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy shared CPU an OpenMP team spins at every barrier."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def image_set(tmp_path):
    """(labels.csv path, image folder) for 40 synthetic images, 2 images for some patients."""
    folder = tmp_path / "images"
    df = make_images(folder)
    labels = tmp_path / "labels.csv"
    df.to_csv(labels, index=False)
    return labels, folder


def tiny_config(labels: Path, images: Path, **run) -> dict:
    """A two-stage run (frozen head stage, then unfrozen) on random weights at 64 px: seconds on a CPU."""
    data = [{"csv": str(labels), "images": str(images), "domain": "synthetic"}]
    stage = {"data": data, "batch_size": 8, "augment": "smartphone"}
    cfg = {"name": "tiny", "backbone": "mobilenetv2_100", "weights": "none", "input_size": 64, "n_boot": 50,
           "num_workers": 0, "device": "cpu", "split": {"val": 0.25, "test": 0.25, "seed": 0},
           "stages": [{**stage, "name": "head", "freeze_backbone": True, "epochs": 1, "lr": 1e-3,
                       "weight_decay": 0.0},
                      {**stage, "name": "finetune", "epochs": 2, "lr": 1e-3, "scheduler": "plateau"}]}
    cfg.update(run)
    return cfg


def spread_logits(model, std=2.0):
    """A random head barely reacts to its input: rescale its last layer so logits over varied inputs have
    mean 0 and std `std`, like a trained classifier's (probabilities then straddle a threshold)."""
    import torch
    g = torch.Generator().manual_seed(1)
    s = model.spec.preprocessing.input_size
    x = torch.nn.functional.interpolate(torch.randn(16, 3, 6, 6, generator=g), size=(s, s), mode="bicubic")
    with torch.no_grad():
        z = model(x).flatten()
        last = model.head[-1]
        last.weight.mul_(std / float(z.std()))
        last.bias.sub_(float(z.mean())).mul_(std / float(z.std()))


def hand_context_stage() -> dict:
    """A context stage written by hand (plain JSON, as a bundle stores it): bleeding and age raise the score."""
    from core.context import FIELDS
    thr = {"value": 0.5, "rule": "sensitivity", "target": 0.9, "chosen_on": "validation split (fused output)",
           "val_sensitivity": {"value": 0.92, "ci95": [0.8, 1.0]}, "val_specificity": {"value": 0.6, "ci95": [0.4, 0.8]},
           "val_roc_auc": {"value": 0.9, "ci95": [0.8, 0.97]}, "n_val": 30, "n_val_malignant": 12}
    cat = lambda name, **w: {"kind": "categorical", "missing": 0.0,  # noqa: E731
                             "weights": {lv: w.get(lv, 0.0) for lv in FIELDS[name].levels}}
    return {"kind": "logistic_context_fusion", "fields": ["age", "site", "bleed", "grew"], "intercept": 0.0,
            "weights": {"age": {"kind": "numeric", "weight": 1.0, "mean": 50.0, "std": 15.0, "missing": 0.0},
                        "site": cat("site", head_neck=0.5), "bleed": cat("bleed", yes=2.0, no=-1.0),
                        "grew": cat("grew", yes=1.0, no=-0.5)},
            "fusion": {"intercept": 0.0, "image": 1.0, "context": 1.0}, "missing_rule": "masked_level",
            "threshold": thr, "context_threshold": {**thr, "chosen_on": "validation split (context output)"}}


def small_model(name: str = "mobilenetv2_100", seed: int = 0, size: int = 64):
    """A random-weight classifier at `size` px whose logits are spread like a trained model's (spread_logits)."""
    import torch
    from dataclasses import replace

    from core.backbones import get_spec
    from core.model import HeadConfig, LesionClassifier
    torch.manual_seed(seed)
    spec = get_spec(name)
    spec = replace(spec, preprocessing=replace(spec.preprocessing, input_size=size))
    model = LesionClassifier(spec, HeadConfig()).eval()
    spread_logits(model)
    return model
