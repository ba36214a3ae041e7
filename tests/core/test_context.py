"""The context stage: leak refusals, training-rows-only learning, any subset of answers, JSON round trip."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.context import (CONTEXT_COLUMNS, ContextError, ContextModel, check_fields, context_frame, fuse,
                          normalise, site_of)
from core.context_fit import (crossfit_context_logits, crossfit_fused_probs, fit_context, fit_context_cv,
                              screen_fields)
from core.context_report import context_report

QUESTIONS = ("itch", "grew", "hurt", "changed", "bleed", "elevation")


def synthetic(n=240, seed=0, leak_sex=False) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows whose answers carry signal (bleeding, growth, age), with patient ids and a patient-level split, and an
    image probability that carries some signal of its own."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    age = np.clip(rng.normal(50 + 15 * y, 12), 1, 100).round()
    yes = lambda p: np.where(rng.random(n) < p, "True", "False")  # noqa: E731
    df = pd.DataFrame({
        "image": [f"/x/img{i}.png" for i in range(n)], "label": y, "patient_id": [f"P{i // 2}" for i in range(n)],
        "age": age, "site": rng.choice(["FACE", "BACK", "ARM", "THIGH"], n),
        "bleed": yes(0.2 + 0.5 * y), "grew": yes(0.3 + 0.4 * y), "itch": yes(0.5), "hurt": yes(0.2 + 0.2 * y),
        "changed": yes(0.2 + 0.3 * y), "elevation": yes(0.5),
        "sex": rng.choice(["FEMALE", "MALE"], n), "biopsed": np.where(y == 1, "True", "False")})
    if leak_sex:  # recorded only for malignant (PAD records sex only for biopsied lesions)
        df.loc[df["label"] == 0, "sex"] = None
    df["split"] = np.select([df.index % 10 < 6, df.index % 10 < 8], ["train", "val"], "test")
    df.loc[df.index % 2 == 1, "split"] = df["split"].shift(1)  # both images of a patient in one split
    image_prob = 1 / (1 + np.exp(-(1.2 * (2 * y - 1) + rng.normal(0, 1.5, n))))
    return df, image_prob


def fitted(df, prob, fields=("age", "site", "bleed", "grew", "itch", "hurt", "changed", "elevation"), **kw):
    tr, va = df[df["split"] == "train"], df[df["split"] == "val"]
    return fit_context(tr, va, prob[(df["split"] == "val").to_numpy()], fields, **{"n_boot": 50, **kw})


@pytest.fixture(scope="module")
def model_and_data():
    df, prob = synthetic()
    return fitted(df, prob), df, prob


# ---------------------------------------------------------------- leaks
@pytest.mark.parametrize("name", ["biopsed", "diagnostic", "Diagnosis", "midas_path", "benign_malignant"])
def test_leaking_columns_are_refused_by_name(name):
    with pytest.raises(ContextError, match=f"{name}.*give the label away"):
        check_fields(["age", name])
    df, prob = synthetic()
    with pytest.raises(ContextError, match="give the label away"):
        fitted(df, prob, fields=("age", name))


def test_a_leaking_column_in_the_manifest_cannot_reach_the_model(model_and_data):
    model, df, prob = model_and_data
    flipped = df.assign(biopsed=np.where(df["biopsed"] == "True", "False", "True"), diagnostic="BCC")
    again = fitted(flipped, prob)
    assert again.to_dict() == model.to_dict()
    assert "biopsed" not in json.dumps(model.to_dict())


def test_a_field_whose_absence_gives_the_label_away_is_left_out():
    df, prob = synthetic(leak_sex=True)
    model = fitted(df, prob, fields=("age", "sex", "bleed"))
    assert "sex" not in model.fields and "gives the label away" in model.excluded["sex"]
    assert model.fields == ("age", "bleed")


# ---------------------------------------------------------------- who it learns from
def test_held_out_patients_answers_never_reach_training(model_and_data):
    model, df, prob = model_and_data
    held = df["split"] == "test"
    changed = df.copy()
    changed.loc[held, "bleed"] = np.where(changed.loc[held, "label"] == 1, "False", "True")  # inverted answers
    changed.loc[held, "age"] = 5
    assert fitted(changed, prob).to_dict() == model.to_dict()
    # validation answers do reach the fusion (they are the honest image logits' rows), never the answer weights
    val = df["split"] == "val"
    changed.loc[val, "bleed"] = "False"
    other = fitted(changed, prob)
    assert other.weights == model.weights and other.fusion != model.fusion


def test_rows_of_other_splits_are_refused():
    df, prob = synthetic()
    with pytest.raises(ContextError, match="held-out patient's answers"):
        fit_context(df[df["split"] != "val"], df[df["split"] == "val"], prob[(df["split"] == "val").to_numpy()],
                    ("age", "bleed"), n_boot=0)
    tr = df[df["split"] == "train"]
    with pytest.raises(ContextError, match="patient"):
        fit_context(tr.drop(columns="split"), tr.drop(columns="split"), prob[:len(tr)], ("age", "bleed"),
                    n_boot=0)


# ---------------------------------------------------------------- cross-validated runs
def cv_rows(n=400, k=4, seed=0):
    """synthetic()'s non-test rows with patient-grouped folds, and their (out-of-fold) image probabilities."""
    df, prob = synthetic(n=n, seed=seed)
    keep = (df["split"] != "test").to_numpy()
    df = df[keep].reset_index(drop=True).drop(columns="split")
    patients = sorted(set(df["patient_id"]))
    fold_of = {pid: i % k for i, pid in enumerate(np.random.default_rng(seed).permutation(patients))}
    return df.assign(fold=df["patient_id"].map(fold_of)), prob[keep]


