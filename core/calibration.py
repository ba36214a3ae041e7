"""Calibration of the malignancy score: temperature or Platt scaling fitted on validation logits, Brier and ECE.

The map is p = sigmoid(a * logit + b) (temperature scaling: b = 0, a = 1 / T). With a > 0 it is strictly
increasing, so the decision threshold moves to the calibrated scale and every verdict stays the same.
Which of the two maps is used is chosen on the validation photos alone, by patient-grouped cross-validation
(``method="auto"``): the one whose out-of-fold Brier score is lower. Isotonic regression is not offered: on
validation sets of tens of photos its step function overfits (it was not measurably better held out).

Brier score and expected calibration error (ECE, 10 equal-width bins) come with 95% patient-bootstrap
intervals, resampled the same way as ``core.metrics`` (whole patients move together). So does each photo's
calibrated probability: a Platt map is refitted on BOOT_FITS patient resamples of the same photos, and the
2.5th-97.5th percentiles of the photo's calibrated probability over those maps are its interval
(``Calibration.interval``). The refits are Platt maps even when temperature scaling was chosen: temperature fixes
the intercept at 0, so its refits all send a raw score of 0.5 to 0.5 and would claim no uncertainty there.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.optimize import minimize

from core.metrics import MIN_VALID_FRACTION, group_codes, percentile_interval, resample_weights
from core.scores import logit, sigmoid

METHODS = ("platt", "temperature")
N_BINS = 10
BOOT_FITS = 1000  # Platt refits for a photo's interval, stored in the bundle (two numbers each); 200 left the
#                   interval's ends moving by about 0.01 from one seed to the next
BOOT_MEANING = ("Platt maps refitted on bootstrap resamples of the same photos, whole units (see unit) resampled; a "
                "photo's 95% interval is the 2.5th-97.5th percentiles of its calibrated probability over these maps, "
                "widened to contain the fitted map's value where it falls outside")
# why an ECE interval may not contain its value (the same words in reports, the Dashboard and the README)
ECE_INTERVAL = ("ECE is biased upward on small sets (bins of a few photos), and a resample's ECE more so, so its "
                "interval is the spread of resampled ECEs and can lie above the observed value")


class CalibrationError(ValueError):
    """Calibration inputs that cannot be used (one class, mismatched lengths, non-finite logits)."""


@dataclass(frozen=True)
class Calibration:
    """p = sigmoid(slope * logit + intercept), fitted on `n` photos (`prevalence` of them malignant): a run's
    validation photos, or a cross-validated run's out-of-fold predictions (`fitted_on` says which)."""
    method: str
    slope: float
    intercept: float
    n: int
    prevalence: float
    chosen_by: str = ""
    fitted_on: str = "validation"  # the word the app puts before "photos": "validation" or "out-of-fold"
    boot: tuple[tuple[float, float], ...] = ()  # Platt (slope, intercept) per resample; () in older bundles
    boot_unit: str = "patients"  # what was resampled whole: patients, lesions, photos (no ids known), or groups

    def apply_logit(self, logits) -> np.ndarray:
        return sigmoid(self.slope * np.asarray(logits, dtype=np.float64) + self.intercept)

    def apply(self, probs) -> np.ndarray:
        """Calibrated probability from the raw sigmoid output."""
        return self.apply_logit(logit(probs))

    @cached_property
    def _boot_arrays(self) -> np.ndarray:
        """The refits as a (2, K) array, built once per map rather than once per photo."""
        return np.asarray(self.boot, dtype=np.float64).T

    def interval(self, raw_prob: float, level: float = 0.95) -> tuple[float, float] | None:
        """The calibrated probability's `level` interval for one raw score over the refitted maps; None when this
        calibration has none (a bundle from before they were stored). A percentile interval need not contain the
        fitted map's own value (when nearly all refits fall on one side): it is then widened to it, so the number
        on screen never lies outside its interval."""
        if not self.boot:
            return None
        z = float(logit(np.array([raw_prob]))[0])
        a, b = self._boot_arrays
        lo, hi = np.quantile(sigmoid(a * z + b), [(1 - level) / 2, (1 + level) / 2])
        point = float(sigmoid(self.slope * z + self.intercept))
        return min(float(lo), point), max(float(hi), point)

    def threshold(self, raw_threshold: float) -> float:
        """The raw decision threshold expressed on the calibrated scale (same verdicts)."""
        return float(self.apply(np.array([raw_threshold]))[0])

    def to_meta(self) -> dict:
        meta = {"method": self.method, "slope": self.slope, "intercept": self.intercept, "n": self.n,
                "prevalence": self.prevalence, "chosen_by": self.chosen_by, "fitted_on": self.fitted_on,
                "formula": "p_calibrated = 1 / (1 + exp(-(slope * logit + intercept))), logit = log(p / (1 - p))"}
        if self.boot:
            meta["bootstrap"] = {"meaning": BOOT_MEANING, "unit": self.boot_unit, "fits": len(self.boot),
                                 "slopes": [a for a, _ in self.boot], "intercepts": [b for _, b in self.boot]}
        return meta

    @classmethod
    def from_meta(cls, meta: dict) -> Calibration:
        try:
            boot = meta.get("bootstrap") or {}
            return cls(str(meta["method"]), float(meta["slope"]), float(meta["intercept"]), int(meta["n"]),
                       float(meta["prevalence"]), str(meta.get("chosen_by", "")),
                       str(meta.get("fitted_on", "validation")),  # bundles before the key: always validation
                       _boot_pairs(boot.get("slopes", []), boot.get("intercepts", [])),
                       str(boot.get("unit", "patients")))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CalibrationError(f"calibration description incomplete or malformed: {e}") from e


