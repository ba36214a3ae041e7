"""Tests for core.metrics: agreement with scikit-learn, undefined-value handling, bootstrap and thresholds."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from core import metrics as M

SEEDS = range(6)
# The worked example from the brief: one positive (0.35) ranks below one negative (0.4).
HAND_Y = [0, 0, 1, 1]
HAND_P = [0.1, 0.4, 0.35, 0.8]


def random_case(seed, n=120, ties=False):
    """Noisy but informative scores; rounding to 1 decimal creates many ties."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0.0, 1.0)
    return y, (np.round(p, 1) if ties else p)


def sklearn_metrics(y, p, threshold):
    """Reference values; zero_division=nan is exactly where core.metrics returns None."""
    pred = (np.asarray(p) >= threshold).astype(int)
    both = len(set(np.asarray(y).tolist())) == 2
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "accuracy": accuracy_score(y, pred),
        "precision": precision_score(y, pred, zero_division=np.nan),
        "recall": recall_score(y, pred, zero_division=np.nan),
        "specificity": tn / (tn + fp) if tn + fp else np.nan,
        "f1": f1_score(y, pred, zero_division=np.nan),
        "roc_auc": roc_auc_score(y, p) if both else np.nan,
        "pr_auc": average_precision_score(y, p) if both else np.nan,
    }


def assert_matches_reference(ours, reference):
    for name in M.METRIC_NAMES:
        if math.isnan(reference[name]):
            assert ours[name] is None, name
        else:
            assert ours[name] == pytest.approx(reference[name], abs=1e-12), name


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 1, 1], [0.2, 0.8], "same length"),
        ([], [], "empty"),
        ([0, 2, 1], [0.1, 0.5, 0.9], "only 0/1 labels; found 2"),
        ([0, -1], [0.1, 0.5], "only 0/1 labels"),
        ([0.0, float("nan")], [0.1, 0.5], "only 0/1 labels"),
        (["0", "1"], [0.1, 0.5], "strings"),
        ([0, 1], [0.1, float("nan")], "finite; found nan at index 1"),
        ([0, 1], [float("inf"), 0.5], "finite"),
        ([0, 1], [0.1, 1.5], r"\[0, 1\]; found 1.5 at index 1"),
        ([0, 1], [-0.2, 0.5], "logits"),
        ([[0, 1]], [[0.1, 0.5]], "1-D"),
    ],
)
def test_bad_inputs_raise_specific_messages(y, p, message):
    with pytest.raises(ValueError, match=message):
        M.point_metrics(y, p, 0.5)


@pytest.mark.parametrize("threshold", [-0.1, 1.1, float("nan"), True, "0.5", None])
def test_bad_threshold_raises(threshold):
    with pytest.raises(ValueError, match="threshold must be a number in"):
        M.point_metrics([0, 1], [0.2, 0.8], threshold)


def test_validation_applies_to_every_entry_point():
    y, p = [0, 1, 2], [0.1, 0.5, 0.9]
    calls = [
        lambda: M.roc_points(y, p),
        lambda: M.bootstrap_ci(y, p, 0.5, n_boot=10),
        lambda: M.metric_report(y, p, 0.5, n_boot=10),
        lambda: M.subgroup_reports(y, p, 0.5, ["a", "b", "c"], n_boot=10),
        lambda: M.choose_threshold(y, p),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="only 0/1 labels"):
            call()


def test_confusion_validates_predictions():
    with pytest.raises(ValueError, match="y_pred must contain only 0/1 labels"):
        M.confusion([0, 1], [0, 2])
    with pytest.raises(ValueError, match="same length"):
        M.confusion([0, 1], [0])


def test_bootstrap_argument_errors():
    y, p = [0, 1, 0, 1], [0.1, 0.9, 0.3, 0.6]
    with pytest.raises(ValueError, match="n_boot must be an integer >= 1"):
        M.bootstrap_ci(y, p, 0.5, n_boot=0)
    with pytest.raises(ValueError, match="level must be strictly between 0 and 1"):
        M.bootstrap_ci(y, p, 0.5, n_boot=10, level=1.0)
    with pytest.raises(ValueError, match="groups must have one entry per sample"):
        M.bootstrap_ci(y, p, 0.5, groups=["a", "b"], n_boot=10)
    with pytest.raises(ValueError, match="groups must be hashable"):
        M.bootstrap_ci(y, p, 0.5, groups=["a", ["b"], "c", "d"], n_boot=10)
    with pytest.raises(ValueError, match="n_boot must be an integer >= 0"):
        M.metric_report(y, p, 0.5, n_boot=-1)


