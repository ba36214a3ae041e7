"""Tests for `python -m train.screen`: batched scores in input order, verdicts and refusals, quality codes, per-file
errors that do not stop the run, and the provenance that travels with the CSV."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

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
    (d / "notes.txt").write_text("not a photo: listed with its reason")
    return d


def test_folder_screening_writes_rows_errors_quality_and_provenance(run_dir, photo_dir, tmp_path, capsys):
    out = tmp_path / "pred" / "predictions.csv"
    assert main(["--run", str(run_dir), "--images", str(photo_dir), "--out", str(out), "--batch-size", "3",
                 "--workers", "0", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == 9
    broken = df[df["image"].str.endswith("broken.jpg")].iloc[0]
    assert broken["error"] and broken["raw_score"] == "" and broken["verdict"] == ""
    assert broken["status"] == "corrupt"
    assert "broken.jpg" in captured.err and "corrupt" in captured.err
    notes = df[df["image"].str.endswith("notes.txt")].iloc[0]
    assert notes["status"] == "not_an_image" and "not an image" in notes["error"]
    good = df[df["status"] == "scored"].copy()
    assert (good["error"] == "").all()
    good["raw_score"] = good["raw_score"].astype(float)
    assert len(good) == 7 and good["raw_score"].between(0, 1).all()
    q = dict(zip(df["image"].str.rsplit("/", n=1).str[-1], df["quality"]))
    assert "too_small" in q["p0.jpg"] and "far_too_dark" in q["dark.png"] and "too_small" not in q["deep.png"]
    # an almost black photo is refused (no verdict, a reason that says what to do); the others get flagged or not
    dark = good[good["image"].str.endswith("dark.png")].iloc[0]
    assert dark["verdict"] == "not assessed" and "daylight" in dark["not_assessed_reason"]
    rest = good[~good["image"].str.endswith("dark.png")]
    assert (rest["verdict"] == np.where(rest["raw_score"] >= THRESHOLD, "flagged", "not flagged")).all()
    assert (rest["not_assessed_reason"] == "").all() and rest["raw_score"].nunique() > 1
    # this bundle predates the gate and calibration: no calibrated probability, and the sidecar says so
    assert (good["prob_calibrated"] == "").all() and (good["ood_score"] == "").all()
    assert (df["model_run"] == "demo").all() and (df["threshold"] == THRESHOLD).all()
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["model"]["run"] == "demo" and meta["model"]["validation_metrics"]["roc_auc"] == 0.61
    assert meta["threshold"]["value"] == THRESHOLD and meta["n_failed"] == 2 and meta["n_predicted"] == 7
    assert meta["not_scored"] == {"corrupt": 1, "not_an_image": 1}
    assert meta["weights_sha256"] == file_sha256(run_dir / "bundle" / "model.safetensors")
    assert meta["weights_sha256_short"] == meta["weights_sha256"][:12] == meta["model"]["weights_sha256"][:12]
    assert meta["model"]["intended_use"] and meta["preprocessing"]["input_size"] == 64
    assert "7 of 9 files scored" in captured.out and "2 not scored: 1 corrupt, 1 not_an_image" in captured.out
    assert "no out-of-distribution gate" in captured.out
    assert meta["n_not_assessed"] == 1 and len(meta["lacks"]) == 3 and "verdict" in meta["columns"]


def test_batched_probabilities_match_single_photo_predictions_in_order(run_dir, photo_dir, tmp_path):
    out = tmp_path / "p.csv"
    assert main(["--run", str(run_dir), "--images", str(photo_dir), "--out", str(out), "--batch-size", "4",
                 "--workers", "1", "--device", "cpu"]) == 0
    df = pd.read_csv(out)
    predictor = Predictor(load_bundle(run_dir), device="cpu")
    for _, row in df[df["status"] == "scored"].iterrows():
        single = predictor.predict_source(row["image"], cam_method=None)
        assert row["raw_score"] == pytest.approx(single.prob, abs=2e-3) and row["verdict"] == single.verdict


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
    assert df["raw_score"].iloc[0] != pytest.approx(df["raw_score"].iloc[1], abs=1e-6)
    assert "too_small" in df["quality"].iloc[1] and pd.isna(df["quality"].iloc[0])
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["inputs"]["manifest"].endswith("m.csv") and len(meta["inputs"]["sha256"]) == 64


@pytest.mark.parametrize("bad, said", [("run", "nope: not found (give a run folder"),
                                       ("not a run", "no model.json (not a model bundle or run folder)"),
                                       ("folder", "no files found"), ("a file", "is a file; --images takes a folder")])
def test_unusable_inputs_fail_with_a_message(run_dir, tmp_path, capsys, bad, said):
    (tmp_path / "empty").mkdir()
    (tmp_path / "one.jpg").write_bytes(b"x")
    run = {"run": tmp_path / "nope", "not a run": tmp_path / "empty"}.get(bad, run_dir)
    images = tmp_path / ("one.jpg" if bad == "a file" else "empty")
    rc = main(["--run", str(run), "--images", str(images), "--out", str(tmp_path / "o.csv")])
    assert rc == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def truncated_jpeg(path):
    data = textured(path.with_suffix(".tmp.jpg"), size=(320, 240), seed=12).read_bytes()
    path.with_suffix(".tmp.jpg").unlink()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def odd_dir(tmp_path):
    """Every kind of file a real photo folder holds besides photos."""
    d = tmp_path / "odd"
    textured(d / "ok.jpg", seed=1)
    jpeg_without_extension = textured(d / "IMG_0001.jpg", seed=2).rename(d / "IMG_0001")
    Image.open(jpeg_without_extension).verify()  # still a JPEG: its content, not its name, says so
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(d / "anim.gif")
    (d / "readme.txt").write_text("scanned at the clinic")
    truncated_jpeg(d / "cut.jpg")
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    textured(d / ".thumbnails" / "t.jpg", seed=3)  # inside a hidden folder
    (d / "empty.png").write_bytes(b"")
    Image.new("1", (9000, 9000)).save(d / "huge.png")  # 81 MP, above the 80 MP limit, a few KB on disk
    return d


EXPECTED_STATUS = {"ok.jpg": "scored", "IMG_0001": "scored", "anim.gif": "unsupported_type",
                   "readme.txt": "not_an_image", "cut.jpg": "corrupt", ".DS_Store": "hidden", "t.jpg": "hidden",
                   "empty.png": "empty", "huge.png": "too_large"}


def test_every_file_is_scored_or_named_with_its_reason(run_dir, odd_dir, tmp_path, capsys):
    out = tmp_path / "odd.csv"
    assert main(["--run", str(run_dir), "--images", str(odd_dir), "--out", str(out), "--workers", "0",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    df = pd.read_csv(out, keep_default_na=False)
    handed_over = [p for p in odd_dir.rglob("*") if p.is_file()]
    assert len(df) == len(handed_over) == len(EXPECTED_STATUS)
    assert dict(zip(df["image"].str.rsplit("/", n=1).str[-1], df["status"])) == EXPECTED_STATUS
    scored = df[df["status"] == "scored"]
    assert scored["raw_score"].astype(float).between(0, 1).all() and (scored["error"] == "").all()
    skipped = df[df["status"] != "scored"]
    assert (skipped["raw_score"] == "").all() and (skipped["error"] != "").all()
    gif = df[df["image"].str.endswith("anim.gif")].iloc[0]
    assert "GIF format is not supported" in gif["error"]
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["n_predicted"] + meta["n_failed"] == meta["n_images"] == len(handed_over)
    assert sum(meta["not_scored"].values()) == meta["n_failed"] == 7
    assert meta["not_scored"]["hidden"] == 2
    # the end of the run names every file that was not scored, with the reason
    for name, status in EXPECTED_STATUS.items():
        if status != "scored":
            assert name in captured.err
    for reason in ("unsupported_type (1)", "not_an_image (1)", "corrupt (1)", "hidden (2)", "empty (1)",
                   "too_large (1)"):
        assert f"not scored, {reason}:" in captured.err
    assert "2 of 9 files scored" in captured.out


def test_a_file_without_extension_gets_the_same_probability_as_with_one(run_dir, tmp_path):
    a = textured(tmp_path / "in" / "a.jpg", seed=5)
    (tmp_path / "in" / "b").write_bytes(a.read_bytes())
    out = tmp_path / "x.csv"
    assert main(["--run", str(run_dir), "--images", str(tmp_path / "in"), "--out", str(out), "--workers", "0",
                 "--device", "cpu"]) == 0
    df = pd.read_csv(out)
    assert list(df["status"]) == ["scored", "scored"]
    assert df["raw_score"].iloc[0] == pytest.approx(df["raw_score"].iloc[1], abs=1e-5)


def test_manifest_rows_that_cannot_be_scored_are_named_and_nothing_scored_exits_1(run_dir, tmp_path, capsys):
    textured(tmp_path / "p.png", seed=1)
    p = str(tmp_path / "p.png")
    # a box outside the photo, a box with one cell empty (never the whole photo instead), a box that is not numbers
    man = pd.DataFrame({"image": [str(tmp_path / "gone.jpg"), p, p, p], "label": [1, 0, 0, 1],
                        "crop_left": [None, 500, 1, "abc"], "crop_top": [None, 0, 2, 0],
                        "crop_width": [None, 10, 30, 9], "crop_height": [None, 10, None, 9]})
    man.to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "m_pred.csv"
    rc = main(["--run", str(run_dir), "--manifest", str(tmp_path / "m.csv"), "--out", str(out), "--workers", "0",
               "--device", "cpu"])
    assert rc == 1  # a CSV is written, but no image could be scored
    df = pd.read_csv(out, keep_default_na=False)
    assert list(df["status"]) == ["not_found", "bad_crop", "bad_crop", "bad_crop"] and list(df["label"]) == [1, 0, 0, 1]
    assert df["error"].iloc[2] == f"{p}: incomplete crop box (crop_height empty): give all four crop columns or none"
    assert df["error"].iloc[3].startswith(f"{p}: crop box is not numbers (crop_left='abc'")
    err = capsys.readouterr().err
    assert "gone.jpg: file not found" in err and "falls outside" in err and "incomplete crop box" in err


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
    z = np.log(out["raw_score"] / (1 - out["raw_score"]))
    expected = 1 / (1 + np.exp(-(z[:2] + np.array([2.0 + 2.0, -1.0]))))  # bleed yes + age (80-50)/15; bleed no
    np.testing.assert_allclose(out["fused_prob"][:2], expected, atol=1e-5)
    assert out["fused_prob"][2] == out["raw_score"][2]  # no answer: the photo's own result and threshold
    assert out["fused_threshold"].tolist() == [0.5, 0.5, THRESHOLD]
    assert out["fused_verdict"].tolist() == ["flagged" if p >= t else "not flagged"
                                             for p, t in zip(out["fused_prob"], out["fused_threshold"])]
    assert out["fused_prob_low"].tolist() == out["fused_prob_high"].tolist() == ["", "", ""]  # no refits stored
    side = json.loads(sidecar_path(tmp_path / "p.csv").read_text())
    assert side["context_stage"]["fields"] == ["age", "site", "bleed", "grew"]


def test_screen_writes_the_fused_probabilitys_interval_when_the_stage_has_refits(run_dir, photo_dir, tmp_path):
    from core.context import ContextModel
    from tests.conftest import hand_context_stage
    bundle = load_bundle(run_dir)
    refits = {"fits": 3, "n": 30, "unit": "patients", "intercept": [-0.5, 0.0, 0.5], "image": [1.0, 1.0, 1.0],
              "context": [1.0, 1.0, 1.0]}
    stage = ContextModel.from_dict({**hand_context_stage(), "fusion_bootstrap": refits})
    save_bundle(bundle.model, tmp_path / "ctx" / "bundle", threshold=bundle.meta.threshold,
                provenance=bundle.meta.provenance, context=stage)
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"image": [str(photo_dir / f"p{i}.jpg") for i in range(2)], "label": [1, 0],
                  "bleed": ["True", None]}).to_csv(manifest, index=False)
    assert main(["--run", str(tmp_path / "ctx"), "--manifest", str(manifest), "--out", str(tmp_path / "p.csv"),
                 "--workers", "0"]) == 0
    out = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    z = np.log(out["raw_score"][0] / (1 - out["raw_score"][0])) + 2.0  # bleed yes
    lo, hi = np.quantile(1 / (1 + np.exp(-(z + np.array([-0.5, 0.0, 0.5])))), [0.025, 0.975])
    low, high = float(out["fused_prob_low"][0]), float(out["fused_prob_high"][0])  # a column with blanks: text
    assert low == pytest.approx(lo, abs=1e-5) and high == pytest.approx(hi, abs=1e-5)
    assert low < float(out["fused_prob"][0]) < high
    assert out["fused_prob_low"][1] == out["fused_prob_high"][1] == ""  # photo only: prob_calibrated's interval applies
    side = json.loads(sidecar_path(tmp_path / "p.csv").read_text())
    assert "fused_prob_low" in side["columns"]


@pytest.fixture
def context_run(run_dir, tmp_path):
    from core.context import ContextModel
    from tests.conftest import hand_context_stage
    bundle = load_bundle(run_dir)
    return save_bundle(bundle.model, tmp_path / "ctx" / "bundle", threshold=bundle.meta.threshold,
                       provenance=bundle.meta.provenance, context=ContextModel.from_dict(hand_context_stage())).parent


def _one_bad_answer(photo_dir, tmp_path):
    """Three photos; the first one's age (150) is out of range, its bleeding answer is fine."""
    manifest = tmp_path / "bad_answer.csv"
    pd.DataFrame({"image": [str(photo_dir / f"p{i}.jpg") for i in range(3)], "label": [1, 0, 1],
                  "patient_id": ["a", "b", "c"], "age": ["150", "70", None],
                  "bleed": ["True", "False", None]}).to_csv(manifest, index=False)
    return manifest