def test_cross_fitted_context_logits_never_see_their_own_folds_labels():
    """A row's cross-fitted context logit comes from a model fitted without its fold: flipping fold 0's labels
    leaves fold 0's logits exactly as they were, and moves the other folds' (whose models trained on fold 0)."""
    from core.context import context_frame
    from core.splits import grouping
    df, _ = cv_rows()
    fields = ["age", "site", "bleed", "grew"]
    a, g, fold = context_frame(df, fields), grouping(df)[1].to_numpy(), df["fold"].to_numpy()
    y = df["label"].to_numpy()
    flipped = np.where(fold == 0, 1 - y, y)
    for rule in ("masked_level", "expected"):
        before = crossfit_context_logits(a, y, g, fold, rule)[0]
        after = crossfit_context_logits(a, flipped, g, fold, rule)[0]
        np.testing.assert_array_equal(before[fold == 0], after[fold == 0])
        assert np.abs(before[fold != 0] - after[fold != 0]).max() > 1e-3


def test_cross_fitted_fused_scores_never_see_their_own_folds_labels():
    """What the fused rule is judged on for new patients: fold 0's fused scores (context model and fusion both
    fitted without fold 0) stay exactly as they were when fold 0's labels are flipped; the other folds' move."""
    df, prob = cv_rows()
    fields = ("age", "site", "bleed", "grew")
    flipped = df.assign(label=np.where(df["fold"] == 0, 1 - df["label"], df["label"]))
    before = crossfit_fused_probs(df, prob, fields)
    after = crossfit_fused_probs(flipped, prob, fields)
    zero = (df["fold"] == 0).to_numpy()
    np.testing.assert_array_equal(before[zero], after[zero])
    assert np.abs(before[~zero] - after[~zero]).max() > 1e-3 and ((before > 0) & (before < 1)).all()


def test_cv_context_stage_is_fitted_on_all_non_test_rows_and_thresholded_on_out_of_fold_scores():
    df, prob = cv_rows()
    fields = ("age", "site", "bleed", "grew", "itch", "hurt", "changed", "elevation")
    model = fit_context_cv(df, prob, fields, where="out-of-fold predictions (4 folds)", n_boot=50)
    assert model.threshold["chosen_on"] == "out-of-fold predictions (4 folds) (fused output)"
    assert model.context_threshold["chosen_on"] == "out-of-fold predictions (4 folds) (context output)"
    assert model.threshold["n_val"] == len(df) and model.threshold["val_sensitivity"]["value"] >= 0.9
    assert "cross-fitted over the 4 folds" in model.fitted["fusion"] and f"{len(df)} images" in model.fitted["fusion"]
    assert model.fitted["n_train"] == len(df) and set(model.fitted["missing_rule_val_log_loss"]) == {
        "masked_level", "expected"}
    # answers carry signal here, so fusing them beats the image score alone (both judged out of fold)
    from sklearn.metrics import roc_auc_score
    assert model.threshold["val_roc_auc"]["value"] > roc_auc_score(df["label"], prob) + 0.02
    assert fuse(model, 0.4, 0.5, {"bleed": "yes"}).prob > fuse(model, 0.4, 0.5, {"bleed": "no"}).prob
    assert "out-of-fold predictions (4 folds): sensitivity" in model.threshold_note()
    assert model.fusion_bootstrap["n"] == len(df) and model.fusion_bootstrap["unit"] == "patients"
    assert fuse(model, 0.4, 0.5, {"bleed": "yes"}).ci95 is not None