# --------------------------------------------------------------------------- confusion and point metrics


def test_hand_worked_example():
    assert M.confusion(HAND_Y, [0, 0, 0, 1]) == {"tn": 2, "fp": 0, "fn": 1, "tp": 1}
    values = M.point_metrics(HAND_Y, HAND_P, 0.5)
    assert values["accuracy"] == 0.75
    assert values["precision"] == 1.0
    assert values["recall"] == 0.5
    assert values["specificity"] == 1.0
    assert values["f1"] == pytest.approx(2 / 3)
    assert values["roc_auc"] == 0.75  # 3 of 4 positive/negative pairs ordered correctly
    assert values["pr_auc"] == pytest.approx((1 + 2 / 3) / 2)  # precision 1 at 0.8, 2/3 at 0.35


def test_threshold_is_inclusive():
    # prob == threshold counts as a positive prediction.
    assert M.point_metrics([1, 0], [0.5, 0.2], 0.5)["recall"] == 1.0
    assert M.point_metrics([1, 0], [0.5, 0.2], 0.5000001)["recall"] == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_confusion_matches_sklearn(seed):
    y, p = random_case(seed)
    pred = (p >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert M.confusion(y, pred) == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_point_metrics_match_sklearn(seed, ties, threshold):
    y, p = random_case(seed, ties=ties)
    assert_matches_reference(M.point_metrics(y, p, threshold), sklearn_metrics(y, p, threshold))


@pytest.mark.parametrize(
    ("y", "p", "threshold", "expected_none"),
    [
        # No predicted positives, both classes: precision undefined, f1 is 0 (missed every positive).
        ([0, 1, 1], [0.1, 0.2, 0.3], 0.5, {"precision"}),
        # No positives: recall and both AUCs undefined; f1 = 0 because of the false positive.
        ([0, 0, 0], [0.1, 0.6, 0.3], 0.5, {"recall", "roc_auc", "pr_auc"}),
        # No positives and none predicted: f1 has no errors and no hits to weigh -> undefined.
        ([0, 0, 0], [0.1, 0.2, 0.3], 0.5, {"precision", "recall", "f1", "roc_auc", "pr_auc"}),
        # No negatives: specificity and both AUCs undefined.
        ([1, 1], [0.9, 0.2], 0.5, {"specificity", "roc_auc", "pr_auc"}),
    ],
)
def test_undefined_values_are_none_and_agree_with_sklearn(y, p, threshold, expected_none):
    values = M.point_metrics(y, p, threshold)
    assert {name for name, v in values.items() if v is None} == expected_none
    assert_matches_reference(values, sklearn_metrics(y, p, threshold))


def test_f1_is_zero_not_none_when_nothing_is_right():
    values = M.point_metrics([0, 1, 1], [0.1, 0.2, 0.3], 0.5)
    assert values["f1"] == 0.0 and values["recall"] == 0.0


def test_outputs_are_plain_python_and_json_safe():
    values = M.point_metrics(np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3]), np.float64(0.5))
    assert all(v is None or type(v) is float for v in values.values())
    json.dumps(values, allow_nan=False)
    assert all(type(v) is int for v in M.confusion(np.array([0, 1]), np.array([1, 1])).values())


def test_accepts_bool_labels_and_lists():
    assert M.point_metrics([False, True], [0.2, 0.9], 0.5) == M.point_metrics([0, 1], [0.2, 0.9], 0.5)


# ------------------------------------------------------------------ bootstrap engine (vectorised AUCs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_weighted_engine_matches_sklearn_on_resamples(seed, ties):
    # Integer weights w mean "item i appears w[i] times": compare with sklearn on the expanded data.
    y, p = random_case(seed, n=60, ties=ties)
    rng = np.random.default_rng(100 + seed)
    weights = rng.multinomial(len(y), np.full(len(y), 1 / len(y)), size=8).astype(float)
    batch = M._weighted_metrics(y, p, 0.5, weights)
    for b, w in enumerate(weights):
        idx = np.repeat(np.arange(len(y)), w.astype(int))
        reference = sklearn_metrics(y[idx], p[idx], 0.5)
        ours = {name: M._to_python(batch[name][b]) for name in M.METRIC_NAMES}
        assert_matches_reference(ours, reference)


