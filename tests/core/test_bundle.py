"""Model bundles: round trip without code execution, typed metadata, weights integrity, and clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from core.backbones import get_spec
from core.bundle import (FORMAT_VERSION, INTENDED_USE, BundleError, BundleMeta, Provenance, Threshold, load_bundle,
                         read_meta, save_bundle)
from core.manifest import file_sha256
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
    assert meta.preprocessing["mean"] == [0.485, 0.456, 0.406]
    assert meta.labels == {"0": "benign", "1": "malignant"}
    assert meta.intended_use == INTENDED_USE and "not a diagnostic device" in INTENDED_USE
    assert meta.threshold.val_sensitivity["ci95"] == [0.8, 1.0] and meta.threshold.rule == "sensitivity"
    assert meta.provenance.run_name == "t" and meta.folder == bundle_dir[0]
    assert meta.weights_sha256 == file_sha256(bundle_dir[0] / "model.safetensors")
    assert meta.short_hash == meta.weights_sha256[:12] and meta.summary()["weights_sha256"] == meta.weights_sha256


def test_model_json_is_readable_json_and_round_trips(bundle_dir):
    raw = json.loads((bundle_dir[0] / "model.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION == 2 and raw["threshold"]["value"] == 0.3
    assert raw["provenance"]["run_name"] == "t" and len(raw["weights_sha256"]) == 64
    meta = BundleMeta.from_dict(raw)
    assert meta.to_dict() == raw and BundleMeta.from_dict(meta.to_dict()) == meta


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
    with pytest.raises(BundleError, match=f"version {FORMAT_VERSION + 1} but this tool reads version {FORMAT_VERSION}"):
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


def _as_version_1(folder):
    """Rewrite model.json exactly as the version-1 code wrote it: the same keys, no weights hash."""
    meta = json.loads((folder / "model.json").read_text())
    del meta["weights_sha256"]
    meta["format_version"] = 1
    assert set(meta) == {"format", "format_version", "backbone", "head", "preprocessing", "threshold", "labels",
                         "output", "intended_use", "provenance"}
    (folder / "model.json").write_text(json.dumps(meta, indent=2))


def test_a_version_1_bundle_still_loads_and_says_it_has_no_hash(bundle_dir):
    folder, model = bundle_dir
    _as_version_1(folder)
    loaded = load_bundle(folder)
    assert loaded.meta.format_version == 1 and loaded.meta.weights_sha256 is None and loaded.meta.short_hash is None
    assert loaded.threshold == 0.3 and loaded.meta.provenance.run_name == "t"
    from core.appstate import describe_model
    assert describe_model(loaded.meta)["weights_hash"] == "not recorded (format-1 bundle)"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))


def test_weights_swapped_for_another_model_of_the_same_architecture_are_refused(bundle_dir, tmp_path):
    folder, _ = bundle_dir
    torch.manual_seed(1)
    other = LesionClassifier(get_spec("resnet18"), HeadConfig(dropout=0.3), weights="none").eval()
    save_bundle(other, tmp_path / "other", threshold=THRESHOLD, provenance={"run_name": "other"})
    recorded = read_meta(folder).weights_sha256
    swapped = file_sha256(tmp_path / "other" / "model.safetensors")
    (folder / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(BundleError) as e:
        load_bundle(folder)
    assert recorded in str(e.value) and swapped in str(e.value) and "model.safetensors" in str(e.value)
    _as_version_1(folder)  # without a recorded hash the swap cannot be seen: the model loads
    assert load_bundle(folder).meta.provenance.run_name == "t"


def test_unknown_keys_refused_at_the_top_and_in_the_threshold_kept_in_provenance(bundle_dir):
    folder, _ = bundle_dir
    raw = json.loads((folder / "model.json").read_text())
    with pytest.raises(BundleError, match="unknown key.*conformal_sets"):
        BundleMeta.from_dict({**raw, "conformal_sets": {"a": 1}})
    with pytest.raises(BundleError, match="threshold: unknown key.*margin"):
        BundleMeta.from_dict({**raw, "threshold": {**raw["threshold"], "margin": 0.1}})
    meta = BundleMeta.from_dict({**raw, "provenance": {**raw["provenance"], "note": "by hand"}})
    assert meta.provenance.extra == {"note": "by hand"} and meta.to_dict()["provenance"]["note"] == "by hand"
    with pytest.raises(BundleError, match="must record weights_sha256"):
        BundleMeta.from_dict({k: v for k, v in raw.items() if k != "weights_sha256"})
    with pytest.raises(BundleError, match="'value' must be a number"):
        BundleMeta.from_dict({**raw, "threshold": {"value": "0.3"}})
    with pytest.raises(BundleError, match="not a skinscreen-model-bundle"):
        BundleMeta.from_dict({**raw, "format": "other"})


def test_typed_parts_and_their_dict_form_save_the_same(tmp_path):
    model = LesionClassifier(get_spec("resnet18"), HeadConfig(), weights="none")
    save_bundle(model, tmp_path / "a", threshold=Threshold(**THRESHOLD), provenance=Provenance(run_name="t"))
    save_bundle(model, tmp_path / "b", threshold=THRESHOLD, provenance={"run_name": "t"})
    assert read_meta(tmp_path / "a") == read_meta(tmp_path / "b")


def test_a_malformed_context_section_is_a_bundle_error_naming_file_and_section(bundle_dir):
    """ContextModel raises its own ContextError; readers that skip unusable bundles catch only BundleError."""
    from tests.conftest import hand_context_stage
    folder, _ = bundle_dir
    raw = json.loads((folder / "model.json").read_text())
    stage = hand_context_stage()
    (folder / "model.json").write_text(json.dumps({**raw, "context": {**stage, "fields": ["age", "shoe_size"]}}))
    with pytest.raises(BundleError, match=r"model\.json: section 'context' unreadable .*shoe_size"):
        read_meta(folder)
    with pytest.raises(BundleError, match="section 'context'.*lacks 'fusion'"):
        BundleMeta.from_dict({**raw, "context": {k: v for k, v in stage.items() if k != "fusion"}})
    assert BundleMeta.from_dict({**raw, "context": stage}).context.fields == ("age", "site", "bleed", "grew")


def test_bundle_file_names_are_spelled_only_in_core_bundle():
    """One module owns the bundle's file names; everyone else uses its constants (a rename then reaches them all)."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    literal = re.compile(r"""["'](model\.json|model\.safetensors|trust\.safetensors)["']""")
    found = [f"{p.relative_to(root)}:{n}: {line.strip()}"
             for folder in ("core", "train", "ui", "pages") for p in sorted((root / folder).rglob("*.py"))
             if p != root / "core" / "bundle.py"
             for n, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert found == []


def test_a_format_1_bundle_with_cut_weights_or_a_model_nobody_can_build_is_a_bundle_error(bundle_dir):
    """A version-1 bundle has no hash to catch a truncated weights file first; a model.json naming a backbone this
    tool does not know describes a model it cannot build: neither is 'weights do not match'."""
    folder, _ = bundle_dir
    _as_version_1(folder)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(BundleError, match=r"model.safetensors: not a readable weights file, damaged or truncated"):
        load_bundle(folder)
    (folder / "model.safetensors").write_bytes(weights)
    meta = json.loads((folder / "model.json").read_text())
    meta["backbone"]["timm_name"] = "convnext_gigantic_9000"
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="describes a model this tool cannot build"):
        load_bundle(folder)