def _boot_pairs(slopes, intercepts) -> tuple[tuple[float, float], ...]:
    """The stored refits as (slope, intercept) pairs: as many slopes as intercepts, all finite, slopes > 0."""
    a, b = np.asarray(slopes, dtype=np.float64), np.asarray(intercepts, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()) or (a <= 0).any():
        raise ValueError("bootstrap: need equal-length lists of finite slopes (> 0) and intercepts")
    return tuple(zip(a.tolist(), b.tolist()))


def fit_calibration(logits, y, method: str = "auto", groups=None, folds: int = 5, seed: int = 0,
                    n_boot: int = BOOT_FITS, unit: str | None = None) -> Calibration:
    """Fit the map on validation logits and labels. "auto" picks platt or temperature by grouped CV Brier. A Platt
    map is then refitted on `n_boot` resamples of the same groups for photos' intervals; `unit` names the groups
    (default: patients, or photos without groups). Fewer than half the resamples holding both classes: no refits
    (the ones left would be the surer-looking subset)."""
    from dataclasses import replace
    z, y = _inputs(logits, y)
    fitted = _choose_and_fit(z, y, method, groups, folds, seed)
    boot = _refits(z, y, groups, n_boot, seed) if n_boot else ()
    if len(boot) < MIN_VALID_FRACTION * n_boot:
        boot = ()
    return replace(fitted, boot=boot, boot_unit=unit or ("photos" if groups is None else "patients"))


def _choose_and_fit(z, y, method, groups, folds, seed) -> Calibration:
    if method == "auto":
        g = np.arange(len(y)) if groups is None else group_codes(groups, len(y))[0]
        n_splits = _n_splits(y, g, folds)
        oof = {m: _out_of_fold(z, y, m, g, n_splits, seed) for m in METHODS}
        briers = {m: brier(y, p) for m, p in oof.items() if p is not None}
        if not briers:
            chosen, why = "temperature", "too few photos or patients of each class for cross-validation; " \
                                         "temperature has one parameter"
        else:
            chosen = min(briers, key=lambda m: (briers[m], m != "temperature"))  # tie: the simpler map
            why = (f"{n_splits}-fold patient-grouped cross-validation on these photos: out-of-fold Brier "
                   + ", ".join(f"{m} {b:.4f}" for m, b in sorted(briers.items())))
        return _fit(z, y, chosen, why)
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; expected auto or one of {METHODS}")
    return _fit(z, y, method, "given")


def _fit(z, y, method, why) -> Calibration:
    slope, intercept = _fit_params(z, y, method)
    return Calibration(method, slope, intercept, int(len(y)), float(y.mean()), why)


def _refits(z, y, groups, n_boot, seed) -> tuple[tuple[float, float], ...]:
    """Platt maps refitted on resamples of whole groups; a resample holding one class only is skipped (no map)."""
    codes, n_groups = (np.arange(len(y)), len(y)) if groups is None else group_codes(groups, len(y))[:2]
    fits = []
    for chunk in resample_weights(codes, n_groups, n_boot, seed):
        fits += [_fit_params(z, y, "platt", w) for w in chunk if w @ y > 0 and w @ (1 - y) > 0]
    return tuple(fits)


def _fit_params(z: np.ndarray, y: np.ndarray, method: str, w: np.ndarray | None = None) -> tuple[float, float]:
    """Maximum likelihood (slope, intercept); `w` weights each photo (a bootstrap resample's counts)."""
    w = np.ones_like(z) if w is None else w

    def nll(params):
        a, b = (params[0], params[1]) if method == "platt" else (params[0], 0.0)
        s = a * z + b
        # log(1 + exp(s)) - y s, stable for large |s|
        return float(np.sum(w * (np.logaddexp(0.0, s) - y * s)) / np.sum(w))
    x0 = [1.0, 0.0] if method == "platt" else [1.0]
    res = minimize(nll, x0, method="L-BFGS-B",
                   bounds=[(1e-3, 100.0)] + ([(-50.0, 50.0)] if method == "platt" else []))
    a = float(res.x[0])
    b = float(res.x[1]) if method == "platt" else 0.0
    return a, b