# --------------------------------------------------------------------------- roc_points


def test_roc_points_match_sklearn_with_json_safe_first_threshold():
    y, p = random_case(3)
    points = M.roc_points(y, p)
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=True)
    assert points["fpr"] == pytest.approx(fpr.tolist())
    assert points["tpr"] == pytest.approx(tpr.tolist())
    assert np.isinf(thresholds[0]) and points["thresholds"][0] == 1.0
    assert points["thresholds"][1:] == pytest.approx(thresholds[1:].tolist())
    json.dumps(points, allow_nan=False)


def test_roc_points_hand_case_and_one_class():
    points = M.roc_points(HAND_Y, HAND_P)
    assert points["fpr"] == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert points["tpr"] == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert M.roc_points([1, 1, 1], [0.2, 0.5, 0.9]) is None


# --------------------------------------------------------------------------- bootstrap_ci


def test_ci_contains_point_value_and_is_ordered():
    y, p = random_case(0, n=300)
    values = M.point_metrics(y, p, 0.5)
    cis = M.bootstrap_ci(y, p, 0.5, n_boot=200)
    for name in M.METRIC_NAMES:
        lo, hi = cis[name]
        assert lo < values[name] < hi, name
        assert 0.0 <= lo and hi <= 1.0


def test_ci_width_matches_binomial_theory_for_accuracy():
    # For n independent items the accuracy CI is ~ acc +- 1.96 sqrt(acc (1 - acc) / n).
    y, p = random_case(1, n=400)
    acc = M.point_metrics(y, p, 0.5)["accuracy"]
    lo, hi = M.bootstrap_ci(y, p, 0.5, n_boot=1000)["accuracy"]
    expected_width = 2 * 1.96 * math.sqrt(acc * (1 - acc) / len(y))
    assert hi - lo == pytest.approx(expected_width, rel=0.15)


def test_bootstrap_is_deterministic_for_a_seed():
    y, p = random_case(2, n=80)
    first = M.bootstrap_ci(y, p, 0.5, n_boot=200, seed=7)
    assert M.bootstrap_ci(y, p, 0.5, n_boot=200, seed=7) == first
    assert M.bootstrap_ci(y, p, 0.5, n_boot=200, seed=8) != first


def test_level_controls_width():
    y, p = random_case(4, n=100)
    wide = M.bootstrap_ci(y, p, 0.5, n_boot=200, level=0.95)["roc_auc"]
    narrow = M.bootstrap_ci(y, p, 0.5, n_boot=200, level=0.5)["roc_auc"]
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def duplicated_patients(copies, n_patients=40, seed=5):
    """Each patient contributes `copies` identical images: perfectly correlated within patient."""
    y, p = random_case(seed, n=n_patients)
    patient = np.repeat(np.arange(n_patients), copies)
    return y, p, np.repeat(y, copies), np.repeat(p, copies), [f"patient-{i}" for i in patient]


def test_cluster_bootstrap_moves_whole_patients():
    # Resampling patients of the duplicated data is the same as resampling the patient-level
    # data (same draws, every metric is a ratio of counts), so the intervals must coincide.
    y, p, y_dup, p_dup, patients = duplicated_patients(copies=10)
    per_patient = M.bootstrap_ci(y, p, 0.5, n_boot=200, seed=3)
    clustered = M.bootstrap_ci(y_dup, p_dup, 0.5, groups=patients, n_boot=200, seed=3)
    for name in M.METRIC_NAMES:
        assert clustered[name] == pytest.approx(per_patient[name], abs=1e-12), name


def test_ignoring_patients_makes_intervals_too_narrow():
    _, _, y_dup, p_dup, patients = duplicated_patients(copies=10)
    naive = M.bootstrap_ci(y_dup, p_dup, 0.5, n_boot=200)
    clustered = M.bootstrap_ci(y_dup, p_dup, 0.5, groups=patients, n_boot=200)
    for name in ("accuracy", "roc_auc"):
        naive_width = naive[name][1] - naive[name][0]
        clustered_width = clustered[name][1] - clustered[name][0]
        assert clustered_width > 2 * naive_width, name  # ~sqrt(10) in theory


