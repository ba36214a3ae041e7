"""The trust parts end to end: fitted at the end of training from train/val only, stored in the bundle, and applied
the same way by the app's Predictor, train.screen, train.evaluate and the ONNX export."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from core.backbones import get_spec
from core import ood
from core.bundle import load_bundle, save_bundle
from core.inference import Predictor
from core.model import HeadConfig, LesionClassifier
from core.trust import NOT_ASSESSED, assess, fit_trust
from tests.conftest import make_images, spread_logits

pytestmark = pytest.mark.usefixtures("one_thread")
THRESHOLD = 0.5


def _junk(folder):
    """Far-away inputs: a screenshot-like page of text, and saturated stripes."""
    page = Image.new("RGB", (200, 160), (250, 240, 215))  # cream paper: colour, so the gate (not quality) refuses it
    d = ImageDraw.Draw(page)
    for y in range(5, 160, 12):
        d.text((5, y), "lorem ipsum dolor sit amet 0123", fill=(20, 40, 150))
    page.save(folder / "page.png")
    stripes = np.zeros((160, 200, 3), np.uint8)
    stripes[:, ::8] = (0, 255, 0)
    stripes[::8] = (255, 0, 255)
    Image.fromarray(stripes).save(folder / "stripes.png")
    Image.new("RGB", (200, 160), (0, 0, 0)).save(folder / "black.png")
    return [folder / "page.png", folder / "stripes.png", folder / "black.png"]


@pytest.fixture(scope="module")
def trusted(tmp_path_factory):
    base = tmp_path_factory.mktemp("trust")
    df = make_images(base / "images", n=60, size=(128, 112))  # above the far-too-small refusal
    df["image"] = [str(base / "images" / i) for i in df["image"]]
    df["split"] = ["train"] * 30 + ["val"] * 20 + ["test"] * 10
    torch.manual_seed(0)
    spec = get_spec("mobilenetv2_100")
    spec = replace(spec, preprocessing=replace(spec.preprocessing, input_size=64))
    model = LesionClassifier(spec, HeadConfig()).eval()
    spread_logits(model)
    parts = fit_trust(model, df, seed=0)
    folder = save_bundle(model, base / "run" / "bundle", threshold={"value": THRESHOLD, "rule": "fixed"},
                         provenance={"run_name": "trusted"}, gate=parts.gate, calibration=parts.calibration,
                         similar=parts.similar)
    return {"base": base, "df": df, "bundle": folder, "parts": parts, "junk": _junk(base)}


def test_fit_reads_train_and_val_only_and_the_bundle_keeps_it(trusted):
    parts, df = trusted["parts"], trusted["df"]
    assert parts.gate.n_reference == 30 and parts.gate.n_validation == 20 and parts.calibration.n == 20
    assert {r["split"] for r in parts.similar.records} == {"train", "val"} and len(parts.similar.records) == 50
    b = load_bundle(trusted["bundle"])
    assert b.lacks() == [] and b.gate.threshold == parts.gate.threshold
    assert b.calibration == parts.calibration and len(b.similar.records) == 50
    meta = json.loads((trusted["bundle"] / "model.json").read_text())
    assert meta["ood_gate"]["method"] == ood.DEFAULT_METHOD and len(meta["trust_arrays"]["sha256"]) == 64
    assert "records" not in meta["similar_cases"]  # references live beside the arrays, model.json stays small
    # small: no D x D matrix, float16 similar-case embeddings (2 bytes a feature), plus the records
    assert all(a.shape != (1280, 1280) for a in parts.gate.arrays.values())
    arrays = sum(a.nbytes for a in parts.gate.arrays.values()) + parts.similar.embeddings.nbytes
    assert parts.similar.embeddings.nbytes == 50 * 1280 * 2
    assert (trusted["bundle"] / "trust.safetensors").stat().st_size < arrays + 20_000 < 1_000_000


def test_a_changed_trust_file_is_refused(trusted, tmp_path):
    import shutil
    from core.bundle import BundleError
    copy = tmp_path / "b"
    shutil.copytree(trusted["bundle"], copy)
    data = bytearray((copy / "trust.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "trust.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="trust.safetensors: SHA-256 differs"):
        load_bundle(copy)


def test_older_bundle_without_trust_parts_loads_and_says_what_it_lacks(trusted, tmp_path):
    b = load_bundle(trusted["bundle"])
    old = save_bundle(b.model, tmp_path / "old", threshold={"value": THRESHOLD}, provenance={"run_name": "old"})
    plain = load_bundle(old)
    assert plain.gate is None and plain.calibration is None and plain.similar is None
    assert len(plain.lacks()) == 3 and "no out-of-distribution gate" in plain.lacks()[0]
    pred = Predictor(plain, device="cpu", fast=False).predict_source(trusted["df"]["image"][55], cam_method=None)
    assert pred.verdict in ("flagged", "not flagged") and pred.prob_calibrated is None and pred.similar == []
    assert len(pred.lacks) == 3


def test_predictor_gives_verdicts_refusals_and_similar_cases(trusted):
    predictor = Predictor(load_bundle(trusted["bundle"]), device="cpu", fast=False)
    own = predictor.predict_source(trusted["df"]["image"][3], cam_method=None)  # a training photo
    assert own.assessed and own.similar[0].image == trusted["df"]["image"][3]
    assert own.similar[0].similarity == pytest.approx(1.0, abs=1e-3) and own.similar[0].available
    assert own.verdict == ("flagged" if own.prob >= THRESHOLD else "not flagged")
    assert (own.prob_calibrated >= own.threshold_calibrated) == (own.prob >= THRESHOLD)
    page, stripes, black = (predictor.predict_source(p, cam_method=None) for p in trusted["junk"])
    for p in (page, stripes):
        assert p.verdict == NOT_ASSESSED and p.assessment.refusal == "out_of_distribution"
        assert p.not_assessed_reason.startswith("This photo does not look like the photos this model was trained on")
    assert black.verdict == NOT_ASSESSED and black.assessment.refusal == "quality"
    for p in (page, stripes, black):  # no result of any kind beside a refusal: no fused score, no similar cases
        assert p.fused is None and p.similar == []


def test_not_assessed_rows_are_neither_correct_nor_incorrect_examples():
    from core.reports import example_predictions
    from core.trust import attach
    report = {"threshold": 0.5, "predictions": [{"image": "a", "label": 1, "prob": 0.9, "pred": 1},
                                                {"image": "b", "label": 0, "prob": 0.99, "pred": 1}]}
    per_image = [{"verdict": "flagged", "not_assessed_reason": None},
                 {"verdict": NOT_ASSESSED, "not_assessed_reason": "out of distribution"}]
    attach(report, {"per_image": per_image})
    assert report["predictions"][1]["pred"] is None
    shown = example_predictions(report)
    assert [r["image"] for r in shown["correct"]] == ["a"] and shown["incorrect"] == []


def test_screen_evaluate_app_and_onnx_agree_on_the_same_photos(trusted, tmp_path):
    import onnxruntime as ort

    from core.export import export_onnx
    from train.evaluate import main as evaluate_main
    from train.screen import main as screen_main
    df = trusted["df"]
    photos = list(df["image"][50:56]) + [str(p) for p in trusted["junk"][:2]]
    man = pd.DataFrame({"image": photos, "label": [int(v) for v in df["label"][50:56]] + [0, 0],
                        "patient_id": [f"x{i}" for i in range(8)]})
    man.to_csv(tmp_path / "m.csv", index=False)
    run = trusted["bundle"].parent
    assert screen_main(["--run", str(run), "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "s.csv"),
                        "--workers", "0", "--device", "cpu"]) == 0
    screened = pd.read_csv(tmp_path / "s.csv", keep_default_na=False)
    assert evaluate_main(["--run", str(run), "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "r.json"),
                          "--n-boot", "50", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    bundle = load_bundle(run)
    predictor = Predictor(bundle, device="cpu", fast=False)
    sidecar = export_onnx(bundle, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for i, path in enumerate(photos):
        app = predictor.predict_source(path, cam_method=None)
        row, rep = screened.iloc[i], report["predictions"][i]
        assert row["verdict"] == rep["verdict"] == app.verdict, path
        assert float(row["raw_score"]) == pytest.approx(app.prob, abs=1e-4) == rep["prob"]
        if app.assessed:
            assert float(row["prob_calibrated"]) == pytest.approx(app.prob_calibrated, abs=1e-4)
            lo, hi = app.prob_calibrated_ci95  # the CSV carries the app's interval
            assert float(row["prob_calibrated_low"]) == pytest.approx(lo, abs=1e-5) and lo <= app.prob_calibrated
            assert float(row["prob_calibrated_high"]) == pytest.approx(hi, abs=1e-5) and hi >= app.prob_calibrated
        else:  # no calibrated probability for a photo the model cannot assess; the raw score stays
            assert row["prob_calibrated"] == "" and rep["prob_calibrated"] is None
            assert row["prob_calibrated_low"] == row["prob_calibrated_high"] == "" and app.interval_note is None
        assert float(row["ood_score"]) == pytest.approx(app.assessment.ood_score, abs=1e-4)
        x = predictor.prepare(Image.open(path).convert("RGB"))[0].float().contiguous().numpy()
        out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": x})))
        gate_ok = out["ood_score"][0, 0] <= sidecar["ood_gate"]["threshold"]
        assert gate_ok == (app.assessment.refusal != "out_of_distribution"), path
        raw = 1 / (1 + np.exp(-(bundle.calibration.slope * out["logit"][0, 0] + bundle.calibration.intercept)))
        assert out["prob_calibrated"][0, 0] == pytest.approx(raw, abs=1e-4)
        if app.assessed:
            assert out["prob_calibrated"][0, 0] == pytest.approx(app.prob_calibrated, abs=1e-4)
    t = report["trust"]
    assert t["n_refused_by_gate"] == 2 and t["lacks"] == []
    assert "calibration_after" in t and t["calibration_before"]["brier"]["ci95"] is not None
    assert t["accepted_metrics"]["n"] == 6


def test_assess_order_quality_then_gate_then_threshold():
    from core.ood import GateResult
    from core.quality import QualityWarning
    far = GateResult(False, 0.9, 0.3, "its distance is 0.9")
    near = GateResult(True, 0.1, 0.3, None)
    refusal = QualityWarning("far_too_dark", "almost black; retake in daylight", True)
    assert assess(0.9, 0.5, gate_result=far, quality=[refusal]).refusal == "quality"
    assert assess(0.9, 0.5, gate_result=far).refusal == "out_of_distribution"
    assert assess(0.9, 0.5, gate_result=near, quality=[QualityWarning("blurry", "x")]).verdict == "flagged"
    assert assess(0.2, 0.5, gate_result=near).verdict == "not flagged"


def test_train_trust_upgrade_keeps_the_context_stage(trusted, tmp_path):
    """Upgrading a run (refitting the trust parts) rewrites its bundle: its other sections must survive."""
    from core.context import ContextModel
    from core.manifest import write_manifest
    from core.runfolder import BUNDLE, split_path
    from tests.conftest import hand_context_stage
    from train.trust import main as trust_main
    old = load_bundle(trusted["bundle"])
    run = tmp_path / "run"
    stage = ContextModel.from_dict(hand_context_stage())
    save_bundle(old.model, run / BUNDLE, threshold=old.meta.threshold, provenance=old.meta.provenance, context=stage)
    write_manifest(trusted["df"], split_path(run, 0, "finetune"), relative=False)
    assert trust_main(["--run", str(run), "--device", "cpu"]) == 0
    upgraded = load_bundle(run)
    assert upgraded.meta.context == stage
    assert upgraded.gate is not None and upgraded.lacks() == []


def test_summary_explains_an_ece_interval_that_lies_above_its_value():
    from core.calibration import ECE_INTERVAL
    from core.trust import summary_lines
    trust = {"n_not_assessed": 0, "n": 74, "n_refused_by_gate": 0, "n_refused_by_quality": 0, "lacks": [],
             "calibration_before": {"brier": {"value": 0.17, "ci95": [0.10, 0.26]},
                                    "ece": {"value": 0.16, "ci95": [0.11, 0.27]}}}
    assert not any(ECE_INTERVAL in line for line in summary_lines(trust))  # brackets its value: nothing to say
    trust["calibration_after"] = {"brier": {"value": 0.14, "ci95": [0.08, 0.21]},
                                  "ece": {"value": 0.099, "ci95": [0.105, 0.21]}}
    lines = summary_lines(trust)
    assert lines[-2].startswith("ECE: raw 0.1600") and lines[-1] == f"  ({ECE_INTERVAL})"


def test_train_trust_names_every_bad_photo_first_and_leaves_the_built_in_demo_alone(trusted, tmp_path, capsys):
    """A missing photo stopped it with an ImageLoadError traceback; '--run demo' was said to be accepted, and the
    demo's bundle ships inside assets/ (its trust arrays are rebuilt with the demo, not in place)."""
    from core.manifest import write_manifest
    from core.runfolder import BUNDLE, split_path
    from train.trust import main as trust_main
    old = load_bundle(trusted["bundle"])
    run = tmp_path / "run"
    save_bundle(old.model, run / BUNDLE, threshold=old.meta.threshold, provenance=old.meta.provenance)
    df = trusted["df"].copy()
    df.loc[df.index[:2], "image"] = [str(tmp_path / "gone_a.jpg"), str(tmp_path / "gone_b.jpg")]
    write_manifest(df, split_path(run, 0, "finetune"), relative=False)
    assert trust_main(["--run", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "gone_a.jpg: file not found" in err and "gone_b.jpg: file not found" in err
    assert trust_main(["--run", "demo"]) == 2
    assert "the built-in demo ships with its own" in capsys.readouterr().err


def test_interval_wording_rounds_outwards_and_says_what_was_resampled():
    from core.calibration import Calibration
    from core.trust import interval_sentence, interval_text
    assert interval_text((0.153, 0.337)) == "15% to 34%"
    # a calibrated probability is a sigmoid: never 0% or 100%, also where it saturates in floating point
    assert interval_text((0.004, 0.9991)) == interval_text((0.0, 1.0)) == "<1% to >99%"
    c = Calibration("platt", 1.0, 0.0, 74, 0.4, boot=((1.0, 0.0), (1.1, 0.1)))
    text = interval_sentence(c, (0.153, 0.337))
    assert text.startswith("95% interval 15% to 34%: the calibration refitted on 2 bootstrap resamples of its 74 "
                           "validation photos (whole patients resampled)") and "with other patients" in text
    photos = interval_sentence(replace(c, boot_unit="photos", fitted_on="out-of-fold"), (0.1, 0.2))
    assert "its 74 out-of-fold photos (photo by photo: no patient ids)" in photos and "with other photos" in photos
    assert "(whole lesions resampled)" in interval_sentence(replace(c, boot_unit="lesions"), (0.1, 0.2))
    assert interval_sentence(c, None).startswith("No interval: this model's calibration has no refits stored")
    # a threshold inside the interval reads as borderline: the sentence says why the verdict still holds
    assert "The threshold (21% calibrated) lies in this range too, yet the verdict holds under every refit" in \
        interval_sentence(c, (0.05, 0.27), threshold=0.21)
    assert "lies in this range" not in interval_sentence(c, (0.05, 0.20), threshold=0.21)
    assert interval_sentence(None, None) is None


def test_assessed_photos_get_the_interval_refused_ones_none():
    from core.calibration import fit_calibration
    from core.quality import QualityWarning
    rng = np.random.default_rng(0)
    y = np.arange(80) % 2
    c = fit_calibration(rng.normal(0, 1, 80) + 2 * y, y, seed=0)
    a = assess(0.6, 0.5, calibration=c)
    lo, hi = a.prob_calibrated_ci95
    assert lo < a.prob_calibrated < hi and (lo, hi) == c.interval(0.6)
    refused = assess(0.6, 0.5, calibration=c, quality=[QualityWarning("dark", "too dark", refusal=True)])
    assert refused.prob_calibrated is None and refused.prob_calibrated_ci95 is None
