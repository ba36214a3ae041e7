"""Tests for `python -m train.screen`: batched probabilities in input order, verdicts, quality codes, per-file
errors that do not stop the run, and the provenance that travels with the CSV."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.backbones import get_spec
from core.bundle import load_bundle, save_bundle
from core.inference import Predictor
from core.manifest import file_sha256
from core.model import HeadConfig, LesionClassifier
from tests.conftest import spread_logits
from train.screen import main, sidecar_path

THRESHOLD = 0.45


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    spec = get_spec("mobilenetv2_100")
    spec = replace(spec, preprocessing=replace(spec.preprocessing, input_size=64))
    model = LesionClassifier(spec, HeadConfig()).eval()
    spread_logits(model)
    run = tmp_path_factory.mktemp("runs") / "demo"
    save_bundle(model, run / "bundle", threshold={"value": THRESHOLD, "rule": "fixed"},
                provenance={"run_name": "demo", "data": ["synthetic"],
                            "validation_metrics": {"roc_auc": 0.61, "recall": 0.9}})
    return run




def textured(path, size=(160, 120), seed=0, dark=False):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    img = Image.fromarray(a).resize(size, Image.BICUBIC)
    if dark:
        img = Image.fromarray((np.asarray(img) // 12).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def photo_dir(tmp_path):
    d = tmp_path / "photos"
    for i in range(5):
        textured(d / f"p{i}.jpg", seed=i)
    textured(d / "sub" / "deep.png", size=(300, 260), seed=9)
    textured(d / "dark.png", size=(300, 260), seed=10, dark=True)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (d / "notes.txt").write_text("not a photo, not listed")
    return d


def test_folder_screening_writes_rows_errors_quality_and_provenance(run_dir, photo_dir, tmp_path, capsys):
    out = tmp_path / "pred" / "predictions.csv"
    assert main(["--run", str(run_dir), "--images", str(photo_dir), "--out", str(out), "--batch-size", "3",
                 "--workers", "0", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == 8 and not any(df["image"].str.endswith(".txt"))
    broken = df[df["image"].str.endswith("broken.jpg")].iloc[0]
    assert broken["error"] and broken["prob_malignant"] == "" and broken["verdict"] == ""
    assert "broken.jpg" in captured.err and "corrupt" in captured.err
    good = df[df["error"] == ""].copy()
    good["prob_malignant"] = good["prob_malignant"].astype(float)
    assert len(good) == 7 and good["prob_malignant"].between(0, 1).all()
    assert (good["verdict"] == np.where(good["prob_malignant"] >= THRESHOLD, "malignant", "benign")).all()
    assert good["prob_malignant"].nunique() > 1
    q = dict(zip(df["image"].str.rsplit("/", n=1).str[-1], df["quality"]))
    assert "too_small" in q["p0.jpg"] and "too_dark" in q["dark.png"] and "too_small" not in q["deep.png"]
    assert (df["model_run"] == "demo").all() and (df["threshold"] == THRESHOLD).all()
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["model"]["run"] == "demo" and meta["model"]["validation_metrics"]["roc_auc"] == 0.61
    assert meta["threshold"]["value"] == THRESHOLD and meta["n_failed"] == 1 and meta["n_predicted"] == 7
    assert meta["weights_sha256"] == file_sha256(run_dir / "bundle" / "model.safetensors")
    assert meta["weights_sha256_short"] == meta["weights_sha256"][:12] == meta["model"]["weights_sha256"][:12]
    assert meta["model"]["intended_use"] and meta["preprocessing"]["input_size"] == 64
    assert "1 unreadable" in captured.out


def test_batched_probabilities_match_single_photo_predictions_in_order(run_dir, photo_dir, tmp_path):
    out = tmp_path / "p.csv"
    assert main(["--run", str(run_dir), "--images", str(photo_dir), "--out", str(out), "--batch-size", "4",
                 "--workers", "1", "--device", "cpu"]) == 0
    df = pd.read_csv(out)
    predictor = Predictor(load_bundle(run_dir), device="cpu")
    for _, row in df[df["error"].isna()].iterrows():
        single = predictor.predict_source(row["image"], cam_method=None).prob
        assert row["prob_malignant"] == pytest.approx(single, abs=2e-3)


def test_manifest_with_crops_and_labels(run_dir, photo_dir, tmp_path):
    photos = [str(photo_dir / "sub" / "deep.png")] * 2 + [str(photo_dir / "p1.jpg")]
    man = pd.DataFrame({"image": photos, "label": [1, 1, 0], "patient_id": ["a", "a", "b"],
                        "crop_left": [None, 20, None], "crop_top": [None, 30, None],
                        "crop_width": [None, 100, None], "crop_height": [None, 90, None]})
    man.to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "m_pred.csv"
    assert main(["--run", str(run_dir), "--manifest", str(tmp_path / "m.csv"), "--out", str(out),
                 "--workers", "0", "--device", "cpu"]) == 0
    df = pd.read_csv(out, dtype={"patient_id": str})
    assert list(df["label"]) == [1, 1, 0] and list(df["patient_id"]) == ["a", "a", "b"]
    assert df["prob_malignant"].iloc[0] != pytest.approx(df["prob_malignant"].iloc[1], abs=1e-6)
    assert "too_small" in df["quality"].iloc[1] and pd.isna(df["quality"].iloc[0])
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["inputs"]["manifest"].endswith("m.csv") and len(meta["inputs"]["sha256"]) == 64


@pytest.mark.parametrize("bad", ["run", "folder"])
def test_unusable_inputs_fail_with_a_message(run_dir, tmp_path, capsys, bad):
    (tmp_path / "empty").mkdir()
    run = tmp_path / "nope" if bad == "run" else run_dir
    rc = main(["--run", str(run), "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o.csv")])
    assert rc == 2
    err = capsys.readouterr().err
    assert ("no model.json" in err) if bad == "run" else ("no images" in err)
    assert not (tmp_path / "o.csv").exists()


def test_manifest_context_columns_give_fused_results(run_dir, photo_dir, tmp_path):
    from core.context import ContextModel
    from tests.conftest import hand_context_stage
    bundle = load_bundle(run_dir)
    ctx_run = tmp_path / "ctx"
    save_bundle(bundle.model, ctx_run / "bundle", threshold=bundle.meta.threshold,
                provenance=bundle.meta.provenance, context=ContextModel.from_dict(hand_context_stage()))
    photos = [photo_dir / f"p{i}.jpg" for i in range(3)]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"image": [str(p) for p in photos], "label": [1, 0, 1], "bleed": ["True", "False", None],
                  "age": [80, None, None], "biopsed": ["True", "False", "True"]}).to_csv(manifest, index=False)
    assert main(["--run", str(ctx_run), "--manifest", str(manifest), "--out", str(tmp_path / "p.csv"),
                 "--workers", "0"]) == 0
    out = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert out["inputs"].tolist() == ["photo + 2 answers", "photo + 1 answer", "photo only"]
    z = np.log(out["prob_malignant"] / (1 - out["prob_malignant"]))
    expected = 1 / (1 + np.exp(-(z[:2] + np.array([2.0 + 2.0, -1.0]))))  # bleed yes + age (80-50)/15; bleed no
    np.testing.assert_allclose(out["fused_prob"][:2], expected, atol=1e-5)
    assert out["fused_prob"][2] == out["prob_malignant"][2]  # no answer: the photo's own result and threshold
    assert out["fused_threshold"].tolist() == [0.5, 0.5, THRESHOLD]
    side = json.loads(sidecar_path(tmp_path / "p.csv").read_text())
    assert side["context_stage"]["fields"] == ["age", "site", "bleed", "grew"]
