"""The built-in demo model and examples shipped in assets/: they load, match their recorded predictions, stay small,
and the 'demo' short name reaches them without shadowing a real folder."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from core import builtin
from core.evaluation import seen_by_model
from tests.conftest import shared_path

ASSET_BUDGET = 15 * 1024 * 1024


def test_short_name_reaches_the_demo_unless_a_folder_has_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert builtin.resolve_model("demo") == builtin.DEMO_BUNDLE
    assert str(builtin.resolve_model("runs/x")) == "runs/x"  # anything else is taken as a path
    (tmp_path / "demo").mkdir()
    assert builtin.resolve_model("demo").resolve() == (tmp_path / "demo").resolve()
    assert builtin.is_builtin(builtin.DEMO_BUNDLE) and not builtin.is_builtin(tmp_path)


def test_examples_are_listed_attributed_and_small():
    items = builtin.examples()
    listed = pd.read_csv(builtin.EXAMPLES_DIR / "examples.csv")
    assert len(items) == len(listed) >= 4
    assert {e.label for e in items} == {0, 1}                      # malignant and benign
    assert len({e.fitzpatrick for e in items if e.fitzpatrick}) >= 2  # more than one skin type
    attribution = (builtin.EXAMPLES_DIR / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in attribution and "106221" in attribution
    for e in items:
        assert e.path.name in attribution
        assert e.path.stat().st_size < 200_000
        assert e.caption and e.diagnosis in builtin.DIAGNOSES


def test_examples_skip_missing_files(tmp_path):
    (tmp_path / "examples.csv").write_text("file,label,diagnosis,fitzpatrick,site,age\n"
                                           "gone.jpg,1,MEL,2,back,50\nhere.jpg,0,NEV,,arm,\n")
    (tmp_path / "here.jpg").write_bytes(b"x")
    items = builtin.examples(tmp_path)
    assert [e.path.name for e in items] == ["here.jpg"] and items[0].fitzpatrick is None and items[0].age is None


def test_assets_stay_under_budget():
    total = sum(p.stat().st_size for p in builtin.ASSETS.rglob("*") if p.is_file())
    assert total < ASSET_BUDGET, f"assets/ holds {total / 2**20:.1f} MiB"


# ------------------------------------------------------------------ the shipped demo bundle
@pytest.fixture(scope="module")
def demo():
    from core.bundle import load_bundle
    assert builtin.demo_available(), "assets/demo/bundle is missing: rebuild it with python -m train.build_demo"
    return load_bundle(builtin.DEMO_BUNDLE)


def test_demo_bundle_describes_its_training(demo):
    meta = json.loads((builtin.DEMO_BUNDLE / "model.json").read_text())
    text = json.dumps(meta)
    assert "pad_ufes_20" in text and "intended_use" in text
    assert 0 < demo.threshold < 1
    storage = json.loads((builtin.DEMO_DIR / "weights_storage.json").read_text())
    if storage["weights_dtype"] == "float16":  # half precision only where it was measured harmless
        assert storage["max_abs_prob_shift_fp16"] <= storage["tolerance"] <= 0.01


def test_demo_reproduces_its_recorded_predictions(demo):
    from core.inference import PRECISION_TOLERANCE, Predictor
    expected = json.loads(builtin.DEMO_EXPECTED.read_text())
    assert set(expected) == {e.path.name for e in builtin.examples()}
    exact = Predictor(demo, device="cpu", fast=False)
    fast = Predictor(demo, device="cpu", fast=True)
    for e in builtin.examples():
        want = expected[e.path.name]["prob"]
        data = e.path.read_bytes()
        assert exact.predict_source(data, name=e.path.name, cam_method=None).prob == pytest.approx(want, abs=1e-4)
        assert fast.predict_source(data, name=e.path.name, cam_method=None).prob == pytest.approx(
            want, abs=PRECISION_TOLERANCE)


def test_demo_evidence_ships_without_photos():
    for name in ("val_report.json", "test_report.json"):
        report = json.loads((builtin.DEMO_EVIDENCE / name).read_text())
        assert "roc_auc" in report["metrics"]
        assert "/" not in json.dumps([r.get("image", "") for r in report.get("predictions") or []])
    assert not [p for p in builtin.DEMO_DIR.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")]


def test_examples_come_from_the_demos_test_patients():
    split = pd.read_csv(builtin.DEMO_DIR / "splits.csv").set_index("image")["split"]
    listed = pd.read_csv(builtin.EXAMPLES_DIR / "examples.csv")
    assert (listed["source_image"].map(split) == "test").all()


def test_evaluating_the_demo_on_its_own_training_photos_is_flagged():
    names = builtin.demo_split_names()
    assert names and set(names.values()) == {"train", "val"}
    trained = next(n for n, s in names.items() if s == "train")
    df = pd.DataFrame({"image": [f"/elsewhere/{trained}", "/elsewhere/never_seen.png"]})
    assert seen_by_model(builtin.DEMO_BUNDLE, df) == {"train": 1, "val": 0}


def test_the_demo_warns_on_its_own_training_photos_and_not_on_new_patients(demo):
    """seen_in_training on real photos: the shipped examples (test patients) are not near any indexed photo; a
    training photo of the shared set is found as itself."""
    from core.inference import Predictor
    from core.similar import SEEN_SIMILARITY, seen_in_training
    trained = next(n for n, s in builtin.demo_split_names().items() if s == "train")
    photo = shared_path("data", "pad_ufes_20_subset", "images", trained)
    predictor = Predictor(demo, device="cpu", fast=False)
    for e in builtin.examples():
        pred = predictor.predict_source(e.path.read_bytes(), name=e.path.name, cam_method=None)
        assert pred.similar and seen_in_training(pred.similar) is None, (e.path.name, pred.similar[0].similarity)
        assert pred.similar[0].similarity < SEEN_SIMILARITY
    pred = predictor.predict_source(photo.read_bytes(), name=trained, cam_method=None)
    seen = seen_in_training(pred.similar)
    assert seen is not None and Path(seen.image).name == trained and seen.split == "train"


def test_the_demos_similar_cases_carry_the_datasets_diagnosis(demo):
    """Each similar case shown beside a prediction says what the lesion was (BCC, NEV...), not only its label."""
    diagnoses = [r.get("diagnosis") for r in demo.similar.records]
    assert all(diagnoses) and set(diagnoses) <= {"BCC", "MEL", "SCC", "ACK", "NEV", "SEK"}
    malignant = {r["diagnosis"] for r in demo.similar.records if r["label"] == 1}
    assert malignant <= {"BCC", "MEL", "SCC"}
