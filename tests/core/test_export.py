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
    assert "none: not found" in capsys.readouterr().err
    (tmp_path / "model.onnx").mkdir()  # a folder in the way: said before the export, not as an export failure
    assert main(["--run", "demo", "--onnx", str(tmp_path / "model.onnx")]) == 2
    assert "model.onnx: is a folder" in capsys.readouterr().err


def test_an_ensemble_exports_as_one_graph_with_its_members_gate(exported, tmp_path):
    from core import ood
    from core.bundle import Threshold
    from core.ensemble import save_ensemble
    from core.trust import features_and_logits
    first = exported["bundle"]
    torch.manual_seed(3)
    second = copy.deepcopy(first.model)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.01 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    dim = first.model.backbone.num_features
    gates = [ood.fit_gate(rng.normal(0, 1, (40, dim)), rng.normal(0, 1, (20, dim))) for _ in range(2)]
    for i, m in enumerate((first.model, second)):
        save_bundle(m, tmp_path / f"m{i}", threshold={"value": 0.37, "rule": "fixed"}, gate=gates[i])
    members = [load_bundle(tmp_path / f"m{i}") for i in range(2)]
    save_ensemble(members, tmp_path / "ens", threshold=Threshold(0.37, rule="fixed"), provenance={"run_name": "cv"})
    ens = load_bundle(tmp_path / "ens")
    onnx_path = tmp_path / "ens.onnx"
    sidecar = export_onnx(ens, onnx_path)
    assert sidecar["verification"]["passed"] and sidecar["ensemble"]["members"] == 2
    assert "member_probs" in sidecar["outputs"]
    x = example_inputs(SIZE, 3, seed=5)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    prob, feats, ood_score, member_probs = sess.run(["prob_malignant", "features", "ood_score", "member_probs"],
                                                   {"image": x.numpy()})
    with torch.no_grad():
        singles = np.concatenate([torch.sigmoid(m.model(x)).numpy() for m in members], axis=1)
    assert np.allclose(member_probs, singles, atol=1e-4)
    assert np.allclose(prob[:, 0], singles.mean(1), atol=1e-4)
    assert np.allclose(ood_score[:, 0], ens.gate.score(feats.astype(np.float64)), rtol=1e-3)  # the app's gate


def test_a_failed_export_keeps_the_last_good_file_and_its_sidecar(exported, tmp_path):
    """The graph was written straight to --onnx: a failed check left a file its sidecar no longer described."""
    import shutil
    onnx_path = tmp_path / "model.onnx"
    shutil.copy(exported["onnx"], onnx_path)
    shutil.copy(sidecar_path(exported["onnx"]), sidecar_path(onnx_path))
    good, sidecar = file_sha256(onnx_path), sidecar_path(onnx_path).read_text()
    with pytest.raises(ExportError, match=f"{onnx_path}: onnxruntime probabilities differ from PyTorch"):
        export_onnx(exported["bundle"], onnx_path, tolerance=-1.0)  # every check fails
    with pytest.raises(ExportError, match="opset 5 was asked for, but the exporter .* wrote opset"):
        export_onnx(exported["bundle"], onnx_path, opset=5)
    assert file_sha256(onnx_path) == good and sidecar_path(onnx_path).read_text() == sidecar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.json"]  # no partial files
