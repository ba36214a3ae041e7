"""Tests for core.appstate: bundles in RUNS_DIR, uploaded bundle zips and the provenance text; and that no
core module the app uses imports streamlit."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import pytest

from core import appstate
from core.bundle import BundleError


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
    assert d["weights_hash"] == entries["bare"].meta.weights_sha256[:12] and len(d["weights_hash"]) == 12
    assert d["sensitivity"] == "90% (95% CI 80%–97%)" and d["specificity"].startswith("55%")
    assert d["n_val"] == 30 and "midas.csv" in d["training_data"][0] and "train 70" in d["splits"]
    assert "not a diagnostic device" in d["intended_use"]
    assert d["trained_on"] == "not recorded (a bundle written before this record)"
    assert appstate.list_bundles(tmp_path / "missing") == []


def test_a_bundle_with_a_malformed_context_section_is_listed_with_its_error(bundle_dir, tmp_path):
    from tests.conftest import hand_context_stage
    bad = tmp_path / "bad_context" / "bundle"
    bad.mkdir(parents=True)
    for f in ("model.json", "model.safetensors"):
        (bad / f).write_bytes((bundle_dir / "run_a" / "bundle" / f).read_bytes())
    meta = json.loads((bad / "model.json").read_text())
    meta["context"] = {**hand_context_stage(), "fields": ["age", "shoe_size"]}
    (bad / "model.json").write_text(json.dumps(meta))
    (entry,) = appstate.list_bundles(tmp_path)
    assert entry.meta is None and "section 'context'" in entry.error and "shoe_size" in entry.error


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
    meta = json.loads((src / "model.json").read_text()) | {"format_version": 3}
    bad = _zip({"model.json": json.dumps(meta).encode(), "model.safetensors": b"0"})
    with pytest.raises(BundleError, match="format version 3 but this tool reads version 2"):
        appstate.extract_bundle_zip(bad, tmp_path / "x")
    swapped = _zip({"model.json": (src / "model.json").read_bytes(), "model.safetensors": b"0"})
    with pytest.raises(BundleError, match="SHA-256 .* but model.json records"):
        appstate.extract_bundle_zip(swapped, tmp_path / "x")


def test_extract_bundle_zip_keeps_the_trust_parts(bundle_dir, tmp_path):
    """A bundle trained now has trust.safetensors beside the weights: an upload of it must load whole."""
    import numpy as np
    import pandas as pd

    from core.bundle import TRUST_FILE, load_bundle, save_bundle
    from core.similar import build_index
    plain = load_bundle(bundle_dir / "run_a" / "bundle")
    rows = pd.DataFrame({"image": [f"/photos/{i}.jpg" for i in range(4)], "label": [0, 1, 0, 1],
                         "split": ["train", "train", "val", "val"]})
    index = build_index(rows, np.random.default_rng(0).normal(size=(4, 1280)))
    src = save_bundle(plain.model, tmp_path / "trusted", threshold=plain.meta.threshold,
                      provenance=plain.meta.provenance, similar=index)
    files = {f"b/{p.name}": p.read_bytes() for p in src.iterdir()}
    assert f"b/{TRUST_FILE}" in files
    out = appstate.extract_bundle_zip(_zip(files), tmp_path / "x")
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors", TRUST_FILE]
    assert len(load_bundle(out).similar.records) == 4
    without = _zip({k: v for k, v in files.items() if not k.endswith(TRUST_FILE)})
    with pytest.raises(BundleError, match=f"the zip has no {TRUST_FILE}, which its model.json records"):
        appstate.extract_bundle_zip(without, tmp_path / "x")


@pytest.mark.slow  # one Python process per module
@pytest.mark.parametrize("module", ["core.appstate", "core.jobs", "core.reports", "core.photos", "core.cropbox"])
def test_app_modules_never_import_streamlit(module):
    code = f"import sys, {module}; sys.exit('streamlit' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=appstate.PROJECT_ROOT).returncode == 0


def test_describe_model_names_each_machine_and_precision_the_model_trained_with(bundle_dir):
    from dataclasses import replace
    from core.bundle import read_meta
    meta = read_meta(bundle_dir / "run_a")
    bf16 = {"device": "cpu", "processes": 1, "precision": "bf16-mixed", "precision_setting": "auto",
            "cpu_capability": "AVX512", "cpu_native_bf16": True}
    fp32 = {**bf16, "precision": "32-true", "cpu_capability": "AVX2", "cpu_native_bf16": False}
    gpu = {**bf16, "device": "cuda", "processes": 2, "precision_setting": "bf16-mixed", "gpu": "NVIDIA H200"}
    text = appstate.describe_model(replace(meta, provenance=replace(meta.provenance, trained_on=[bf16])))["trained_on"]
    assert text == "CPU (AVX512, native bf16), bf16-mixed training, chosen by precision 'auto'"
    text = appstate.describe_model(replace(meta, provenance=replace(meta.provenance,
                                                                    trained_on=[bf16, fp32, gpu])))["trained_on"]
    assert text == ("CPU (AVX512, native bf16), bf16-mixed training, chosen by precision 'auto'; CPU (AVX2), "
                    "32-true training, chosen by precision 'auto'; NVIDIA H200 x 2, bf16-mixed training (a resumed "
                    "run, or folds trained on different machines)")
    for odd in ("cpu", [None, "cpu"], {"device": "cpu"}):  # a hand-edited model.json: no claim, no crash
        assert appstate.describe_model(replace(meta, provenance=replace(meta.provenance, trained_on=odd)))[
            "trained_on"].startswith("not recorded")


def test_describe_model_gives_a_cross_validated_bundles_rules_on_new_patients_or_nothing(bundle_dir):
    """The in-sample threshold numbers get their honest counterpart (core.cv.threshold_transfer) where the bundle
    records one; a single-split bundle, an older one or a hand-edited record claims nothing and does not crash."""
    from dataclasses import replace
    from core.bundle import read_meta
    meta = read_meta(bundle_dir / "run_a")
    d = appstate.describe_model(meta)
    assert d["new_patients"] is None and d["fused_new_patients"] is None
    image = {"per_fold": [{"fold": k} for k in range(5)], "sensitivity": {"value": 0.895, "ci95": [0.85, 0.94]},
             "specificity": {"value": 0.713, "ci95": [0.65, 0.77]}}
    fused = {**image, "specificity": {"value": 0.765, "ci95": None}}
    d = appstate.describe_model(replace(meta, provenance=replace(
        meta.provenance, threshold_on_new_patients={"image": image, "fused": fused})))
    assert d["new_patients"] == ("sensitivity 90% (95% CI 85%–94%), specificity 71% (95% CI 65%–77%); each of 5 "
                                 "folds judged at the threshold the same rule chose on the other folds")
    assert d["fused_new_patients"].startswith("sensitivity 90% (95% CI 85%–94%), specificity 76%;")
    d = appstate.describe_model(replace(meta, provenance=replace(
        meta.provenance, threshold_on_new_patients={"image": None, "fused": fused})))
    assert d["new_patients"] is None and d["fused_new_patients"].startswith("sensitivity 90%")
    for odd in ("yes", {"image": "0.9"}, {"image": {"per_fold": 3, "sensitivity": 0.9}}):
        d = appstate.describe_model(replace(meta, provenance=replace(meta.provenance, threshold_on_new_patients=odd)))
        said = d["new_patients"]
        assert said is None if odd != {"image": {"per_fold": 3, "sensitivity": 0.9}} else said == (
            "sensitivity not recorded, specificity not recorded; each of ? folds judged at the threshold the same "
            "rule chose on the other folds")


def test_the_test_line_comes_from_this_models_own_test_report_only(bundle_dir, tmp_path):
    """The run's test_report.json is shown beside the validation numbers, but only when it scored these very
    weights; the built-in demo's comes from its evidence folder."""
    import shutil
    from core import builtin
    from core.bundle import read_meta
    run = tmp_path / "run"
    shutil.copytree(bundle_dir / "run_a", run)
    meta = read_meta(run / "bundle")
    assert appstate.describe_model(meta)["test"] is None  # no report beside it
    report = {"metrics": {"recall": {"value": 0.9, "ci95": [0.75, 1.0]}, "specificity": {"value": 0.5, "ci95": None},
                          "roc_auc": {"value": 0.81, "ci95": [0.7, 0.9]}},
              "n": 40, "n_positive": 16, "n_groups": 31, "model": {"weights_sha256": "0" * 64}}
    (run / "test_report.json").write_text(json.dumps(report))
    assert appstate.describe_model(meta)["test"] is None  # it scored other weights
    report["model"]["weights_sha256"] = meta.weights_sha256
    (run / "test_report.json").write_text(json.dumps(report))
    assert appstate.describe_model(meta)["test"] == (
        "sensitivity 90% (95% CI 75%–100%), specificity 50%, ROC-AUC 0.810 [0.70, 0.90] on 40 test photos "
        "(16 malignant, 31 patients), evaluated once after the model and its threshold were chosen")
    (run / "test_report.json").write_text("{not json")
    assert appstate.describe_model(meta)["test"] is None
    demo = appstate.describe_model(read_meta(builtin.DEMO_BUNDLE))["test"]
    shipped = json.loads((builtin.DEMO_EVIDENCE / "test_report.json").read_text())
    assert demo.startswith(f"sensitivity {round(100 * shipped['metrics']['recall']['value'])}%")
    assert f"on {shipped['n']} test photos" in demo


def test_training_data_names_each_dataset_once_with_the_stages_that_used_it(bundle_dir):
    from dataclasses import replace
    from core.bundle import read_meta
    meta = read_meta(bundle_dir / "run_a")
    pad = {"metadata": "/d/pad/metadata.csv", "domain": "pad_ufes_20", "images": 518, "malignant": 200}
    isic = {"csv": "/d/isic/labels.csv", "domain": "isic", "images": 300, "malignant": 90}
    prov = replace(meta.provenance, data=[[isic, pad], [pad]], stages=[{"name": "head"}, {"name": "finetune"}])
    assert appstate.describe_model(replace(meta, provenance=prov))["training_data"] == [
        "isic: 300 images, 90 malignant (from labels.csv); stage head",
        "pad_ufes_20: 518 images, 200 malignant (from metadata.csv); stages head, finetune"]
    # the same, said to a clinician (the Predict page's refusal): each dataset once, no files or stages
    assert appstate.describe_model(replace(meta, provenance=prov))["training_sets"] == (
        "isic (300 photos), pad_ufes_20 (518 photos)")
    assert appstate.describe_model(replace(meta, provenance=replace(prov, data=None)))["training_sets"] == \
        "not recorded"
