"""Tests for core.calibration: the map fixes a constructed overconfident model on held-out data, keeps verdicts,
and Brier/ECE (with bootstrap intervals) compute what they claim."""
from __future__ import annotations

import numpy as np
import pytest

from core import calibration as cal


def _overconfident(n, seed, scale=3.0, shift=0.0):
    """Labels drawn from sigmoid(z); the 'model' reports scale * z + shift (too sure of itself)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return scale * z + shift, y


@pytest.mark.parametrize("method", ["temperature", "platt", "auto"])
def test_calibration_lowers_held_out_brier_of_an_overconfident_model(method):
    z_val, y_val = _overconfident(300, seed=0)
    z_test, y_test = _overconfident(2000, seed=1)
    c = cal.fit_calibration(z_val, y_val, method=method)
    raw = 1 / (1 + np.exp(-z_test))
    after = c.apply_logit(z_test)
    assert cal.brier(y_test, after) < cal.brier(y_test, raw) - 0.01
    assert cal.ece(y_test, after) < cal.ece(y_test, raw)
    assert 0.2 < c.slope < 0.5  # the true map is slope 1/3
    assert c.n == 300 and c.prevalence == pytest.approx(y_val.mean())


def test_platt_also_removes_a_shift():
    z_val, y_val = _overconfident(400, seed=0, scale=1.0, shift=2.0)
    c = cal.fit_calibration(z_val, y_val, method="platt")
    assert c.intercept == pytest.approx(-2.0, abs=0.5)


def test_threshold_on_the_calibrated_scale_keeps_every_verdict():
    z_val, y_val = _overconfident(200, seed=0)
    c = cal.fit_calibration(z_val, y_val, method="platt")
    z_test, _ = _overconfident(500, seed=2)
    raw = 1 / (1 + np.exp(-z_test))
    for thr in (0.015, 0.2, 0.5, 0.9):
        assert np.array_equal(raw >= thr, c.apply(raw) >= c.threshold(thr))


def test_apply_on_probabilities_equals_apply_on_logits():
    c = cal.Calibration("platt", 0.4, -0.3, 10, 0.4)
    z = np.linspace(-8, 8, 17)
    np.testing.assert_allclose(c.apply(1 / (1 + np.exp(-z))), c.apply_logit(z), rtol=1e-9)
    assert cal.Calibration.from_meta(c.to_meta()) == c


def test_brier_and_ece_by_hand():
    from sklearn.metrics import brier_score_loss
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.05, 0.15, 0.12, 0.85, 0.95])
    assert cal.brier(y, p) == pytest.approx(brier_score_loss(y, p))
    # bins: [0,.1): p .05 y 0 -> gap .05 (1 item); [.1,.2): p .15,.12 y 0,1 -> mean p .135, y .5 (2 items);
    # [.8,.9): .85 vs 1 (1); [.9,1]: .95 vs 1 (1)
    expected = (0.05 + 2 * abs(0.135 - 0.5) + 0.15 + 0.05) / 5
    assert cal.ece(y, p) == pytest.approx(expected)
    rel = cal.reliability(y, p)
    assert [r["n"] for r in rel] == [1, 2, 1, 1] and rel[1]["observed"] == 0.5


def test_report_intervals_bracket_the_value_and_group_by_patient():
    z, y = _overconfident(120, seed=3)
    p = 1 / (1 + np.exp(-z))
    r = cal.calibration_report(y, p, n_boot=300, seed=0)
    for m in ("brier", "ece"):
        lo, hi = r[m]["ci95"]
        assert lo <= r[m]["value"] <= hi and hi > lo
    # three images per patient: resampling patients gives other (here wider) intervals than images
    groups = np.repeat(np.arange(40), 3)
    rg = cal.calibration_report(y, p, groups=groups, n_boot=300, seed=0)
    assert rg["brier"]["ci95"] != r["brier"]["ci95"] and "40 patients" in rg["ci_method"]
    assert cal.calibration_report(y, p, n_boot=300, seed=0) == r  # deterministic for a seed
    assert r["ci_method"].endswith(cal.ECE_INTERVAL)  # why an ECE interval can sit above its value


def test_bad_inputs():
    with pytest.raises(cal.CalibrationError, match="both classes"):
        cal.fit_calibration([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(cal.CalibrationError, match="one label per logit"):
        cal.fit_calibration([0.1, 0.2], [0, 1, 1])
    with pytest.raises(cal.CalibrationError, match="unknown calibration method"):
        cal.fit_calibration([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1], method="isotonic")


def test_auto_says_why():
    z, y = _overconfident(200, seed=0)
    c = cal.fit_calibration(z, y, method="auto", groups=np.arange(200) // 2)
    assert c.method in cal.METHODS and "out-of-fold Brier" in c.chosen_by


def test_fewer_patients_than_folds_falls_back_to_a_map_instead_of_failing():
    # 3 patients with both classes: grouped CV cannot make 5 folds; "auto" must still give a map and say why
    z, y = _overconfident(60, seed=1)
    c = cal.fit_calibration(z, y, method="auto", groups=np.arange(60) % 3)
    assert c.method in cal.METHODS and c.n == 60
    assert c.chosen_by.startswith("3-fold patient-grouped") and "out-of-fold Brier" in c.chosen_by


def test_the_population_a_map_was_fitted_on_round_trips_and_defaults_to_validation():
    c = cal.fit_calibration(*_overconfident(100, seed=2), method="platt")
    assert c.fitted_on == "validation"
    oof = cal.Calibration(**{**c.__dict__, "fitted_on": "out-of-fold"})
    assert cal.Calibration.from_meta(oof.to_meta()) == oof
    old = {k: v for k, v in c.to_meta().items() if k != "fitted_on"}  # a bundle written before the key
    assert cal.Calibration.from_meta(old).fitted_on == "validation"


def _scores(n, seed):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(float)
    return rng.normal(0, 1, n) + 2.0 * y, y


def test_a_photos_interval_contains_its_calibrated_probability_and_narrows_with_more_photos():
    z, y = _scores(60, 1)
    small = cal.fit_calibration(z, y, method="platt", seed=0)
    z, y = _scores(1200, 1)
    large = cal.fit_calibration(z, y, method="platt", seed=0)
    assert len(small.boot) == len(large.boot) == cal.BOOT_FITS and small.boot_unit == "photos"
    for p in (0.05, 0.3, 0.7):
        for c in (small, large):
            lo, hi = c.interval(p)
            assert lo <= float(c.apply([p])[0]) <= hi and 0 < lo < hi < 1
        assert np.diff(large.interval(p)) < 0.6 * np.diff(small.interval(p))


def test_the_refits_resample_whole_patients():
    z, y = _scores(80, 2)
    once = cal.fit_calibration(z, y, method="platt", groups=np.arange(80), seed=3)
    # every photo twice, as two photos of the same patient: the same patients are drawn, so the same maps
    twice = cal.fit_calibration(np.repeat(z, 2), np.repeat(y, 2), method="platt", groups=np.repeat(np.arange(80), 2),
                                seed=3)
    assert twice.interval(0.4) == pytest.approx(once.interval(0.4), abs=1e-6) and twice.boot_unit == "patients"
    # the copies taken as independent photos claim twice the data: a narrower interval
    naive = cal.fit_calibration(np.repeat(z, 2), np.repeat(y, 2), method="platt", seed=3)
    assert np.diff(naive.interval(0.4)) < 0.85 * np.diff(once.interval(0.4))


def test_resamples_with_one_class_are_skipped_and_no_refits_when_asked():
    z = np.array([2.0, 1.5, -1.0, -0.5, -2.0, 0.1, -0.3, -1.2])
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    c = cal.fit_calibration(z, y, method="temperature", seed=0)
    assert 0 < len(c.boot) < cal.BOOT_FITS  # some resamples hold no malignant photo: no map from them
    assert all(np.isfinite(a) and a > 0 for a, b in c.boot)
    assert cal.fit_calibration(z, y, method="temperature", n_boot=0).interval(0.5) is None


def test_too_few_two_class_resamples_give_no_interval_rather_than_the_surer_looking_rest(monkeypatch):
    z = np.array([2.0, 1.5, -1.0, -0.5, -2.0, 0.1, -0.3, -1.2])
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0])  # about 90% of resamples hold a malignant photo
    assert cal.fit_calibration(z, y, method="platt", seed=0).interval(0.5) is not None
    monkeypatch.setattr(cal, "MIN_VALID_FRACTION", 0.95)
    assert cal.fit_calibration(z, y, method="platt", seed=0).interval(0.5) is None


def test_a_temperature_map_still_has_an_interval_at_a_raw_score_of_one_half():
    """Temperature scaling sends 0.5 to 0.5 whatever its temperature: refits of it would claim 50%-50% there. The
    refits are Platt maps, so the intercept's uncertainty shows."""
    for seed in range(3):
        z, y = _overconfident(40, seed)  # no shift: temperature is the right family here
        c = cal.fit_calibration(z, y, method="temperature", seed=0)
        assert c.method == "temperature" and c.apply([0.5])[0] == pytest.approx(0.5)
        lo, hi = c.interval(0.5)
        assert hi - lo > 0.2 and lo <= 0.5 <= hi  # 40 photos cannot pin the intercept down


def test_the_refits_round_trip_and_older_or_broken_descriptions_are_handled():
    z, y = _scores(60, 4)
    c = cal.fit_calibration(z, y, groups=[f"P{i // 2}" for i in range(60)], seed=0)
    meta = c.to_meta()
    assert meta["bootstrap"]["fits"] == len(meta["bootstrap"]["slopes"]) == cal.BOOT_FITS
    assert cal.Calibration.from_meta(meta) == c
    old = {k: v for k, v in meta.items() if k != "bootstrap"}  # a bundle from before the refits were stored
    assert cal.Calibration.from_meta(old).interval(0.3) is None
    for bad in ({"slopes": [1.0, 2.0], "intercepts": [0.0]}, {"slopes": [-1.0], "intercepts": [0.0]},
                {"slopes": [float("nan")], "intercepts": [0.0]}, {"slopes": "1", "intercepts": "0"}):
        with pytest.raises(cal.CalibrationError, match="bootstrap"):
            cal.Calibration.from_meta({**old, "bootstrap": bad})