def test_missing_group_ids_are_their_own_groups():
    y, p = random_case(6, n=50)
    groups = [None] * 25 + [float("nan")] * 25
    assert M.bootstrap_ci(y, p, 0.5, groups=groups, n_boot=100) == M.bootstrap_ci(y, p, 0.5, n_boot=100)


def test_ci_is_none_when_too_few_resamples_define_the_metric(monkeypatch):
    # One positive in 20 images: ~36% of resamples miss it, leaving recall undefined there.
    y = np.zeros(20, dtype=int)
    y[0] = 1
    p = np.linspace(0.05, 0.95, 20)
    assert M.bootstrap_ci(y, p, 0.5, n_boot=200)["recall"] is not None
    monkeypatch.setattr(M, "MIN_VALID_FRACTION", 0.9)
    cis = M.bootstrap_ci(y, p, 0.5, n_boot=200)
    assert cis["recall"] is None and cis["roc_auc"] is None
    assert cis["accuracy"] is not None  # always defined


def test_percentile_interval_threshold_is_half_of_resamples():
    exactly_half = np.array([np.nan] * 5 + [0.2, 0.4, 0.6, 0.8, 1.0])
    assert M.percentile_interval(exactly_half, 0.95) is not None
    assert M.percentile_interval(np.r_[np.nan, exactly_half], 0.95) is None
    assert M.percentile_interval(np.full(4, np.nan), 0.95) is None


def test_one_class_gives_no_auc_interval():
    cis = M.bootstrap_ci([0] * 10, np.linspace(0, 1, 10), 0.5, n_boot=100)
    assert cis["roc_auc"] is None and cis["pr_auc"] is None and cis["recall"] is None
    assert cis["specificity"] is not None


# --------------------------------------------------------------------------- metric_report


def test_metric_report_structure_and_values():
    y, p = random_case(1, n=60)
    patients = np.arange(60) // 2
    report = M.metric_report(y, p, 0.4, groups=patients, n_boot=200, seed=1)
    json.dumps(report, allow_nan=False)
    assert set(report["metrics"]) == set(M.METRIC_NAMES)
    values = M.point_metrics(y, p, 0.4)
    cis = M.bootstrap_ci(y, p, 0.4, groups=patients, n_boot=200, seed=1)
    for name in M.METRIC_NAMES:
        assert report["metrics"][name] == {"value": values[name], "ci95": cis[name]}
    c = M.confusion(y, (p >= 0.4).astype(int))
    assert report["confusion_matrix"] == [[c["tn"], c["fp"]], [c["fn"], c["tp"]]]
    assert report["threshold"] == 0.4
    assert (report["n"], report["n_positive"], report["n_negative"]) == (60, int(y.sum()), 60 - int(y.sum()))
    assert report["n_groups"] == 30
    assert "percentile bootstrap" in report["ci_method"] and "200" in report["ci_method"]
    assert "30 patients" in report["ci_method"]


def test_metric_report_without_groups_says_images():
    y, p = random_case(2, n=40)
    report = M.metric_report(y, p, 0.5, n_boot=50)
    assert report["n_groups"] is None
    assert "40 images" in report["ci_method"]
    assert report["notes"] == []  # n >= 30, both classes, some predicted positives


def test_metric_report_one_class_notes():
    report = M.metric_report([0] * 12, np.linspace(0.0, 0.4, 12), 0.5, n_boot=50)
    assert report["metrics"]["roc_auc"] == {"value": None, "ci95": None}
    notes = " | ".join(report["notes"])
    assert "only one class present" in notes and "ROC-AUC" in notes
    assert "no predicted positives" in notes
    assert "n = 12 < 30" in notes
    json.dumps(report, allow_nan=False)


