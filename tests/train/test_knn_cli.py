"""End-to-end tests of `python -m train.knn` on tiny separable synthetic photos with a random-weight backbone."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.manifest import read_manifest, write_manifest
from train import knn as cli

FAST = ["--backbone", "mobilenetv2_100", "--weights", "none", "--input-size", "32", "--device", "cpu",
        "--workers", "0", "--n-boot", "50"]
REPORT_KEYS = {"metrics", "confusion_matrix", "threshold", "n", "roc", "split", "subgroups", "predictions",
               "model", "knn", "manifest"}


def make_manifest(root: Path, n: int = 60) -> pd.DataFrame:
    """Malignant photos reddish, benign bluish: separable for any reasonable feature extractor."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = i % 2
        mean = (190, 90, 80) if label else (90, 100, 180)
        px = np.clip(np.asarray(mean) + rng.normal(0, 35, (20, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(root / f"{i}.png")
        rows.append({"image": str(root / f"{i}.png"), "label": label, "patient_id": f"p{i // 2}"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def split_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    df = make_manifest(root / "img")
    df["split"] = np.where(np.arange(60) < 36, "train", np.where(np.arange(60) < 48, "val", "test"))
    return write_manifest(df, root / "split.csv")


def run(tmp_path, manifest, name, *extra):
    out = tmp_path / name
    assert cli.main(["--manifest", str(manifest), "--out", str(out), "--cache", str(tmp_path / "cache"),
                     *FAST, *extra]) == 0
    return [json.loads((out / f"{s}_report.json").read_text()) for s in ("val", "test")]


@pytest.mark.slow
def test_reports_structure_and_high_auc(tmp_path, split_manifest, capsys):
    val, test = run(tmp_path, split_manifest, "a")
    for rep, split, n in ((val, "val", 12), (test, "test", 12)):
        assert REPORT_KEYS <= set(rep) and rep["split"] == split and rep["n"] == n
        assert rep["threshold"] == 0.5
        assert rep["model"]["backbone"] == "mobilenetv2_100" and rep["model"]["run"].startswith("knn-k")
    info = val["knn"]
    assert info["k"] in info["k_grid"] and info["n_train"] == 36 and info["standardize"] is False
    assert [c["k"] for c in info["validation_curve"]] == list(range(1, 26, 2))
    assert test["metrics"]["roc_auc"]["value"] > 0.9
    assert test["model"]["validation_metrics"] == val["metrics"]
    printed = capsys.readouterr().out
    assert "ROC-AUC" in printed and f"KNN k={info['k']} mobilenetv2_100 (test)" in printed


@pytest.mark.slow
def test_test_labels_never_influence_k(tmp_path, split_manifest):
    df = read_manifest(split_manifest)
    test = df["split"] == "test"
    df.loc[test, "label"] = 1 - df.loc[test, "label"].to_numpy()  # flip every test label
    flipped = write_manifest(df, tmp_path / "flipped.csv")
    val_a, test_a = run(tmp_path, split_manifest, "a")
    val_b, test_b = run(tmp_path, flipped, "b")
    assert val_a["knn"]["k"] == val_b["knn"]["k"]
    assert val_a["knn"]["validation_curve"] == val_b["knn"]["validation_curve"]
    assert val_a["metrics"] == val_b["metrics"]
    assert test_b["metrics"]["roc_auc"]["value"] < 0.1  # same predictions, flipped truth
    assert val_b["knn"]["timings"]["embeddings_computed"] == 0  # the second run came from the cache


@pytest.mark.slow
def test_manifest_without_split_is_split_by_patient(tmp_path):
    manifest = write_manifest(make_manifest(tmp_path / "img"), tmp_path / "m.csv")
    val, _ = run(tmp_path, manifest, "c", "--standardize", "--k", "1,3,5")
    saved = read_manifest(tmp_path / "c" / "split_manifest.csv")
    assert set(saved["split"]) == {"train", "val", "test"}
    assert saved.groupby("patient_id")["split"].nunique().max() == 1
    assert "grouped by patient_id" in val["knn"]["split"] and val["knn"]["standardize"] is True
    assert [c["k"] for c in val["knn"]["validation_curve"]] == [1, 3, 5]


def test_bad_k_and_missing_split_rows(tmp_path, split_manifest, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--manifest", str(split_manifest), "--out", str(tmp_path / "x"), "--k", "0,3"])
    df = read_manifest(split_manifest)
    df.loc[0, "split"] = None
    bad = write_manifest(df, tmp_path / "bad.csv")
    assert cli.main(["--manifest", str(bad), "--out", str(tmp_path / "x"), *FAST]) == 2
    assert "rows have no split" in capsys.readouterr().err


@pytest.mark.slow
def test_default_cache_makes_a_second_run_compute_nothing(tmp_path, split_manifest, monkeypatch):
    monkeypatch.setenv("SKINSCREEN_CACHE", str(tmp_path / "user"))
    infos = []
    for name in ("a", "b"):
        assert cli.main(["--manifest", str(split_manifest), "--out", str(tmp_path / name), *FAST]) == 0
        infos.append(json.loads((tmp_path / name / "val_report.json").read_text())["knn"]["timings"])
    assert infos[0]["embeddings_computed"] == 60 and infos[1]["embeddings_computed"] == 0
    assert infos[1]["embeddings_from_cache"] == 60
    assert infos[1]["embedding_cache"] == str(tmp_path / "user" / "embeddings")
