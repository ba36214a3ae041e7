"""Binary metrics (malignant=1, benign=0) with bootstrap confidence intervals and threshold choice.

Every public function takes plain sequences / numpy arrays and returns plain Python
values (int, float, None, list, dict, str) so results can go straight into JSON.

Undefined values are ``None``, never NaN:

* precision  - no predicted positives (tp + fp == 0)
* recall     - no positives in ``y_true`` (tp + fn == 0)
* specificity - no negatives in ``y_true`` (tn + fp == 0)
* f1         - computed as 2tp / (2tp + fp + fn) (the Dice form sklearn uses), so it is
  0.0 whenever there is any positive or predicted positive but no true positive, also
  when precision or recall alone is undefined (sklearn gives the same 0.0). It is None
  only when 2tp + fp + fn == 0 (no positives and none predicted), where sklearn falls
  back to ``zero_division``.
* roc_auc, pr_auc - only one class present. pr_auc is average precision, as in
  sklearn's ``average_precision_score``.

Point values and bootstrap resamples go through the same weighted-count code
(:func:`_weighted_metrics`), so an interval always describes the same quantity as the
point value. The tests check it against scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_curve

# A metric's interval is reported only if at least this share of resamples defined it;
# otherwise the surviving resamples are a biased subset (e.g. only those that happened
# to draw a positive) and their percentiles would look more certain than they are.
MIN_VALID_FRACTION = 0.5
# Below this many samples (or patients) we warn that intervals are wide and unstable.
SMALL_N = 30
# Sensitivity comparisons allow for float rounding, e.g. 0.9 * 30 != 27 exactly.
_TOLERANCE = 1e-12
# Limits the (resamples x items) weight matrix built per chunk: 1e6 floats = 8 MB.
_MAX_CHUNK_ELEMENTS = 1_000_000

# --------------------------------------------------------------------------- registries


@dataclass(frozen=True)
class Metric:
    """One metric, listed once: how it is computed, shown and compared. Tables, reports, best-epoch selection
    and the app read this registry; adding a metric is one entry in METRICS."""
    key: str
    display: str
    # (tn, fp, fn, tp) weighted-count arrays -> values, NaN where undefined; None: rank-based (the two AUCs,
    # computed together by _weighted_aucs)
    from_counts: Callable | None = None
    # (y, pred) -> the items a proportion metric is a share of (recall: the malignant photos); None: not a plain
    # proportion. At 0 or 1 such a metric gets a Wilson interval (see _boundary_intervals).
    among: Callable | None = None
    higher_is_better: bool = True
    selectable: bool = True    # may choose the best epoch on validation (config select_metric)
    in_table: bool = True      # a column of the paper's Table 1/2 layout (format_table); reports show all
    value_format: str = ".3f"
    ci_format: str = ".2f"

    def format(self, entry) -> str:
        return format_estimate(entry, self.value_format, self.ci_format)


METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "Accuracy", lambda tn, fp, fn, tp: (tp + tn) / (tn + fp + fn + tp),
           among=lambda y, pred: np.ones(len(y), dtype=bool)),
    Metric("precision", "Precision (PPV)", lambda tn, fp, fn, tp: tp / (tp + fp), selectable=False,
           among=lambda y, pred: pred == 1),
    Metric("recall", "Sensitivity (recall)", lambda tn, fp, fn, tp: tp / (tp + fn), among=lambda y, pred: y == 1),
    Metric("specificity", "Specificity", lambda tn, fp, fn, tp: tn / (tn + fp), selectable=False,
           among=lambda y, pred: y == 0),
    Metric("f1", "F1", lambda tn, fp, fn, tp: 2 * tp / (2 * tp + fp + fn)),
    Metric("roc_auc", "ROC-AUC"),
    Metric("pr_auc", "PR-AUC", in_table=False),  # not in the paper's tables
)
METRIC_NAMES = tuple(m.key for m in METRICS)
# Validation loss also selects epochs (lower is better); it is the training loop's, not a metric_report value.
LOSS = "loss"


def _keys() -> tuple[str, ...]:
    return tuple(m.key for m in METRICS)  # read at call time: the registry is the source, not a copy


def metric(key: str) -> Metric:
    for m in METRICS:
        if m.key == key:
            return m
    raise KeyError(f"unknown metric {key!r}; known: {', '.join(m.key for m in METRICS)}")


def display_name(key: str) -> str:
    return metric(key).display


def selection_metrics() -> tuple[str, ...]:
    """The keys a run may select its best epoch by (config select_metric)."""
    return tuple(m.key for m in METRICS if m.selectable) + (LOSS,)


def selection_score(values: Mapping, key: str) -> float:
    """values[key] oriented so that higher is better; undefined (None) counts as worst."""
    value = values.get(key)
    if value is None:
        return -math.inf
    higher_is_better = key != LOSS and metric(key).higher_is_better
    return float(value) if higher_is_better else -float(value)


# --------------------------------------------------------------------------- validation


def _as_1d(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length (got {len(a)} and {len(b)})")
    if len(a) == 0:
        raise ValueError(f"{name_a} is empty: need at least one sample")


def _labels(arr: np.ndarray, name: str) -> np.ndarray:
    """0/1 (or bool) labels -> int8 array; anything else is a ValueError."""
    if arr.dtype.kind in "US":
        raise ValueError(f"{name} must contain only 0/1 labels; got strings such as {arr[0]!r}")
    try:
        as_float = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must contain only 0/1 labels; got non-numeric values") from None
    bad = ~np.isin(as_float, (0.0, 1.0))  # NaN is never in the set, so it is caught too
    if bad.any():
        found = sorted({repr(v) for v in arr[bad][:5].tolist()})
        raise ValueError(f"{name} must contain only 0/1 labels; found {', '.join(found)}")
    return as_float.astype(np.int8)


def _probabilities(arr: np.ndarray, name: str = "prob") -> np.ndarray:
    """Probabilities -> float64 array; non-finite or outside [0, 1] is a ValueError."""
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric probabilities, got dtype {arr.dtype}")
    p = arr.astype(np.float64)
    nonfinite = np.flatnonzero(~np.isfinite(p))
    if nonfinite.size:
        i = nonfinite[0]
        raise ValueError(f"{name} must be finite; found {p[i]} at index {i}")
    outside = np.flatnonzero((p < 0.0) | (p > 1.0))
    if outside.size:
        i = outside[0]
        raise ValueError(
            f"{name} must lie in [0, 1]; found {p[i]} at index {i} (pass probabilities, not logits)"
        )
    return p


def _validate(y_true, prob) -> tuple[np.ndarray, np.ndarray]:
    y_arr, p_arr = _as_1d(y_true, "y_true"), _as_1d(prob, "prob")
    _check_same_length(y_arr, p_arr, "y_true", "prob")
    return _labels(y_arr, "y_true"), _probabilities(p_arr)


def _check_threshold(threshold, name: str = "threshold") -> float:
    # bool is an int subclass; True as a threshold is almost certainly a bug.
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, (int, float, np.number)):
        raise ValueError(f"{name} must be a number in [0, 1], got {threshold!r}")
    value = float(threshold)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {threshold!r}")
    return value


def _is_missing(value) -> bool:
    """None, NaN, NaT and pandas.NA count as missing."""
    if value is None:
        return True
    try:
        return bool(value != value)  # only NaN-like values differ from themselves
    except TypeError:  # pandas.NA refuses bool(); it is missing by definition
        return True


def group_codes(groups, n: int) -> tuple[np.ndarray, int, int]:
    """Map group labels to 0..G-1; each missing label becomes a group of its own.

    Returns (codes, number of groups, number of missing labels).
    """
    if isinstance(groups, np.ndarray) and groups.ndim != 1:
        raise ValueError(f"groups must be 1-D, got shape {groups.shape}")
    values = list(groups)  # not np.asarray: that would turn tuple ids into a 2-D array
    if len(values) != n:
        raise ValueError(f"groups must have one entry per sample (got {len(values)} for {n} samples)")
    index: dict = {}
    codes = np.empty(n, dtype=np.int64)
    n_missing = 0
    for i, value in enumerate(values):
        if _is_missing(value):
            codes[i] = len(index) + n_missing  # a fresh code nobody else can share
            n_missing += 1
            continue
        try:
            code = index.get(value)
        except TypeError:
            raise ValueError(
                f"groups must be hashable (e.g. patient id strings); got {type(value).__name__} at index {i}"
            ) from None
        if code is None:
            code = index[value] = len(index) + n_missing
        codes[i] = code
    return codes, len(index) + n_missing, n_missing


def _check_n_boot(n_boot, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < low:
        raise ValueError(f"n_boot must be an integer >= {low}, got {n_boot!r}")
    return int(n_boot)


# --------------------------------------------------------------------------- core maths


def _weighted_metrics(y: np.ndarray, p: np.ndarray, threshold: float, w: np.ndarray) -> dict[str, np.ndarray]:
    """All metrics for m weightings of the same items at once.

    ``w`` is (m, n): row b holds how often each item appears in resample b (all ones for
    the point estimate). Returns name -> (m,) float array with NaN where undefined.
    """
    pred = (p >= threshold).astype(np.int8)
    onehot = (2 * y + pred)[:, None] == np.arange(4)  # columns: tn, fp, fn, tp
    tn, fp, fn, tp = (w @ onehot.astype(np.float64)).T
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 -> NaN marks "undefined"
        out = {m.key: m.from_counts(tn, fp, fn, tp) for m in METRICS if m.from_counts is not None}
    out["roc_auc"], out["pr_auc"] = _weighted_aucs(y, p, w)
    return {m.key: out[m.key] for m in METRICS}


def _weighted_aucs(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC-AUC (Mann-Whitney, ties count half) and average precision from rank sums.

    Items are bucketed by distinct score, so per resample the work is a few cumulative
    sums instead of a sort; this is what makes 1000 resamples cheap.
    """
    order = np.argsort(-p, kind="stable")  # descending score
    p_sorted, y_sorted = p[order], y[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, p_sorted[1:] != p_sorted[:-1]])
    w_sorted = w[:, order]
    pos = np.add.reduceat(w_sorted * y_sorted, starts, axis=1)  # positives per score level
    neg = np.add.reduceat(w_sorted * (1.0 - y_sorted), starts, axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)

    # A positive outranks every negative on a strictly lower level and half of its ties.
    neg_below = n_neg[:, None] - np.cumsum(neg, axis=1)
    auc_num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)

    # Average precision: precision at each level, weighted by the recall it adds.
    tp_cum, predicted_cum = np.cumsum(pos, axis=1), np.cumsum(pos + neg, axis=1)
    precision = np.divide(tp_cum, predicted_cum, out=np.zeros_like(tp_cum), where=predicted_cum > 0)
    ap_num = (pos * precision).sum(axis=1)

    both = (n_pos > 0) & (n_neg > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = np.where(both, auc_num / (n_pos * n_neg), np.nan)
        ap = np.where(both, ap_num / n_pos, np.nan)
    return auc, ap


def _to_python(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _bootstrap_samples(
    y: np.ndarray, p: np.ndarray, threshold: float, codes: np.ndarray, n_groups: int, n_boot: int, seed
) -> dict[str, np.ndarray]:
    """Metric values for n_boot resamples of the groups (items are groups of one if ungrouped)."""
    parts = [_weighted_metrics(y, p, threshold, w) for w in resample_weights(codes, n_groups, n_boot, seed)]
    return {name: np.concatenate([part[name] for part in parts]) for name in _keys()}


RESAMPLED = {"patients": "whole patients resampled", "lesions": "whole lesions resampled",
             "photos": "photo by photo: no patient ids"}  # what a bootstrap's unit means, in words


def resample_weights(codes: np.ndarray, n_groups: int, n_boot: int, seed):
    """Chunks of (m, n) item weights, n_boot rows in all: how often each item appears in a resample of the groups."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _MAX_CHUNK_ELEMENTS // max(len(codes), n_groups)))
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        draws = rng.integers(0, n_groups, size=(m, n_groups))
        # Count draws per group in every row with one bincount (row b uses bins b*G..b*G+G-1).
        flat = (draws + np.arange(m)[:, None] * n_groups).ravel()
        counts = np.bincount(flat, minlength=m * n_groups).reshape(m, n_groups)
        # Every item inherits its group's count, so a patient's images move together.
        yield counts[:, codes].astype(np.float64)


def paired_auc_difference(y_true, prob_a, prob_b, groups=None, n_boot: int = 1000, seed=0) -> dict:
    """ROC-AUC and PR-AUC of two models' scores on the same photos, and b minus a with a paired 95% bootstrap
    interval: each resample draws the same patients for both models, so what the photos share cancels out.
    Threshold metrics are left out (each model has its own threshold). One-class input is a ValueError."""
    y, pa = _validate(y_true, prob_a)
    _, pb = _validate(y_true, prob_b)
    if y.min() == y.max():
        raise ValueError("a paired AUC difference needs both classes among the photos")
    n_boot = _check_n_boot(n_boot)
    codes, n_groups = (np.arange(len(y)), len(y)) if groups is None else group_codes(groups, len(y))[:2]
    ones = np.ones((1, len(y)))
    point = {name: _weighted_aucs(y, p, ones) for name, p in (("a", pa), ("b", pb))}
    diffs = [np.stack(_weighted_aucs(y, pb, w)) - np.stack(_weighted_aucs(y, pa, w))
             for w in resample_weights(codes, n_groups, n_boot, seed)]
    diffs = np.concatenate(diffs, axis=1)  # (2, n_boot): roc_auc, pr_auc
    out = {"n": len(y), "n_positive": int(y.sum()), "n_groups": int(n_groups),
           "ci_method": _ci_method(n_boot, len(y), None if groups is None else n_groups, seed)}
    for i, key in enumerate(("roc_auc", "pr_auc")):
        a, b = float(point["a"][i][0]), float(point["b"][i][0])
        out[key] = {"a": a, "b": b, "difference": {"value": b - a, "ci95": percentile_interval(diffs[i], 0.95)}}
    return out


def _boundary_intervals(y: np.ndarray, p: np.ndarray, threshold: float, codes: np.ndarray, values: dict,
                        cis: dict, level: float = 0.95) -> dict:
    """Proportions observed at exactly 0 or 1 (28 of 28 malignant photos caught) get the Wilson score interval
    instead: every bootstrap resample repeats such a proportion, so the percentile interval collapses to the point
    and would claim certainty. Its n is the number of patients among the items (fewer than photos when a patient
    has several), which keeps it conservative under clustering."""
    pred = (p >= threshold).astype(np.int8)
    z2 = _z(level) ** 2
    out = dict(cis)
    for m in METRICS:
        value = values.get(m.key)
        if m.among is None or value not in (0.0, 1.0) or cis.get(m.key) is None:
            continue
        n = len(np.unique(codes[m.among(y, pred)]))
        out[m.key] = [n / (n + z2), 1.0] if value == 1.0 else [0.0, z2 / (n + z2)]
    return out


def _z(level: float) -> float:
    from scipy.stats import norm
    return float(norm.ppf((1 + level) / 2))


def percentile_interval(samples: np.ndarray, level: float) -> list[float] | None:
    """The central `level` percentile interval of bootstrap samples, undefined (NaN) resamples skipped; None when
    fewer than MIN_VALID_FRACTION of them are defined."""
    valid = samples[~np.isnan(samples)]
    if valid.size == 0 or valid.size < MIN_VALID_FRACTION * samples.size:
        return None
    lo, hi = np.quantile(valid, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


# --------------------------------------------------------------------------- public API


def confusion(y_true, y_pred) -> dict[str, int]:
    """Counts of true negatives, false positives, false negatives and true positives."""
    y_arr, pred_arr = _as_1d(y_true, "y_true"), _as_1d(y_pred, "y_pred")
    _check_same_length(y_arr, pred_arr, "y_true", "y_pred")
    y, pred = _labels(y_arr, "y_true"), _labels(pred_arr, "y_pred")
    counts = np.bincount(2 * y + pred, minlength=4)
    return {"tn": int(counts[0]), "fp": int(counts[1]), "fn": int(counts[2]), "tp": int(counts[3])}


def point_metrics(y_true, prob, threshold) -> dict[str, float | None]:
    """All registered METRICS at ``prob >= threshold``; undefined values are None (see module docstring)."""
    y, p = _validate(y_true, prob)
    t = _check_threshold(threshold)
    values = _weighted_metrics(y, p, t, np.ones((1, len(y))))
    return {name: _to_python(values[name][0]) for name in _keys()}


def roc_points(y_true, prob) -> dict[str, list[float]] | None:
    """ROC curve vertices (sklearn, drop_intermediate=True), or None if only one class is present.

    sklearn's first threshold is +inf (the "predict nothing positive" corner); it is
    reported as 1.0 so the result stays valid JSON.
    """
    y, p = _validate(y_true, prob)
    if y.min() == y.max():
        return None
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=True)
    return {
        "fpr": [float(v) for v in fpr],
        "tpr": [float(v) for v in tpr],
        "thresholds": [float(v) for v in np.minimum(thresholds, 1.0)],
    }


def bootstrap_ci(
    y_true, prob, threshold, groups=None, n_boot: int = 1000, seed=0, level: float = 0.95
) -> dict[str, list[float] | None]:
    """Percentile bootstrap interval per metric: name -> [lo, hi], or None.

    With ``groups`` (e.g. patient ids; None/NaN = a group of its own) whole groups are
    resampled (cluster bootstrap), so correlated images of one patient move together.
    Resamples where a metric is undefined are skipped for that metric; if fewer than
    MIN_VALID_FRACTION of them define it, its interval is None. Deterministic for a seed.
    """
    y, p = _validate(y_true, prob)
    t = _check_threshold(threshold)
    n_boot = _check_n_boot(n_boot)
    if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
        raise ValueError(f"level must be strictly between 0 and 1, got {level!r}")
    if groups is None:
        codes, n_groups = np.arange(len(y)), len(y)
    else:
        codes, n_groups, _ = group_codes(groups, len(y))
    samples = _bootstrap_samples(y, p, t, codes, n_groups, n_boot, seed)
    cis = {name: percentile_interval(samples[name], level) for name in _keys()}
    return _boundary_intervals(y, p, t, codes, point_metrics(y, p, t), cis, level)


def metric_report(y_true, prob, threshold, groups=None, n_boot: int = 1000, seed=0) -> dict:
    """Point values with 95% bootstrap intervals, confusion matrix, counts and caveats.

    ``n_boot=0`` skips the bootstrap (every ``ci95`` is None).
    """
    y, p = _validate(y_true, prob)
    t = _check_threshold(threshold)
    n_boot = _check_n_boot(n_boot, allow_zero=True)
    values = point_metrics(y, p, t)
    cm = confusion(y, (p >= t).astype(np.int8))

    n_missing = 0
    if groups is None:
        codes, n_groups = np.arange(len(y)), None
    else:
        codes, n_groups, n_missing = group_codes(groups, len(y))
    cis = dict.fromkeys(_keys())
    if n_boot:
        samples = _bootstrap_samples(y, p, t, codes, n_groups or len(y), n_boot, seed)
        cis = _boundary_intervals(y, p, t, codes, values,
                                  {name: percentile_interval(samples[name], 0.95) for name in _keys()})

    n_positive = int(y.sum())
    return {
        "metrics": {name: {"value": values[name], "ci95": cis[name]} for name in _keys()},
        "confusion_matrix": [[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]],
        "threshold": t,
        "n": len(y),
        "n_positive": n_positive,
        "n_negative": len(y) - n_positive,
        "n_groups": n_groups,
        "ci_method": _ci_method(n_boot, len(y), n_groups, seed),
        "notes": _report_notes(len(y), n_positive, cm, t, values, cis, n_boot, n_groups, n_missing),
    }


def _ci_method(n_boot: int, n: int, n_groups: int | None, seed) -> str:
    if n_boot == 0:
        return "no confidence intervals (n_boot=0)"
    unit = (
        f"{n_groups} patients (cluster bootstrap: all images of a patient are resampled together)"
        if n_groups is not None
        else f"{n} images (each image resampled independently)"
    )
    return (
        f"95% percentile bootstrap, {n_boot} resamples of {unit}, seed {seed}; "
        f"resamples where a metric is undefined are skipped for that metric; a proportion of exactly 0 or 1 "
        f"gets the Wilson score interval over its {'patients' if n_groups is not None else 'images'} instead "
        f"(every resample would repeat it)"
    )


def _report_notes(n, n_positive, cm, threshold, values, cis, n_boot, n_groups, n_missing) -> list[str]:
    notes = []
    if n_positive == 0:
        notes.append("only one class present (no malignant cases): recall, ROC-AUC and PR-AUC undefined")
    elif n_positive == n:
        notes.append("only one class present (no benign cases): specificity, ROC-AUC and PR-AUC undefined")
    if cm["tp"] + cm["fp"] == 0:
        notes.append(f"no predicted positives at threshold {threshold:g}: precision undefined")
    if n < SMALL_N:
        notes.append(f"n = {n} < {SMALL_N}: estimates are unstable and intervals are wide")
    if n_groups is not None and n_groups < SMALL_N <= n:
        notes.append(f"only {n_groups} patients (< {SMALL_N}): intervals are wide")
    if n_missing:
        notes.append(f"{n_missing} images without a patient id were treated as separate patients")
    if n_boot:
        missing_ci = [display_name(k) for k in _keys() if values[k] is not None and cis[k] is None]
        if missing_ci:
            notes.append(
                f"no interval for {', '.join(missing_ci)}: defined in fewer than "
                f"{MIN_VALID_FRACTION:.0%} of bootstrap resamples"
            )
    return notes


def subgroup_reports(
    y_true, prob, threshold, subgroup_values, groups=None, n_boot: int = 1000, seed=0, min_n: int = 1
) -> dict[str, dict]:
    """One metric_report per distinct subgroup value (e.g. Fitzpatrick type), keyed by str(value).

    Keys are sorted as strings; missing values (None/NaN) are pooled under "unknown" (last). Values whose
    strings coincide (1 and "1") share a key. Subgroups with fewer than ``min_n``
    samples are left out. Every subgroup uses the same seed.
    """
    y, p = _validate(y_true, prob)
    t = _check_threshold(threshold)
    values = list(subgroup_values)
    if len(values) != len(y):
        raise ValueError(
            f"subgroup_values must have one entry per sample (got {len(values)} for {len(y)} samples)"
        )
    group_list = None
    if groups is not None:
        group_codes(groups, len(y))  # validates length and hashability up front
        group_list = list(groups)
    if isinstance(min_n, bool) or not isinstance(min_n, (int, np.integer)) or min_n < 1:
        raise ValueError(f"min_n must be an integer >= 1, got {min_n!r}")

    members: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        members.setdefault("unknown" if _is_missing(value) else str(value), []).append(i)
    keys = sorted(k for k in members if k != "unknown") + (["unknown"] if "unknown" in members else [])

    reports = {}
    for key in keys:
        idx = np.asarray(members[key])
        if len(idx) < min_n:
            continue
        sub_groups = None if group_list is None else [group_list[i] for i in idx]
        reports[key] = metric_report(y[idx], p[idx], t, groups=sub_groups, n_boot=n_boot, seed=seed)
    return reports


def choose_threshold(y_true, prob, rule: str = "sensitivity", target: float | None = 0.90) -> dict:
    """Pick a decision threshold (prediction is ``prob >= threshold``) by a rule of THRESHOLD_RULES.

    Rules:
    * "sensitivity": the highest threshold among the distinct probabilities whose
      sensitivity is >= target. Tied probabilities fall on the same side of any
      threshold, so the achieved sensitivity can overshoot the target.
    * "youden": maximises sensitivity + specificity - 1 over the distinct probabilities;
      among equal maxima the lowest threshold (highest sensitivity) wins, because a
      missed melanoma costs more than an extra referral. ``target`` is ignored.
    * "fixed": threshold = target (0.5 when target is None).
    One-class input is a ValueError for the data-driven rules. ``achieved`` reports the
    sensitivity/specificity at the chosen threshold (None where undefined, "fixed" only).
    """
    y, p = _validate(y_true, prob)
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(THRESHOLD_RULES)}")
    threshold, target, sensitivity, specificity = THRESHOLD_RULES[rule].choose(y, p, target)
    return _threshold_result(threshold, rule, target, sensitivity, specificity)


def _operating_points(y: np.ndarray, p: np.ndarray, rule: str):
    """Candidate thresholds (the distinct probabilities, ascending) with their sensitivity and specificity."""
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        missing = "malignant" if n_pos == 0 else "benign"
        raise ValueError(f"rule {rule!r} needs both classes, but y_true has no {missing} cases")
    candidates = np.unique(p)  # ascending
    # Items below a candidate are predicted negative; searchsorted counts them per class.
    sens = (n_pos - np.searchsorted(np.sort(p[y == 1]), candidates, side="left")) / n_pos
    spec = np.searchsorted(np.sort(p[y == 0]), candidates, side="left") / (len(y) - n_pos)
    return candidates, sens, spec


def _by_sensitivity(y, p, target):
    candidates, sens, spec = _operating_points(y, p, "sensitivity")
    if target is None:
        raise ValueError("rule 'sensitivity' needs a target sensitivity in [0, 1]")
    goal = _check_threshold(target, "target")
    # Sensitivity falls as the threshold rises and is 1.0 at the lowest candidate,
    # so the last candidate meeting the goal is the highest such threshold.
    i = np.flatnonzero(sens >= goal - _TOLERANCE)[-1]
    return candidates[i], goal, sens[i], spec[i]


def _by_youden(y, p, target):
    candidates, sens, spec = _operating_points(y, p, "youden")
    youden = sens + spec - 1.0
    i = np.flatnonzero(youden >= youden.max() - _TOLERANCE)[0]
    return candidates[i], None, sens[i], spec[i]


def _fixed(y, p, target):
    threshold = 0.5 if target is None else _check_threshold(target, "target")
    values = point_metrics(y, p, threshold)
    return threshold, threshold, values["recall"], values["specificity"]


@dataclass(frozen=True)
class ThresholdRule:
    """A way to choose the decision threshold on validation, listed once: config validation and defaults,
    choose_threshold and the app's description read it."""
    name: str
    choose: Callable          # (y, p, target) -> (threshold, target, sensitivity, specificity)
    describe: Callable        # (target, on) -> the sentence the app shows next to the threshold
    default_target: float | None = None


THRESHOLD_RULES: dict[str, ThresholdRule] = {r.name: r for r in (
    ThresholdRule("sensitivity", _by_sensitivity, default_target=0.90,
                  describe=lambda t, on: f"highest threshold reaching {t or 0:.0%} {on} sensitivity"),
    ThresholdRule("youden", _by_youden, describe=lambda t, on: f"maximises Youden's J on {on} predictions"),
    ThresholdRule("fixed", _fixed, default_target=0.5, describe=lambda t, on: "fixed value"),
)}


def describe_rule(rule: str | None, target: float | None = None, on: str = "validation") -> str:
    """The app's text for a stored threshold rule, chosen on `on` predictions ("validation", "out-of-fold"); a rule
    this registry does not know is shown as written."""
    known = THRESHOLD_RULES.get(rule) if rule else None
    return known.describe(target, on) if known else (rule or "?")


def _threshold_result(threshold, rule, target, sensitivity, specificity) -> dict:
    as_float = lambda v: None if v is None else float(v)  # noqa: E731 - tiny local converter
    return {
        "threshold": float(threshold),
        "rule": rule,
        "target": as_float(target),
        "achieved": {"sensitivity": as_float(sensitivity), "specificity": as_float(specificity)},
    }


def format_estimate(entry, value_format: str = ".3f", ci_format: str = ".2f", missing: str = "n/a") -> str:
    """``{"value": v, "ci95": [lo, hi] | None}`` (or a bare number / None) -> 'v [lo, hi]', the one spelling of
    an estimate with its interval in tables, reports and the app."""
    value, ci = (entry.get("value"), entry.get("ci95")) if isinstance(entry, Mapping) else (entry, None)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    text = format(value, value_format)
    if ci and None not in ci:
        if ci[0] == ci[1] == value and value in (0, 1):
            # the bootstrap repeated the value every time, which is no 95% interval: F1 or an AUC at exactly 0 or 1
            # (no Wilson rule for them), or a proportion in a report written before _boundary_intervals; say so
            # rather than print a certainty nobody measured
            return text + " [CI n/a]"
        text += f" [{format(ci[0], ci_format)}, {format(ci[1], ci_format)}]"
    return text


def format_score(p: float, extra: int = 0) -> str:
    """A score or threshold on the 0-1 scale, in the one spelling the app uses for both: a percentage with 3
    significant digits below 1% (0.445%, where the demo's threshold sits), else one decimal (32.7%); 'n/a' for a
    value that is not a number. ``extra`` adds digits (see ``spell_apart``)."""
    p = float(p)
    if not math.isfinite(p):
        return "n/a"
    if 0 < abs(p) < 0.01:
        return np.format_float_positional(p * 100, precision=3 + extra, fractional=False, trim="-") + "%"
    return f"{p:.{1 + extra}%}"


def format_whole_percent(p: float, extra: int = 0) -> str:
    """A calibrated probability as a whole percentage (33%): more digits would claim a precision it lacks. A
    calibrated probability is a sigmoid, never 0 or 1 however it rounds (or saturates in floating point): it reads
    '<1%' or '>99%' ('<0.1%' with one extra digit), never '0%' or '100%'."""
    text = f"{float(p):.{extra}%}"
    step = 10.0 ** -extra
    if float(text[:-1]) <= 0:
        return f"<{step:.{extra}f}%"
    if float(text[:-1]) >= 100:
        return f">{100 - step:.{extra}f}%"
    return text


def spell_apart(score: float, threshold: float, spell=format_score) -> tuple[str, str]:
    """A score and the threshold it was judged against, spelled with just enough digits to differ whenever the
    values do: "not flagged: below 32.7%" beside a score of 32.7% reads as a contradiction. Rounding keeps their
    order, so the spelled values never contradict the verdict."""
    for extra in range(6):
        pair = spell(score, extra), spell(threshold, extra)
        if pair[0] != pair[1] or score == threshold:
            break
    return pair


def format_percent(entry, missing: str = "not recorded") -> str:
    """The same estimate as a percentage: '90% (95% CI 80%–97%)'; missing parts are said, not invented."""
    value, ci = (entry.get("value"), entry.get("ci95")) if isinstance(entry, Mapping) else (entry, None)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    text = f"{value:.0%}"
    if ci and None not in ci:
        collapsed = ci[0] == ci[1] == value and value in (0, 1)  # see format_estimate
        text += " (95% CI not available)" if collapsed else f" (95% CI {ci[0]:.0%}–{ci[1]:.0%})"
    return text


def format_table(rows: Sequence[tuple[str, Mapping]]) -> str:
    """Plain-text table in the paper's Table 1/2 layout, one row per (model name, report["metrics"])."""
    columns = [m for m in METRICS if m.in_table]
    header = ["Model"] + [m.display for m in columns]
    body = [[str(name)] + [m.format(metrics.get(m.key)) for m in columns] for name, metrics in rows]
    widths = [max(len(row[col]) for row in [header, *body]) for col in range(len(header))]

    def line(cells: list[str]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    separator = "-+-".join("-" * width for width in widths)
    return "\n".join([line(header), separator, *(line(row) for row in body)])