def _n_splits(y: np.ndarray, g: np.ndarray, folds: int) -> int:
    """Each class must reach every fold, and a fold holds whole patients: no more folds than either allows."""
    return min(folds, int(y.sum()), int(len(y) - y.sum()), len(np.unique(g)))


def _out_of_fold(z, y, method, g, n_splits, seed) -> np.ndarray | None:
    from sklearn.model_selection import StratifiedGroupKFold
    if n_splits < 2:
        return None
    out = np.empty(len(y))
    for tr, te in StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(z, y, g):
        if y[tr].min() == y[tr].max():
            return None
        a, b = _fit_params(z[tr], y[tr], method)
        out[te] = sigmoid(a * z[te] + b)
    return out


# -------------------------------------------------------------------- measures
def brier(y, p) -> float:
    y, p = np.asarray(y, float), np.asarray(p, float)
    return float(np.mean((p - y) ** 2))


def ece(y, p, n_bins: int = N_BINS) -> float:
    """Expected calibration error: bin-size-weighted |mean predicted - observed rate| over equal-width bins."""
    return float(_weighted_ece(np.asarray(y, float), np.asarray(p, float), np.ones((1, len(y))), n_bins)[0])


def reliability(y, p, n_bins: int = N_BINS) -> list[dict]:
    """Per non-empty bin: its range, photo count, mean predicted probability and observed malignant rate."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    idx = _bins(p, n_bins)
    rows = []
    for b in range(n_bins):
        m = idx == b
        if m.any():
            rows.append({"bin": [b / n_bins, (b + 1) / n_bins], "n": int(m.sum()),
                         "mean_predicted": float(p[m].mean()), "observed": float(y[m].mean())})
    return rows


def calibration_report(y, p, groups=None, n_boot: int = 1000, seed: int = 0, n_bins: int = N_BINS) -> dict:
    """Brier and ECE with 95% (patient-)bootstrap intervals, plus the reliability table."""
    y = np.asarray(y, float)
    p = np.asarray(p, float)
    if len(y) != len(p) or len(y) == 0:
        raise CalibrationError(f"need as many labels as probabilities (got {len(y)} and {len(p)})")
    out = {"brier": {"value": brier(y, p), "ci95": None}, "ece": {"value": ece(y, p, n_bins), "ci95": None},
           "reliability": reliability(y, p, n_bins), "n": int(len(y)), "n_bins": n_bins}
    if n_boot:
        codes, n_groups = (np.arange(len(y)), len(y)) if groups is None else group_codes(groups, len(y))[:2]
        briers, eces = [], []
        for w in resample_weights(codes, n_groups, n_boot, seed):  # core.metrics' resamples, in chunks
            briers.append((w * (p - y) ** 2).sum(axis=1) / w.sum(axis=1))
            eces.append(_weighted_ece(y, p, w, n_bins))
        out["brier"]["ci95"] = percentile_interval(np.concatenate(briers), 0.95)
        out["ece"]["ci95"] = percentile_interval(np.concatenate(eces), 0.95)
        unit = "patients" if groups is not None else "images"
        out["ci_method"] = (f"95% percentile bootstrap, {n_boot} resamples of {n_groups} {unit}, seed {seed}; "
                            f"{ECE_INTERVAL}")
    return out


def _weighted_ece(y, p, w, n_bins) -> np.ndarray:
    idx = _bins(p, n_bins)
    onehot = np.eye(n_bins)[idx]                       # (N, bins)
    nb = w @ onehot                                    # weight per bin, per resample
    gap = np.abs(w @ (onehot * p[:, None]) - w @ (onehot * y[:, None]))  # |sum p - sum y| per bin
    return gap.sum(axis=1) / np.maximum(nb.sum(axis=1), 1e-12)


def _bins(p, n_bins):
    return np.clip((p * n_bins).astype(int), 0, n_bins - 1)


# -------------------------------------------------------------------- helpers
def _inputs(logits, y):
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if len(z) != len(y) or len(z) == 0:
        raise CalibrationError(f"need one label per logit (got {len(z)} logits and {len(y)} labels)")
    if not np.isfinite(z).all():
        raise CalibrationError("logits contain NaN or infinite values")
    if not np.isin(y, (0.0, 1.0)).all() or y.min() == y.max():
        raise CalibrationError("calibration needs 0/1 labels with both classes present")
    return z, y