def test_metric_report_notes_missing_patient_ids_and_missing_intervals(monkeypatch):
    monkeypatch.setattr(M, "MIN_VALID_FRACTION", 0.9)
    y = np.r_[1, np.zeros(39, dtype=int)]
    groups = [None, None] + [i // 2 for i in range(38)]
    report = M.metric_report(y, np.linspace(0.95, 0.05, 40), 0.5, groups=groups, n_boot=100)
    notes = " | ".join(report["notes"])
    assert "2 images without a patient id" in notes
    assert "no interval for Sensitivity (recall)" in notes
    assert report["n_groups"] == 21


def test_metric_report_n_boot_zero_skips_intervals():
    y, p = random_case(3, n=50)
    report = M.metric_report(y, p, 0.5, n_boot=0)
    assert all(entry["ci95"] is None for entry in report["metrics"].values())
    assert report["metrics"]["accuracy"]["value"] == M.point_metrics(y, p, 0.5)["accuracy"]
    assert "n_boot=0" in report["ci_method"]


# --------------------------------------------------------------------------- subgroup_reports


def test_subgroup_reports_split_and_unknown_last():
    y, p = random_case(4, n=90)
    skin = np.array(["III", "I", None] * 30, dtype=object)
    skin[3] = float("nan")  # NaN is missing too (index 3 was "III")
    reports = M.subgroup_reports(y, p, 0.5, skin, n_boot=50)
    assert list(reports) == ["I", "III", "unknown"]
    for key, value in [("I", "I"), ("III", "III")]:
        mask = skin == value
        expected = M.metric_report(y[mask], p[mask], 0.5, n_boot=50)
        assert reports[key] == expected
    assert reports["unknown"]["n"] == 31
    assert sum(r["n"] for r in reports.values()) == 90


def test_subgroup_reports_min_n_and_groups():
    y, p = random_case(5, n=40)
    sub = [1] * 35 + [2] * 5
    patients = [i // 5 for i in range(40)]
    reports = M.subgroup_reports(y, p, 0.5, sub, groups=patients, n_boot=50, min_n=10)
    assert list(reports) == ["1"]
    assert reports["1"]["n_groups"] == 7
    with pytest.raises(ValueError, match="subgroup_values must have one entry per sample"):
        M.subgroup_reports(y, p, 0.5, sub[:-1], n_boot=10)
    with pytest.raises(ValueError, match="min_n"):
        M.subgroup_reports(y, p, 0.5, sub, n_boot=10, min_n=0)


# --------------------------------------------------------------------------- choose_threshold


def sens_spec(y, p, threshold):
    values = M.point_metrics(y, p, threshold)
    return values["recall"], values["specificity"]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_sensitivity_rule_is_highest_threshold_meeting_target(seed, target):
    y, p = random_case(seed, ties=seed % 2 == 0)
    chosen = M.choose_threshold(y, p, "sensitivity", target)
    t = chosen["threshold"]
    assert t in set(p.tolist())
    sens, spec = sens_spec(y, p, t)
    assert sens >= target
    assert chosen["achieved"] == {"sensitivity": sens, "specificity": spec}
    higher = np.unique(p)[np.unique(p) > t]
    if higher.size:  # the next candidate up must miss the target
        assert sens_spec(y, p, higher[0])[0] < target
    assert chosen["rule"] == "sensitivity" and chosen["target"] == target


def test_sensitivity_rule_exact_target_hand_case():
    # 10 positives; sensitivity exactly 0.9 must count as reaching 0.9 despite float rounding.
    y = [1] * 10 + [0] * 5
    p = [0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.3, 0.1, 0.2, 0.4, 0.5, 0.6]
    assert M.choose_threshold(y, p, "sensitivity", 0.9)["threshold"] == 0.91
    assert M.choose_threshold(y, p, "sensitivity", 1.0)["threshold"] == 0.3
    # A computed target (0.1 * 3 = 0.30000000000000004) still matches 3 of 10 positives.
    assert M.choose_threshold(y, p, "sensitivity", 0.1 * 3)["threshold"] == 0.97


@pytest.mark.parametrize("seed", SEEDS)
def test_youden_matches_brute_force(seed):
    y, p = random_case(seed, ties=seed % 2 == 1)
    chosen = M.choose_threshold(y, p, "youden")
    scores = {t: sum(sens_spec(y, p, t)) - 1 for t in np.unique(p).tolist()}
    best = max(scores.values())
    assert scores[chosen["threshold"]] == pytest.approx(best, abs=1e-12)
    assert chosen["threshold"] == min(t for t, j in scores.items() if j >= best - 1e-12)
    assert chosen["target"] is None


def test_youden_tie_prefers_higher_sensitivity():
    # Thresholds 0.6 (sens 1, spec 0.5) and 0.8 (sens 0.5, spec 1) both give J = 0.5.
    chosen = M.choose_threshold([0, 0, 1, 1], [0.2, 0.7, 0.6, 0.8], "youden")
    assert chosen["threshold"] == 0.6
    assert chosen["achieved"] == {"sensitivity": 1.0, "specificity": 0.5}


def test_fixed_rule():
    y, p = random_case(0)
    assert M.choose_threshold(y, p, "fixed", None)["threshold"] == 0.5
    chosen = M.choose_threshold(y, p, "fixed", 0.3)
    assert chosen["threshold"] == 0.3 and chosen["target"] == 0.3
    assert chosen["achieved"]["sensitivity"] == M.point_metrics(y, p, 0.3)["recall"]
    # Fixed thresholds work on one class; the undefined side is None.
    one_class = M.choose_threshold([0, 0], [0.2, 0.7], "fixed", 0.5)
    assert one_class["achieved"] == {"sensitivity": None, "specificity": 0.5}


@pytest.mark.parametrize(
    ("rule", "y", "missing"), [("sensitivity", [0, 0], "malignant"), ("youden", [1, 1], "benign")]
)
def test_data_driven_rules_reject_one_class(rule, y, missing):
    with pytest.raises(ValueError, match=f"needs both classes.*no {missing}"):
        M.choose_threshold(y, [0.3, 0.6], rule)


def test_choose_threshold_argument_errors():
    with pytest.raises(ValueError, match="unknown rule 'f1'"):
        M.choose_threshold([0, 1], [0.3, 0.6], "f1")
    with pytest.raises(ValueError, match="target must be a number in"):
        M.choose_threshold([0, 1], [0.3, 0.6], "sensitivity", 1.5)
    with pytest.raises(ValueError, match="needs a target"):
        M.choose_threshold([0, 1], [0.3, 0.6], "sensitivity", None)


# --------------------------------------------------------------------------- format_table


def test_format_table_layout_and_cells():
    metrics = {name: {"value": None, "ci95": None} for name in M.METRIC_NAMES}
    metrics["accuracy"] = {"value": 0.8123, "ci95": [0.7412, 0.8687]}
    metrics["roc_auc"] = {"value": 0.9, "ci95": None}
    table = M.format_table([("ResNet-50", metrics), ("A much longer model name", metrics)])
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == [
        "Model", "Accuracy", "Precision (PPV)", "Sensitivity (recall)", "Specificity", "F1", "ROC-AUC",
    ]
    cells = [c.strip() for c in lines[2].split("|")]
    assert cells == ["ResNet-50", "0.812 [0.74, 0.87]", "n/a", "n/a", "n/a", "n/a", "0.900"]
    # Columns line up: every row has its separators at the same offsets.
    offsets = {tuple(i for i, ch in enumerate(line) if ch in "|+") for line in lines}
    assert len(offsets) == 1


def test_format_table_accepts_report_metrics():
    y, p = random_case(1, n=50)
    report = M.metric_report(y, p, 0.5, n_boot=50)
    value = report["metrics"]["recall"]["value"]
    lo, hi = report["metrics"]["recall"]["ci95"]
    assert f"{value:.3f} [{lo:.2f}, {hi:.2f}]" in M.format_table([("model", report["metrics"])])


# --------------------------------------------------------------------------- registries


NPV = M.Metric("npv", "NPV", lambda tn, fp, fn, tp: tn / (tn + fn), selectable=True)


def test_a_metric_added_to_the_registry_is_computed_tabled_and_selectable(monkeypatch):
    from core import reports
    from core.config import ConfigError, run_config_from_dict
    from tests.conftest import tiny_config
    monkeypatch.setattr(M, "METRICS", M.METRICS + (NPV,))
    y, p = [0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.6, 0.3, 0.7, 0.9]
    report = M.metric_report(y, p, 0.5, n_boot=20)
    assert report["metrics"]["npv"]["value"] == pytest.approx(2 / 3)  # tn 2, fn 1
    assert M.point_metrics(y, p, 0.5)["npv"] == pytest.approx(2 / 3)
    assert M.format_table([("m", report["metrics"])]).splitlines()[0].rstrip().endswith("| NPV")
    table = reports.metrics_table({"m": report})
    assert table.loc[0, "NPV"].startswith("0.667")
    assert "npv" in M.selection_metrics()
    assert run_config_from_dict(tiny_config("l.csv", "imgs", select_metric="npv")).select_metric == "npv"
    monkeypatch.setattr(M, "METRICS", M.METRICS[:-1])
    with pytest.raises(ConfigError, match="select_metric must be one of .*roc_auc"):
        run_config_from_dict(tiny_config("l.csv", "imgs", select_metric="npv"))


def test_selection_score_orients_every_metric_higher_is_better():
    values = {"roc_auc": 0.8, "loss": 0.3, "recall": None}
    assert M.selection_score(values, "roc_auc") == 0.8 and M.selection_score(values, "loss") == -0.3
    assert M.selection_score(values, "recall") == -math.inf
    assert "loss" in M.selection_metrics() and "specificity" not in M.selection_metrics()


def test_threshold_rules_registry_drives_defaults_validation_and_text():
    from core.config import ConfigError, ThresholdConfig
    assert set(M.THRESHOLD_RULES) == {"sensitivity", "youden", "fixed"}
    assert ThresholdConfig("sensitivity").target == 0.9 and ThresholdConfig("fixed").target == 0.5
    assert ThresholdConfig("youden").target is None
    with pytest.raises(ConfigError, match="threshold.rule must be one of sensitivity, youden, fixed"):
        ThresholdConfig("vibes")
    assert M.describe_rule("sensitivity", 0.95) == "highest threshold reaching 95% validation sensitivity"
    assert M.describe_rule("youden") == "maximises Youden's J on validation predictions"
    assert M.describe_rule("sensitivity", 0.9, on="out-of-fold") == \
        "highest threshold reaching 90% out-of-fold sensitivity"
    assert M.describe_rule("majority vote") == "majority vote" and M.describe_rule(None) == "?"


def test_one_spelling_of_an_estimate():
    assert M.format_estimate({"value": 0.8123, "ci95": [0.7412, 0.8687]}) == "0.812 [0.74, 0.87]"
    assert M.format_estimate({"value": 0.9, "ci95": [None, 0.95]}) == "0.900"
    # an old report's collapsed bootstrap at 1 is not shown as a certainty; a real interval touching 1 is
    assert M.format_estimate({"value": 1.0, "ci95": [1.0, 1.0]}) == "1.000 [CI n/a]"
    assert M.format_estimate({"value": 1.0, "ci95": [0.88, 1.0]}) == "1.000 [0.88, 1.00]"
    assert M.format_percent({"value": 1.0, "ci95": [1.0, 1.0]}) == "100% (95% CI not available)"
    assert M.format_estimate(float("nan")) == "n/a" and M.format_estimate(None, missing="?") == "?"
    assert M.format_percent({"value": 0.9, "ci95": [0.8, 0.97]}) == "90% (95% CI 80%–97%)"
    assert M.format_percent(None) == "not recorded"


# --------------------------------------------------------------------------- paired comparison
def test_paired_auc_difference_is_b_minus_a_and_its_interval_is_narrower_than_unpaired():
    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random(n) < 0.4).astype(int)
    shared = rng.normal(0, 1, n)  # what both models see in a photo: cancels in the paired difference
    a = 1 / (1 + np.exp(-(1.0 * y + shared + rng.normal(0, 0.3, n))))
    b = 1 / (1 + np.exp(-(1.3 * y + shared + rng.normal(0, 0.3, n))))
    groups = np.arange(n) // 2
    d = M.paired_auc_difference(y, a, b, groups=groups, n_boot=500, seed=0)
    for key in ("roc_auc", "pr_auc"):
        assert d[key]["a"] == pytest.approx(M.point_metrics(y, a, 0.5)[key])
        assert d[key]["b"] == pytest.approx(M.point_metrics(y, b, 0.5)[key])
        assert d[key]["difference"]["value"] == pytest.approx(d[key]["b"] - d[key]["a"])
    lo, hi = d["roc_auc"]["difference"]["ci95"]
    assert 0 < lo < d["roc_auc"]["difference"]["value"] < hi  # b is better, and the pairing can tell
    width_a = np.subtract(*M.bootstrap_ci(y, a, 0.5, groups=groups, n_boot=500)["roc_auc"][::-1])
    assert hi - lo < width_a  # pairing removes the photos' shared difficulty
    assert d["n_groups"] == 150 and "150 patients" in d["ci_method"]
    same = M.paired_auc_difference(y, a, a, n_boot=50)
    assert same["roc_auc"]["difference"] == {"value": 0.0, "ci95": [0.0, 0.0]}
    with pytest.raises(ValueError, match="both classes"):
        M.paired_auc_difference([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])


def test_a_proportion_of_exactly_1_or_0_gets_a_wilson_interval_over_patients_not_a_collapsed_bootstrap():
    # 28 malignant photos from 20 patients, all caught; 46 benign, 20 of them flagged
    y = np.array([1] * 28 + [0] * 46)
    p = np.r_[np.full(28, 0.9), np.full(20, 0.7), np.full(26, 0.1)]
    groups = [f"m{i % 20}" for i in range(28)] + [f"b{i}" for i in range(46)]
    rep = M.metric_report(y, p, 0.5, groups=groups, n_boot=300, seed=0)
    lo, hi = rep["metrics"]["recall"]["ci95"]
    assert rep["metrics"]["recall"]["value"] == 1.0 and hi == 1.0
    assert lo == pytest.approx(20 / (20 + 1.959964 ** 2), abs=1e-6)  # Wilson, n = 20 patients: about 0.84
    assert lo < 0.9  # the bootstrap alone would have said [1.00, 1.00]
    spec_lo, spec_hi = rep["metrics"]["specificity"]["ci95"]  # 26/46: an ordinary bootstrap interval
    assert spec_lo < 26 / 46 < spec_hi < 1
    assert "Wilson score interval over its patients" in rep["ci_method"]
    # without patient ids every image counts; a proportion of 0 gets the mirror interval
    none_caught = M.bootstrap_ci(y, 1 - p, 0.5, n_boot=100)
    assert none_caught["recall"] == pytest.approx([0.0, 1.959964 ** 2 / (28 + 1.959964 ** 2)], abs=1e-6)


def test_format_score_keeps_a_score_and_its_threshold_comparable():
    """0.004 beside 0.000 hid which side of the threshold a score was; a small score keeps 3 significant digits."""
    from core.metrics import format_score
    assert [format_score(p) for p in (0.004445974, 0.00012, 0.5, 0.327, 0.1155, 0.0, 1.0)] == [
        "0.445%", "0.012%", "50.0%", "32.7%", "11.6%", "0.0%", "100.0%"]
    assert format_score(0.00441) != format_score(0.00445)  # distinct below 1%, where the demo's threshold sits
    assert [format_score(p) for p in (3e-7, float("nan"), float("inf"), -0.005)] == ["0.00003%", "n/a", "n/a",
                                                                                     "-0.5%"]


def test_spell_apart_gives_a_score_and_its_threshold_digits_until_they_differ():
    """'Not flagged: below 32.7%' beside a score of 32.7% read as a contradiction; rounding never inverts them."""
    from core.metrics import format_whole_percent, spell_apart
    assert spell_apart(0.32741, 0.32749) == ("32.74%", "32.75%")
    assert spell_apart(0.3, 0.5) == ("30.0%", "50.0%")            # already apart: the usual spelling
    assert spell_apart(0.327, 0.327) == ("32.7%", "32.7%")        # equal values stay equal (at or above: flagged)
    assert spell_apart(0.0044512, 0.0044538) == ("0.4451%", "0.4454%")  # below 1%: significant digits grow
    assert spell_apart(0.331, 0.334, format_whole_percent) == ("33.1%", "33.4%")
    assert spell_apart(0.25, 0.75, format_whole_percent) == ("25%", "75%")
    # a calibrated probability never reads 0% or 100%, however it rounds or saturates
    assert [format_whole_percent(p) for p in (0.004, 0.0, 0.996, 1.0)] == ["<1%", "<1%", ">99%", ">99%"]
    assert spell_apart(0.003, 0.002, format_whole_percent) == ("0.3%", "0.2%")
    assert format_whole_percent(0.0004, 1) == "<0.1%" and format_whole_percent(0.9996, 1) == ">99.9%"
    rng = np.random.default_rng(0)
    for a, b in rng.uniform(0, 1, (200, 2)) * rng.choice([1e-3, 1], (200, 1)):
        sa, sb = spell_apart(a, b)
        assert sa != sb and (float(sa[:-1]) < float(sb[:-1])) == (a < b)