@pytest.mark.parametrize("change, message", [
    (lambda df: df.assign(split="test"), "include test rows"),
    (lambda df: df.assign(fold=np.arange(len(df)) % 4), "is in more than one fold"),
    (lambda df: df.assign(label=np.where(df["fold"] == 0, df["label"], 1)), "folds other than 0 hold one class"),
])
def test_cv_context_stage_refuses_test_rows_and_bad_folds(change, message):
    df, prob = cv_rows()
    with pytest.raises(ContextError, match=message):
        fit_context_cv(change(df), prob, ("age", "bleed"), where="out-of-fold predictions", n_boot=0)


def test_threshold_note_says_where_the_fused_threshold_was_chosen(model_and_data):
    model, _, _ = model_and_data
    note = model.threshold_note()
    assert note.startswith("Photo + answers threshold chosen on the validation split: sensitivity ")
    assert f"on {model.threshold['n_val']} images" in note and "lean optimistic" in note
    from dataclasses import replace
    assert "not recorded" in replace(model, threshold={}).threshold_note()


# ---------------------------------------------------------------- prediction
def test_any_subset_of_answers_predicts(model_and_data):
    model, df, _ = model_and_data
    full = {"age": 70, "site": "face", "bleed": "yes", "grew": "yes", "itch": "no", "hurt": "no", "changed": "yes",
            "elevation": "yes"}
    rng = np.random.default_rng(0)
    for _ in range(40):
        keep = [f for f in full if rng.random() < 0.5]
        r = fuse(model, 0.4, 0.5, {f: full[f] for f in keep})
        assert 0 < r.prob < 1 and set(r.used) == set(keep)
        assert r.inputs == ("photo only" if not keep else f"photo + {len(keep)} answer" + "s" * (len(keep) != 1))
    # answers move the probability the way the training signal points
    assert fuse(model, 0.4, 0.5, {"bleed": "yes"}).prob > fuse(model, 0.4, 0.5, {"bleed": "no"}).prob


def test_the_answers_used_are_named_in_words_not_column_names(model_and_data):
    from core.context import FIELDS
    model, _, _ = model_and_data
    r = fuse(model, 0.4, 0.5, {"bleed": "yes", "age": 70, "elevation": "no"})
    assert r.used == ("age", "bleed", "elevation") and r.used_words == "age, bleeding, raised"
    words = [spec.word for spec in FIELDS.values()]
    assert all(words) and len(set(words)) == len(words)  # every field named, no two alike


def test_no_answer_gives_the_image_only_result(model_and_data):
    model, _, _ = model_and_data
    for answers in (None, {}, {"age": None, "bleed": ""}, {"bleed": "not answered"}):
        r = fuse(model, 0.37, 0.2, answers)
        assert (r.prob, r.threshold, r.malignant, r.used) == (0.37, 0.2, True, ())
        assert r.inputs == "photo only" and not r.verdicts_differ
    assert fuse(None, 0.1, 0.2, {"bleed": "yes"}).ignored == ("bleed",)


def test_bad_answers_are_named():
    with pytest.raises(ContextError, match="age.*outside"):
        normalise("age", 250)
    with pytest.raises(ContextError, match="site.*elbowpit"):
        normalise("site", "elbowpit")
    with pytest.raises(ContextError, match="bleed.*sometimes"):
        normalise("bleed", "sometimes")
    assert normalise("bleed", "UNK") == "unknown" and normalise("bleed", "True") == "yes"
    assert site_of("NOSE") == "head_neck" and site_of("left upper back") == "torso_back"
    assert site_of("anterior torso") == "torso_front"


