"""Model bundles: round trip without code execution, and clear errors for anything else."""
from __future__ import annotations

import json

import pytest
import torch

from core.backbones import get_spec
from core.bundle import FORMAT_VERSION, INTENDED_USE, BundleError, load_bundle, read_meta, save_bundle
from core.model import HeadConfig, LesionClassifier

THRESHOLD = {"value": 0.3, "rule": "sensitivity", "target": 0.9,
             "val_sensitivity": {"value": 0.9, "ci95": [0.8, 1.0]},
             "val_specificity": {"value": 0.5, "ci95": [0.4, 0.6]}}


@pytest.fixture
def bundle_dir(tmp_path):
    torch.manual_seed(0)
    model = LesionClassifier(get_spec("resnet18"), HeadConfig(dropout=0.3), weights="none").eval()
    save_bundle(model, tmp_path / "b", threshold=THRESHOLD, provenance={"run_name": "t"})
    return tmp_path / "b", model


def test_round_trip_gives_identical_outputs(bundle_dir):
    folder, model = bundle_dir
    loaded = load_bundle(folder)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert loaded.threshold == 0.3
    assert loaded.spec.name == "resnet18" and loaded.model.head_cfg.dropout == 0.3
    assert not loaded.model.training


def test_description_carries_preprocessing_labels_and_intended_use(bundle_dir):
    meta = read_meta(bundle_dir[0])
    assert meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["labels"] == {"0": "benign", "1": "malignant"}
    assert meta["intended_use"] == INTENDED_USE and "not a diagnostic device" in INTENDED_USE
    assert meta["threshold"]["val_sensitivity"]["ci95"] == [0.8, 1.0]


def test_a_run_folder_resolves_to_its_bundle(bundle_dir, tmp_path):
    folder, _ = bundle_dir
    run = tmp_path / "run"
    run.mkdir()
    folder.rename(run / "bundle")
    assert load_bundle(run).path == run / "bundle"


def test_other_format_version_is_a_clear_error(bundle_dir):
    folder, _ = bundle_dir
    meta = json.loads((folder / "model.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=f"version {FORMAT_VERSION + 1} but this tool reads version"):
        load_bundle(folder)


def test_weights_that_do_not_match_the_description(bundle_dir):
    folder, _ = bundle_dir
    meta = json.loads((folder / "model.json").read_text())
    meta["head"]["hidden"] = 128
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="weights do not match"):
        load_bundle(folder)


def test_missing_weights_or_description(bundle_dir, tmp_path):
    folder, _ = bundle_dir
    (folder / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors is missing"):
        load_bundle(folder)
    with pytest.raises(BundleError, match="no model.json"):
        load_bundle(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)
