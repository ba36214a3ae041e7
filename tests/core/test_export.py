"""Tests for core.export / `python -m train.export`: a dynamic-batch ONNX file that onnxruntime runs with
PyTorch's probabilities, a sidecar with preprocessing, threshold and provenance, and a check that can fail."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, replace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from core.backbones import get_spec
from core.bundle import load_bundle, save_bundle
from core.export import ExportError, _ProbModel, example_inputs, export_onnx, sidecar_path, verify_onnx
from core.manifest import file_sha256
from core.model import HeadConfig, LesionClassifier
from train.export import main

pytestmark = pytest.mark.slow  # exports and checks an ONNX model

SIZE = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = get_spec("mobilenetv2_100")
    spec = replace(spec, preprocessing=replace(spec.preprocessing, input_size=SIZE))
    model = LesionClassifier(spec, HeadConfig()).eval()
    with torch.no_grad():
        for p in model.parameters():  # random BN running stats are trivial; make the graph do real work
            p.add_(0.01 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("export")
    save_bundle(model, root / "run" / "bundle", threshold={"value": 0.37, "rule": "sensitivity", "target": 0.9},
                provenance={"run_name": "export-test", "validation_metrics": {"roc_auc": 0.7}})
    onnx_path = root / "out" / "model.onnx"
    rc = main(["--run", str(root / "run"), "--onnx", str(onnx_path)])
    yield {"rc": rc, "onnx": onnx_path, "bundle": load_bundle(root / "run"), "root": root}
    torch.set_num_threads(before)


def test_cli_writes_the_model_and_the_sidecar(exported, capsys):
    assert exported["rc"] == 0
    assert exported["onnx"].is_file() and sidecar_path(exported["onnx"]).is_file()


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_pytorch_at_other_batch_sizes(exported, batch):
    sess = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    x = example_inputs(SIZE, batch, seed=7)
    logit, prob = sess.run(["logit", "prob_malignant"], {"image": x.numpy()})
    with torch.no_grad():
        ref = torch.sigmoid(exported["bundle"].model(x)).numpy()
    assert prob.shape == (batch, 1)
    assert np.abs(prob - ref).max() < 1e-4
    assert np.allclose(1 / (1 + np.exp(-logit)), prob, atol=1e-6)


def test_sidecar_carries_preprocessing_threshold_and_provenance(exported):
    meta = json.loads(sidecar_path(exported["onnx"]).read_text())
    pp = asdict(exported["bundle"].spec.preprocessing)
    for key in ("mean", "std", "input_size", "crop_pct", "interpolation"):
        assert meta["preprocessing"][key] == (list(pp[key]) if isinstance(pp[key], tuple) else pp[key])
    assert meta["preprocessing"]["resize_to"] == exported["bundle"].spec.preprocessing.resize_to
    assert meta["threshold"]["value"] == 0.37 and meta["threshold"]["rule"] == "sensitivity"
    assert meta["provenance"]["run"] == "export-test"
    assert meta["provenance"]["validation_metrics"] == {"roc_auc": 0.7}
    assert meta["provenance"]["weights_sha256"] == file_sha256(
        exported["root"] / "run" / "bundle" / "model.safetensors")
    assert meta["onnx_sha256"] == file_sha256(exported["onnx"])
    v = meta["verification"]
    assert v["passed"] and v["batch"] != 2 and v["max_abs_prob_diff"] <= 1e-4
    assert meta["intended_use"] and isinstance(meta["opset"], int)


def test_the_check_fails_when_the_graph_differs_from_the_model(exported):
    other = copy.deepcopy(exported["bundle"].model).eval()
    with torch.no_grad():
        other.head[-1].bias.add_(1.0)
    with pytest.raises(ExportError, match="differ from PyTorch"):
        verify_onnx(exported["onnx"], _ProbModel(other).eval(), SIZE, 3, 1e-4)


def test_batch_of_one_example_is_refused(exported, tmp_path):
    with pytest.raises(ValueError, match=">= 2"):
        export_onnx(exported["bundle"], tmp_path / "m.onnx", example_batch=1)
    with pytest.raises(ValueError, match="differ"):
        export_onnx(exported["bundle"], tmp_path / "m.onnx", example_batch=3, check_batch=3)


def test_missing_run_is_a_clean_error(tmp_path, capsys):
    assert main(["--run", str(tmp_path / "none"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "no model.json" in capsys.readouterr().err