def test_model_round_trips_through_plain_json_and_applies_by_its_formula(model_and_data):
    model, _, _ = model_and_data
    back = ContextModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert back == model
    answers = {"age": 64, "site": "upper_limb", "bleed": "yes"}
    d = model.to_dict()
    w = d["weights"]
    by_hand = d["intercept"] + w["age"]["weight"] * (64 - w["age"]["mean"]) / w["age"]["std"] + \
        w["site"]["weights"]["upper_limb"] + w["bleed"]["weights"]["yes"] + \
        sum(w[f]["missing"] for f in d["fields"] if f not in answers)
    z = d["fusion"]["intercept"] + d["fusion"]["image"] * np.log(0.3 / 0.7) + d["fusion"]["context"] * by_hand
    assert fuse(back, 0.3, 0.5, answers).prob == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-9)


# ---------------------------------------------------------------- the fused probability's interval
def _refits(model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.array(model.fusion_bootstrap[k]) for k in ("intercept", "image", "context"))


def test_fused_probability_interval_spans_the_fusion_refitted_on_resampled_patients(model_and_data):
    model, df, _ = model_and_data
    boot = model.fusion_bootstrap
    assert boot["unit"] == "patients" and boot["n"] == int((df["split"] == "val").sum())
    assert 25 <= boot["fits"] <= 50 and "held fixed" in boot["meaning"]
    a, b, c = _refits(model)
    assert a.std() > 0.01 and b.std() > 0.01 and c.std() > 0.01  # resampled data move all three numbers
    assert abs(np.median(b) - model.fusion["image"]) < 3 * b.std()  # around the fitted fusion, not elsewhere
    answers = {"age": 70, "bleed": "yes"}
    r = fuse(model, 0.4, 0.5, answers)
    z_ctx = model.context_logit({"age": 70.0, "bleed": "yes"})
    lo, hi = np.quantile(1 / (1 + np.exp(-(a + b * np.log(0.4 / 0.6) + c * z_ctx))), [0.025, 0.975])
    assert r.ci95 == pytest.approx((min(lo, r.prob), max(hi, r.prob)), abs=1e-12)
    assert r.ci95[0] < r.prob < r.ci95[1] and r.ci95[1] - r.ci95[0] > 0.01
    assert fuse(model, 0.4, 0.5, {}).ci95 is None  # photo only: the photo-only result, with its own interval
    sentence = model.interval_sentence(r.ci95, "A to B")
    assert sentence.startswith(f"95% interval A to B: the fusion refitted on {boot['fits']} bootstrap resamples of "
                               f"the {boot['n']} photos it was fitted on (whole patients resampled)")


def test_fused_interval_narrows_with_more_validation_patients():
    widths = []
    for n in (240, 960):
        df, prob = synthetic(n=n, seed=3)
        r = fuse(fitted(df, prob), 0.4, 0.5, {"age": 70, "bleed": "yes"})
        widths.append(r.ci95[1] - r.ci95[0])
    assert widths[1] < 0.75 * widths[0]


def test_fused_interval_is_contained_around_its_point_and_survives_json(model_and_data):
    model, _, _ = model_and_data
    back = ContextModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert back.fusion_bootstrap == model.fusion_bootstrap
    assert fuse(back, 0.7, 0.5, {"bleed": "no"}).ci95 == fuse(model, 0.7, 0.5, {"bleed": "no"}).ci95
    # refits all on one side of the fitted fusion: the interval is widened to hold the number shown
    d = model.to_dict()
    k = d["fusion_bootstrap"]["fits"]
    one_sided = ContextModel.from_dict({**d, "fusion_bootstrap": {**d["fusion_bootstrap"], "intercept": [5.0] * k,
                                                                  "image": [0.0] * k, "context": [0.0] * k}})
    r = fuse(one_sided, 0.3, 0.5, {"bleed": "no"})
    assert r.ci95[0] == r.prob and r.ci95[1] == pytest.approx(1 / (1 + np.exp(-5.0)))