def test_screen_counts_a_bad_context_answer_as_unanswered_and_names_it(context_run, photo_dir, tmp_path, capsys):
    manifest = _one_bad_answer(photo_dir, tmp_path)
    assert main(["--run", str(context_run), "--manifest", str(manifest), "--out", str(tmp_path / "p.csv"),
                 "--workers", "0"]) == 0
    out = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert out["status"].tolist() == ["scored"] * 3
    assert out["inputs"].tolist() == ["photo + 1 answer", "photo + 2 answers", "photo only"]
    assert "age: 150.0 is outside 0-120" in out["context_note"][0]
    assert out["context_note"][1:].tolist() == ["", ""]
    z = np.log(out["raw_score"][0] / (1 - out["raw_score"][0]))
    assert out["fused_prob"][0] == pytest.approx(1 / (1 + np.exp(-(z + 2.0))), abs=1e-5)  # bleed yes only
    assert "1 row(s) had context answers that could not be used" in capsys.readouterr().err


def test_evaluate_counts_a_bad_context_answer_as_unanswered_and_notes_it(context_run, photo_dir, tmp_path):
    from train.evaluate import main as evaluate_main
    manifest = _one_bad_answer(photo_dir, tmp_path)
    assert evaluate_main(["--run", str(context_run), "--manifest", str(manifest), "--out", str(tmp_path / "r.json"),
                          "--n-boot", "10", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["context"]["answered"] == {"age": 1, "site": 0, "bleed": 2, "grew": 0}
    assert [u["image"] for u in report["context"]["unusable_answers"]] == [str(photo_dir / "p0.jpg")]
    assert any("p0.jpg" in n and "age: 150.0 is outside 0-120" in n for n in report["notes"])


def test_an_ensemble_bundle_screens_with_its_members_agreement(run_dir, photo_dir, tmp_path):
    from core.bundle import Threshold
    from core.ensemble import save_ensemble
    torch.manual_seed(1)
    other = LesionClassifier(load_bundle(run_dir).spec, HeadConfig()).eval()
    spread_logits(other)
    save_bundle(other, tmp_path / "other", threshold={"value": THRESHOLD, "rule": "fixed"})
    members = [load_bundle(run_dir), load_bundle(tmp_path / "other")]
    save_ensemble(members, tmp_path / "ens", threshold=Threshold(THRESHOLD, rule="fixed"), provenance={"run_name": "cv"})
    out = tmp_path / "ens.csv"
    assert main(["--run", str(tmp_path / "ens"), "--images", str(photo_dir), "--out", str(out), "--workers", "0",
                 "--device", "cpu"]) == 0
    df = pd.read_csv(out)
    scored = df[df["status"] == "scored"].reset_index(drop=True)
    singles = [Predictor(b, device="cpu") for b in members]
    for _, row in scored.iterrows():
        member_p = [p.predict_source(row["image"], cam_method=None).prob for p in singles]
        assert row["raw_score"] == pytest.approx(np.mean(member_p), abs=1e-4)
        assert row["members_flagging"] == sum(q >= THRESHOLD for q in member_p)
        assert row["members_sd"] == pytest.approx(np.std(member_p, ddof=1), abs=1e-4)
    assert df.loc[df["status"] != "scored", "members_flagging"].isna().all()
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["ensemble"]["members"] == 2 and "members_sd" in meta["columns"]


@pytest.mark.slow  # exports the model's ONNX graph
def test_screening_through_onnxruntime_gives_pytorchs_scores_and_says_so(run_dir, photo_dir, tmp_path, monkeypatch):
    """SKINSCREEN_ENGINE=onnxruntime: the batches go through the ONNX graph, the scores are fp32 PyTorch's, and the
    provenance names the engine next to the precision."""
    monkeypatch.setenv("SKINSCREEN_FP32", "1")  # compare with fp32 PyTorch also on CPUs that would use bf16
    args = ["--run", str(run_dir), "--images", str(photo_dir), "--batch-size", "3", "--workers", "1", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "torch.csv")]) == 0
    monkeypatch.setenv("SKINSCREEN_ENGINE", "onnxruntime")
    assert main(args + ["--out", str(tmp_path / "ort.csv")]) == 0
    a, b = pd.read_csv(tmp_path / "torch.csv"), pd.read_csv(tmp_path / "ort.csv")
    assert (a["status"] == b["status"]).all() and (a["verdict"].fillna("") == b["verdict"].fillna("")).all()
    np.testing.assert_allclose(b["raw_score"], a["raw_score"], atol=1e-4)
    meta = json.loads(sidecar_path(tmp_path / "ort.csv").read_text())
    assert meta["engine"]["engine"] == "onnxruntime" and meta["engine"]["max_abs_prob_diff"] < 1e-4
    assert json.loads(sidecar_path(tmp_path / "torch.csv").read_text())["engine"]["engine"] == "pytorch"