@pytest.mark.parametrize("edit, said", [
    (lambda d: d.update(backbone="resnet18"), "section 'backbone' unreadable"),
    (lambda d: d["backbone"]["preprocessing"].update(input_size=0), "input_size must be a whole number"),
    (lambda d: d["backbone"]["preprocessing"].update(input_size="big"), "input_size must be a whole number"),
    (lambda d: d["backbone"]["preprocessing"].update(std=[0, 0, 0]), "std > 0"),
    (lambda d: d["backbone"]["preprocessing"].update(mean=[0.5]), "3 numbers each"),
    (lambda d: d["backbone"]["preprocessing"].update(interpolation="lanczos"), "interpolation must be one of"),
    (lambda d: d.update(format_version="2"), "bundle format version '2' but this tool reads version 2"),
])
def test_a_hand_edited_model_json_is_a_bundle_error_before_any_photo_is_read(bundle_dir, edit, said):
    """Each of these reached the user as a traceback (or, std 0, as NaN features mid-screening)."""
    folder, _ = bundle_dir
    raw = json.loads((folder / "model.json").read_text())
    edit(raw)
    (folder / "model.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=said):
        read_meta(folder)


def test_a_model_json_that_is_not_utf8_is_named(bundle_dir):
    folder, _ = bundle_dir
    (folder / "model.json").write_bytes(b"\xff\xfe" + (folder / "model.json").read_bytes())
    with pytest.raises(BundleError, match="model.json: not valid JSON in UTF-8"):
        read_meta(folder)