def test_a_stage_without_refits_has_no_interval_and_says_why(model_and_data):
    df, prob = synthetic()
    assert fitted(df, prob, n_boot=0).fusion_bootstrap == {}
    model, _, _ = model_and_data
    old = {k: v for k, v in model.to_dict().items() if k != "fusion_bootstrap"}  # a bundle from before them
    stage = ContextModel.from_dict(old)
    r = fuse(stage, 0.4, 0.5, {"bleed": "yes"})
    assert r.ci95 is None and stage.interval_sentence(None, "").startswith("No interval: this context stage has no "
                                                                             "refits")


@pytest.mark.parametrize("change", [{"image": [1.0]}, {"context": "x"}, {"fits": 0},
                                    {"intercept": [float("nan")] * 50}])
def test_malformed_fusion_refits_are_refused_when_loaded(model_and_data, change):
    model, _, _ = model_and_data
    d = model.to_dict()
    boot = {**d["fusion_bootstrap"], "fits": 50, "intercept": [0.0] * 50, "image": [1.0] * 50, "context": [1.0] * 50}
    with pytest.raises(ContextError, match="fusion_bootstrap"):
        ContextModel.from_dict({**d, "fusion_bootstrap": {**boot, **change}}, where="bundle.json context")


def test_without_patient_ids_the_fusion_refits_resample_photos():
    df, prob = synthetic()
    assert fitted(df.drop(columns="patient_id"), prob).fusion_bootstrap["unit"] == "photos"


def test_threshold_and_validation_numbers_are_stored(model_and_data):
    model, _, _ = model_and_data
    for t in (model.threshold, model.context_threshold):
        assert 0 < t["value"] < 1 and t["rule"] == "sensitivity" and "validation" in t["chosen_on"]
        assert t["val_sensitivity"]["value"] >= 0.9 and t["val_specificity"]["ci95"] is not None
    assert model.missing_rule in ("masked_level", "expected")
    assert set(model.fitted["missing_rule_val_log_loss"]) == {"masked_level", "expected"}


def test_report_side_by_side_with_each_answer_withheld(model_and_data):
    model, df, prob = model_and_data
    test = df[df["split"] == "test"].reset_index(drop=True)
    rep = context_report(test, prob[(df["split"] == "test").to_numpy()], 0.5, model, n_boot=50)
    for key in ("image_only", "context_only", "fused"):
        assert rep[key]["metrics"]["roc_auc"]["ci95"] is not None
    assert set(rep["withheld"]) == {*model.fields, "all answers"}
    # with every answer withheld a user gets the photo-only result at the photo-only threshold (as `fuse` does)
    assert rep["withheld"]["all answers"]["metrics"] == rep["image_only"]["metrics"]
    assert rep["fused"]["metrics"]["roc_auc"]["value"] > rep["image_only"]["metrics"]["roc_auc"]["value"]
    assert set(rep["weights_per_field"]["bleed"]) == {"yes", "no", "unknown", "missing"}


def test_context_frame_takes_only_the_stable_columns():
    df = pd.DataFrame({"age": ["40", None], "bleed": ["UNK", "False"], "biopsed": ["True", "False"]})
    frame = context_frame(df, CONTEXT_COLUMNS)
    assert list(frame.columns) == list(CONTEXT_COLUMNS)
    assert frame["bleed"].tolist() == ["unknown", "no"] and frame["sex"].isna().all()