def test_an_output_that_cannot_be_written_is_refused_before_scoring(run_dir, photo_dir, tmp_path, capsys):
    (tmp_path / "out_dir").mkdir()
    for out, said in ((tmp_path / "out_dir", "is a folder"),
                      (photo_dir / "p1.jpg" / "pred.csv", "is a file, not a folder")):
        assert main(["--run", str(run_dir), "--images", str(photo_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert said in err and "screening" not in err  # no progress bar: nothing was scored
    assert not list((tmp_path / "out_dir").iterdir())


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX links and pipes")
def test_links_pipes_and_folders_that_cannot_be_listed_each_get_a_row(run_dir, tmp_path, capsys, monkeypatch):
    """A linked folder's photos are screened (a link loop is followed once); a broken link, a pipe (opening it
    would block the run) and a subfolder that cannot be listed each get a row saying so: none is silently dropped."""
    d = tmp_path / "links"
    textured(d / "ok.jpg", seed=1)
    textured(tmp_path / "elsewhere" / "far.jpg", seed=2)
    (d / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (d / "loop").symlink_to(d, target_is_directory=True)
    (d / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    os.mkfifo(d / "pipe")
    textured(d / "locked" / "in.jpg", seed=3)
    scandir = os.scandir

    def refuse_locked(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", refuse_locked)  # root lists any folder; a user without the right cannot
    out = tmp_path / "links.csv"
    assert main(["--run", str(run_dir), "--images", str(d), "--out", str(out), "--workers", "0",
                 "--device", "cpu"]) == 0
    df = pd.read_csv(out, keep_default_na=False)
    status = dict(zip(df["image"].str.removeprefix(str(d) + "/"), df["status"]))
    assert status == {"ok.jpg": "scored", "linked/far.jpg": "scored", "gone.jpg": "broken_link",
                      "pipe": "not_a_file", "locked": "unreadable_folder"}
    err = capsys.readouterr().err
    assert "gone.jpg: a link to a file that does not exist" in err and "pipe: not a regular file" in err
    assert "locked: folder could not be listed" in err


def test_a_manifest_without_labels_or_with_some_blank_is_screened(run_dir, photo_dir, tmp_path, capsys):
    """Photos to screen have no diagnosis yet: the label column is optional, a blank label is kept blank."""
    photos = [str(photo_dir / "p1.jpg"), str(photo_dir / "sub" / "deep.png")]
    pd.DataFrame({"image": photos}).to_csv(tmp_path / "nolabel.csv", index=False)
    pd.DataFrame({"image": photos, "label": [1, None]}).to_csv(tmp_path / "some.csv", index=False)
    for name in ("nolabel", "some"):
        out = tmp_path / f"{name}_pred.csv"
        assert main(["--run", str(run_dir), "--manifest", str(tmp_path / f"{name}.csv"), "--out", str(out),
                     "--workers", "0", "--device", "cpu"]) == 0
        df = pd.read_csv(out, keep_default_na=False)
        assert list(df["status"]) == ["scored", "scored"]
        assert ("label" not in df) if name == "nolabel" else (list(df["label"].astype(str)) == ["1", ""])
    pd.DataFrame({"image": photos, "label": [1, "maybe"]}).to_csv(tmp_path / "bad.csv", index=False)
    assert main(["--run", str(run_dir), "--manifest", str(tmp_path / "bad.csv"), "--out", str(out)]) == 2
    assert "row 3 has 'maybe'" in capsys.readouterr().err  # the bad row, not the good "1" read as text beside it


def test_photos_the_model_trained_or_validated_on_are_marked_and_counted(run_dir, photo_dir, tmp_path, capsys):
    """The run's split files say which photos it learned from: screening them is allowed, but each such row says so
    (a relative --images path included) and the run ends with a warning."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "splits").mkdir()
    pd.DataFrame({"image": [str((photo_dir / n).resolve()) for n in ("p0.jpg", "p1.jpg", "p2.jpg")], "label": 0,
                  "split": ["train", "val", "test"]}).to_csv(run / "splits" / "1_finetune.csv", index=False)
    out = tmp_path / "pred.csv"
    rel = os.path.relpath(photo_dir)
    assert main(["--run", str(run), "--images", rel, "--out", str(out), "--workers", "0"]) == 0
    table = pd.read_csv(out, keep_default_na=False).set_index("image")
    seen = {Path(i).name: s for i, s in table["seen_by_model"].items() if s}
    assert seen == {"p0.jpg": "train", "p1.jpg": "val"}  # a test photo is not 'seen'
    assert "the model trained or validated on 2 of these photos" in capsys.readouterr().err
    assert "seen_by_model" in json.loads(sidecar_path(out).read_text())["columns"]


def test_a_bundle_folder_finds_its_runs_split_files_and_a_lone_bundle_says_it_cannot_know(run_dir, photo_dir,
                                                                                          tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "splits").mkdir()
    pd.DataFrame({"image": [str((photo_dir / "p0.jpg").resolve())], "label": 0, "split": ["train"]}).to_csv(
        run / "splits" / "0_only.csv", index=False)
    out = tmp_path / "a.csv"
    assert main(["--run", str(run / "bundle"), "--images", str(photo_dir), "--out", str(out), "--workers", "0"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.loc[table["seen_by_model"] != "", "image"].map(lambda p: Path(p).name)) == ["p0.jpg"]
    lone = tmp_path / "lone"
    shutil.copytree(run / "bundle", lone)
    capsys.readouterr()
    assert main(["--run", str(lone), "--images", str(photo_dir), "--out", str(out), "--workers", "0"]) == 0
    assert set(pd.read_csv(out, keep_default_na=False)["seen_by_model"]) == {"unknown"}
    assert "whether it trained on these photos is unknown" in capsys.readouterr().err


def test_an_output_on_a_photo_or_the_manifest_is_refused_and_nothing_is_replaced(run_dir, photo_dir, tmp_path,
                                                                                 capsys):
    """`--out photos/p0.jpg` turned the photo into a CSV; `--out m.csv` replaced the manifest with predictions."""
    photo = photo_dir / "p0.jpg"
    before = photo.read_bytes()
    assert main(["--run", str(run_dir), "--images", str(photo_dir), "--out", str(photo), "--workers", "0"]) == 2
    assert f"{photo}: is an input of this command" in capsys.readouterr().err and photo.read_bytes() == before
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"image": [str(photo)]}).to_csv(manifest, index=False)
    text = manifest.read_text()
    assert main(["--run", str(run_dir), "--manifest", str(manifest), "--out", str(manifest), "--workers", "0"]) == 2
    assert "is an input of this command" in capsys.readouterr().err and manifest.read_text() == text