def test_screen_fields_keeps_fields_missing_at_random():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    a = pd.DataFrame({"bleed": np.where(rng.random(200) < 0.3, None, "yes")})
    kept, excluded = screen_fields(a, y, np.arange(200) // 2)
    assert kept == ["bleed"] and not excluded


def test_screen_fields_leaves_out_a_field_only_a_few_patients_answered():
    """Twelve photos of one patient answering it would teach the model that patient's label, not the question."""
    y = np.tile([0, 1], 100)
    groups = np.arange(200) // 4
    a = pd.DataFrame({"age": np.where(groups == 3, 60.0, np.nan), "bleed": "yes"})
    a.loc[groups == 3, "age"] = np.arange(4) + 60.0
    a.loc[(groups >= 4) & (groups < 6), "age"] = 50.0  # 12 answers from 3 patients
    kept, excluded = screen_fields(a, y, groups)
    assert kept == ["bleed"] and excluded == {"age": "only 3 training patients answered it (12 images)"}


def test_a_fold_that_holds_one_class_gives_a_context_error_naming_the_folds_not_a_crash():
    """3 folds, one of them benign only: the stage can still be fitted (every fold's complement holds both
    classes), but the check on new patients cross-fits inside the other two folds, where fold 2 alone is fitted on
    for fold 1's inner scores: a ContextError that the cv run records as a note (not a failed run)."""
    df, prob = cv_rows(k=3)
    fields = ("age", "site", "bleed", "grew")
    keep = ~((df["fold"] == 2) & (df["label"] == 1)).to_numpy()
    df, prob = df[keep].reset_index(drop=True), prob[keep]
    model = fit_context_cv(df, prob, fields, where="out-of-fold predictions (3 folds)", n_boot=0)
    assert model.threshold["n_val"] == len(df)
    with pytest.raises(ContextError, match=r"fold 2 \(to score fold 1\) holds one class only"):
        crossfit_fused_probs(df, prob, fields)


def test_the_context_models_regularisation_says_when_it_was_not_measured():
    """No grouped fold with both classes: C is the grid's strongest, said so, and the losses are null (strict
    JSON), never Infinity."""
    from core.context_fit import C_GRID, _fit_answers
    y = np.array([0, 0, 0, 1, 1, 1] * 2)
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])  # every patient one class, so every held-out part too
    a = pd.DataFrame({"bleed": np.where(y == 1, "yes", "no")})
    model = _fit_answers(a, y, groups, "expected", seed=0)
    assert model.fitted["C"] == min(C_GRID) and model.fitted["C_chosen_by"].startswith("default")
    assert set(model.fitted["cv_log_loss"].values()) == {None}
    json.dumps(model.to_dict(), allow_nan=False)
    measured = fitted(*synthetic())
    assert measured.fitted["C_chosen_by"] == "grouped 5-fold cross-validation"
    assert None not in measured.fitted["cv_log_loss"].values()


def test_single_split_fits_refuse_one_class_or_one_patient_with_a_context_error():
    df, prob = synthetic()
    val = (df["split"] == "val").to_numpy()
    benign_train = df[(df["split"] == "train") & (df["label"] == 0)]
    with pytest.raises(ContextError, match="one class only .*all benign"):
        fit_context(benign_train, df[val], prob[val], ("age", "bleed"), n_boot=0)
    one_patient = df[val & (df["patient_id"] == df.loc[val, "patient_id"].iloc[0]).to_numpy()]
    with pytest.raises(ContextError, match="validation split holds one patient"):
        fit_context(df[df["split"] == "train"], one_patient, np.full(len(one_patient), 0.5), ("age", "bleed"),
                    n_boot=0)


def test_a_numeric_field_no_row_answered_adds_nothing_instead_of_nan():
    """An inner fold can hold no answer to a field others answered: its column is all zero, not NaN."""
    from core.context_fit import _design, _stats
    a = pd.DataFrame({"age": [np.nan, np.nan, np.nan]})
    stats = _stats(a)
    assert stats["age"] == {"mean": 0.0, "std": 1.0}
    assert np.array_equal(_design(pd.DataFrame({"age": [np.nan, 70.0]}), stats, "expected"), [[0.0], [4.0]])


def test_context_frame_can_count_a_bad_answer_as_unanswered_and_say_why():
    df = pd.DataFrame({"age": [150, 40, "abc"], "bleed": ["True", "sometimes", None]}, index=[7, 8, 9])
    with pytest.raises(ContextError, match="age: 150"):
        context_frame(df, ["age", "bleed"])
    problems = {}
    frame = context_frame(df, ["age", "bleed"], problems)
    assert frame["age"].isna().tolist() == [True, False, True] and frame["bleed"].fillna("-").tolist() == ["yes", "-", "-"]
    assert sorted(problems) == [0, 1, 2]  # row positions, whatever the index
    assert "outside 0-120" in problems[0][0] and "yes/no/unknown" in problems[1][0] and "not a number" in problems[2][0]


def test_fewer_answers_than_the_stage_has_are_said_to_be_unmeasured():
    from core.context import ContextModel
    from tests.conftest import hand_context_stage
    stage = ContextModel.from_dict(hand_context_stage())  # 4 questions
    assert "with 2 answered here, how well it does is not measured" in stage.answered_note(["age", "bleed"])
    assert stage.answered_note(["age", "site", "bleed", "grew"]) is None
