"""Fit the context stage on a run's own patients: answers from training rows, fusion on image logits of unseen rows.

A single-split run fuses on its validation split (fit_context); a cross-validated run on the out-of-fold image
scores of every non-test row, with the context logits cross-fitted over the same folds (fit_context_cv).

Measured choices (recorded in ``ContextModel.fitted``):

* regularisation of the context model: grouped 5-fold cross-validation over the training patients;
* how an unanswered field is handled, chosen on validation from two designs (neither is silent imputation):
  ``masked_level`` learns a ``missing`` weight per field from training rows copied with answers withheld at
  random; ``expected`` fits on the answers given and lets a missing field contribute its expected weight under
  the training patients' answer frequencies (marginalising in logit space);
* a field whose *absence* predicts the label in the training rows (PAD-UFES-20 records sex and diameter only for
  biopsied lesions, so "not recorded" means benign there) is left out, with the counts that show it.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.stats import fisher_exact
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import GroupKFold

from core import metrics
from core.context import (FIELDS, FUSION_BOOT_KEYS, ContextError, ContextModel, check_fields, context_frame,
                          image_logit)
from core.scores import sigmoid

MISSING_RULES = ("masked_level", "expected")
C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
MASK_COPIES = 4        # training copies with answers withheld at random (masked_level)
MASK_P = 0.5           # each answer withheld with this probability in a copy
FUSION_C = 1.0
FUSION_BOOT_MEANING = ("the fusion's three numbers refitted on bootstrap resamples of the rows it was fitted on, whole "
                       "units (see unit) resampled; the image scores and the answers' weights held fixed. A photo's "
                       "95% interval is the 2.5th-97.5th percentiles of its fused probability over these refits, "
                       "widened to contain the fitted fusion's value")
MISSING_LEAK_P = 1e-3  # Fisher exact test, missing x label, on the training rows
MIN_ANSWERS = 10
MIN_ANSWER_PATIENTS = 5  # answers from fewer patients teach the model those patients' labels, not the question


def fit_context(train_df: pd.DataFrame, val_df: pd.DataFrame, val_image_probs, fields, *, rule="sensitivity",
                target=0.90, n_boot=1000, seed=0) -> ContextModel:
    """The context stage of a run. train_df: the training patients' rows (answers only are used); val_df and
    val_image_probs: the validation patients' rows and the image model's P(malignant) for them."""
    fields = check_fields(fields)
    _check_rows(train_df, "train")
    _check_rows(val_df, "val")
    _check_disjoint(train_df, val_df)
    a_tr, y_tr, g_tr = context_frame(train_df, fields), _y(train_df), _groups(train_df)
    a_val, y_val, g_val = context_frame(val_df, fields), _y(val_df), _groups(val_df)
    z_img = image_logit(np.asarray(val_image_probs, float))
    if len(z_img) != len(val_df):
        raise ContextError(f"{len(z_img)} image probabilities for {len(val_df)} validation rows")
    kept, excluded = screen_fields(a_tr, y_tr, g_tr)
    if not kept:
        raise ContextError(f"no usable context field in the training rows: {excluded}")
    if len(set(g_val)) < 2:  # the missing-answer rule is chosen by a fusion cross-fitted over validation patients
        raise ContextError("the validation split holds one patient: the fusion needs at least 2 to be chosen on")
    rng = np.random.default_rng(seed)
    scenarios = _scenarios(kept, len(a_val), rng)
    folds = list(GroupKFold(n_splits=min(10, len(set(g_val)))).split(z_img, y_val, g_val))
    tried = {}
    for missing_rule in MISSING_RULES:
        model = _fit_answers(a_tr[kept], y_tr, g_tr, missing_rule, seed)
        logits = [_context_logits(model, _withhold(a_val, w)) for w in scenarios]
        tried[missing_rule] = (model, _fusion_loss(z_img, logits, y_val, folds))
    chosen = min(tried, key=lambda k: tried[k][1])
    model = tried[chosen][0]
    ctx_val = _context_logits(model, a_val)
    fusion = _fit_fusion(z_img, ctx_val, y_val)
    model = _stage(model, fusion, tried, excluded, a_tr, fields, n_val=len(a_val), fusion_folds="10 patient folds",
                   fitted_on={"context_model": f"training split: {len(a_tr)} images, {len(set(g_tr))} patients "
                                               "(answers only)",
                              "fusion": f"validation split: {len(a_val)} images, {len(set(g_val))} patients (the "
                                        "image model's logits, never trained on)"})
    model = _with_refits(model, z_img, ctx_val, y_val, val_df, n_boot, seed)
    fused = sigmoid(np.array([model.fused_logit(p, r) for p, r in zip(val_image_probs, _records(a_val))]))
    return _with_thresholds(model, fused, sigmoid(ctx_val), y_val, g_val, "validation split", rule, target, n_boot,
                            seed)


def fit_context_cv(df: pd.DataFrame, image_probs, fields, *, where: str, rule="sensitivity", target=0.90,
                   n_boot=1000, seed=0) -> ContextModel:
    """The context stage of a cross-validated run. df: every non-test row with its `fold`; image_probs: each row's
    P(malignant) from image models that never trained on it (out-of-fold, or nested); where: what those are.

    The context model learns from all these rows' answers. The fusion, the missing-answer rule and the thresholds
    are fitted on the image scores and on cross-fitted context logits (fold k's answers scored by a context model
    fitted on the other folds), so neither half of a row's fused score has seen that row."""
    fields = check_fields(fields)
    if df.empty:
        raise ContextError("no non-test rows to fit the context stage on")
    if "split" in df and (df["split"] == "test").any():
        raise ContextError("the context stage's rows include test rows: a held-out patient's answers must never "
                           "reach it")
    a, y, g = context_frame(df, fields), _y(df), _groups(df)
    fold = df["fold"].to_numpy()
    z_img = image_logit(np.asarray(image_probs, float))
    if len(z_img) != len(df):
        raise ContextError(f"{len(z_img)} image probabilities for {len(df)} rows")
    _check_folds(fold, g, y)
    kept, excluded = screen_fields(a, y, g)
    if not kept:
        raise ContextError(f"no usable context field in the non-test rows: {excluded}")
    chosen, tried = _choose_missing_rule(a, y, g, fold, z_img, kept, seed)
    ctx = tried[chosen][0]  # all answers as given, cross-fitted
    fusion = _fit_fusion(z_img, ctx, y)
    final = _fit_answers(a[kept], y, g, chosen, seed)
    n, n_patients, k_folds = len(a), len(set(g)), len(np.unique(fold))
    model = _stage(final, fusion, tried, excluded, a, fields, n_val=n, fusion_folds=f"the {k_folds} folds",
                   fitted_on={"context_model": f"every non-test patient: {n} images, {n_patients} patients (answers "
                                               "only)",
                              "fusion": f"{where}: {n} images, {n_patients} patients (image models that never "
                                        f"trained on them), with context logits cross-fitted over the {k_folds} folds "
                                        "(each fold's answers scored by a context model fitted on the other folds)"})
    model = _with_refits(model, z_img, ctx, y, df, n_boot, seed)
    fused = sigmoid(fusion["intercept"] + fusion["image"] * z_img + fusion["context"] * ctx)
    return _with_thresholds(model, fused, sigmoid(ctx), y, g, where, rule, target, n_boot, seed)


def crossfit_fused_probs(df: pd.DataFrame, image_probs, fields, seed: int = 0) -> np.ndarray:
    """Every row's fused P(malignant) with no answer or label of its fold used, as fit_context_cv would fit the
    stage without that fold: the missing-answer rule chosen and the fusion fitted on the other folds' rows (their
    context logits from context models that left out fold k as well as their own fold), applied to the row's
    context logit from a context model fitted on the other folds. df and image_probs as for fit_context_cv (the
    image scores are taken as given); what a fused threshold rule is judged on for new patients
    (core.cv.threshold_transfer)."""
    a, y, g = context_frame(df, check_fields(fields)), _y(df), _groups(df)
    fold, z_img = df["fold"].to_numpy(), image_logit(np.asarray(image_probs, float))
    if len(np.unique(fold)) < 3:  # the fusion's own context logits need a fold left besides k and their own
        raise ContextError("judging the fused rule on new patients needs at least 3 folds")
    ctx = {rule: crossfit_context_logits(a, y, g, fold, rule, seed=seed)[0] for rule in MISSING_RULES}
    p = np.empty(len(y))
    for k in np.unique(fold):
        rest, te = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        a_rest, y_rest, g_rest = a.iloc[rest], y[rest], g[rest]
        kept = screen_fields(a_rest, y_rest, g_rest)[0]
        if not kept:
            raise ContextError(f"no usable context field without fold {k}")
        rule, tried = _choose_missing_rule(a_rest, y_rest, g_rest, fold[rest], z_img[rest], kept, seed)
        f = _fit_fusion(z_img[rest], tried[rule][0], y_rest)
        p[te] = sigmoid(f["intercept"] + f["image"] * z_img[te] + f["context"] * ctx[rule][te])
    return p


def _choose_missing_rule(a: pd.DataFrame, y, g, fold, z_img, kept, seed: int) -> tuple[str, dict]:
    """The missing-answer rule whose fused model (context logits cross-fitted over `fold`, fusion fitted on the
    other folds) has the lower log-loss over the withheld-answer scenarios; tried: rule -> (its cross-fitted
    context logits with all answers as given, that loss)."""
    scenarios = _scenarios(kept, len(a), np.random.default_rng(seed))
    folds = [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in np.unique(fold)]
    tried = {}
    for missing_rule in MISSING_RULES:
        logits = crossfit_context_logits(a, y, g, fold, missing_rule, scenarios, seed)
        tried[missing_rule] = (logits[0], _fusion_loss(z_img, logits, y, folds))
    return min(tried, key=lambda k: tried[k][1]), tried


def crossfit_context_logits(a: pd.DataFrame, y, groups, fold, missing_rule: str, scenarios=({},),
                            seed: int = 0) -> list[np.ndarray]:
    """Per scenario (answers withheld), every row's context logit from a context model that never saw its fold:
    fields screened and weights fitted on the other folds' rows only."""
    fold = np.asarray(fold)
    logits = [np.empty(len(a)) for _ in scenarios]
    for k in np.unique(fold):
        tr, te = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        on = f"fold{'s' if len(set(fold[tr])) > 1 else ''} {', '.join(map(str, sorted(set(fold[tr]))))}"
        if len(set(y[tr])) < 2:  # e.g. an inner cross-fit of 3 folds fits on one fold, which may hold one class
            raise ContextError(f"{on} (to score fold {k}) {'hold' if ',' in on else 'holds'} one class only: no "
                               "context model can be fitted")
        kept = screen_fields(a.iloc[tr], y[tr], groups[tr])[0]
        if not kept:
            raise ContextError(f"no usable context field in {on} (to score fold {k})")
        model = _fit_answers(a.iloc[tr][kept], y[tr], groups[tr], missing_rule, seed)
        for z, withheld in zip(logits, scenarios):
            z[te] = _context_logits(model, _withhold(a.iloc[te], {f: np.asarray(m)[te] for f, m in withheld.items()}))
    return logits


def _stage(answers: ContextModel, fusion: dict, tried: dict, excluded: dict, a_fit: pd.DataFrame, fields, *,
           n_val: int, fitted_on: dict, fusion_folds: str) -> ContextModel:
    """The fitted stage: the chosen rule's answer model, the fusion, and what each part was fitted on (fitted_on:
    {"context_model": ..., "fusion": ...})."""
    return ContextModel(fields=answers.fields, intercept=answers.intercept, weights=answers.weights, fusion=fusion,
                        missing_rule=answers.missing_rule, excluded=excluded, fitted={
                            **fitted_on,
                            "C": answers.fitted["C"], "C_chosen_by": answers.fitted["C_chosen_by"],
                            "cv_log_loss": answers.fitted["cv_log_loss"],
                            "missing_rule_val_log_loss": {k: round(v[1], 4) for k, v in tried.items()},
                            "missing_rule_scenarios": "all answers; each field withheld in turn; 3 random masks "
                                                      f"(p={MASK_P}); fusion cross-fitted over {fusion_folds}",
                            "train_missing": {f: int(a_fit[f].isna().sum()) for f in fields},
                            "n_train": int(len(a_fit)), "n_val": int(n_val)})


def screen_fields(answers: pd.DataFrame, y: np.ndarray, groups: np.ndarray) -> tuple[list[str], dict]:
    """Fields usable as context on these training rows (groups: their patients), and why the others are not."""
    kept, excluded = [], {}
    for f in answers.columns:
        missing = answers[f].isna().to_numpy()
        n_answered = int((~missing).sum())
        if n_answered < MIN_ANSWERS:
            excluded[f] = f"only {n_answered} training images have an answer"
            continue
        n_patients = len(set(np.asarray(groups)[~missing]))
        if n_patients < MIN_ANSWER_PATIENTS:
            excluded[f] = (f"only {n_patients} training patient{'s' if n_patients != 1 else ''} answered it "
                           f"({n_answered} images)")
            continue
        if missing.any():
            table = [[int((missing & (y == 0)).sum()), int((missing & (y == 1)).sum())],
                     [int((~missing & (y == 0)).sum()), int((~missing & (y == 1)).sum())]]
            p = fisher_exact(table)[1]
            if p < MISSING_LEAK_P:
                excluded[f] = (f"not recorded for {table[0][0]} of {int((y == 0).sum())} benign and {table[0][1]} "
                               f"of {int((y == 1).sum())} malignant training images (Fisher p = {p:.1g}): whether "
                               "it was recorded gives the label away")
                continue
        kept.append(f)
    return kept, excluded


# ---------------------------------------------------------------- the context model (training rows)
def _stats(a: pd.DataFrame) -> dict:
    stats = {}
    for f in a.columns:
        answered = a[f].dropna()
        if FIELDS[f].kind == "numeric":
            x = answered.astype(float)
            if x.empty:  # an inner fold with no answer to it: an all-zero column, so a zero weight, not NaN
                stats[f] = {"mean": 0.0, "std": 1.0}
                continue
            stats[f] = {"mean": float(x.mean()), "std": float(max(x.std(ddof=0), 1e-6))}
        else:
            freq = answered.value_counts(normalize=True)
            stats[f] = {"freq": {lv: float(freq.get(lv, 0.0)) for lv in FIELDS[f].levels}}
    return stats


def _design(a: pd.DataFrame, stats: dict, missing_rule: str) -> np.ndarray:
    cols = []
    for f in a.columns:
        values = a[f].to_numpy()
        miss = pd.isna(values)
        if FIELDS[f].kind == "numeric":
            s = stats[f]
            z = np.where(miss, 0.0, np.clip((np.where(miss, s["mean"], values).astype(float) - s["mean"]) / s["std"],
                                            -4, 4))
            cols.append(z)
        else:
            for lv in FIELDS[f].levels:
                fill = 0.0 if missing_rule == "masked_level" else stats[f]["freq"][lv]
                cols.append(np.where(miss, fill, (values == lv).astype(float)))
        if missing_rule == "masked_level":
            cols.append(miss.astype(float))
    return np.column_stack(cols)


def _weights(coef: np.ndarray, a_cols, stats: dict, missing_rule: str) -> dict:
    out, i = {}, 0
    for f in a_cols:
        if FIELDS[f].kind == "numeric":
            w = {"kind": "numeric", "weight": float(coef[i]), **stats[f]}
            i += 1
        else:
            levels = FIELDS[f].levels
            w = {"kind": "categorical", "weights": {lv: float(c) for lv, c in zip(levels, coef[i:i + len(levels)])}}
            i += len(levels)
        if missing_rule == "masked_level":
            w["missing"] = float(coef[i])
            i += 1
        elif w["kind"] == "numeric":
            w["missing"] = 0.0  # z = 0 at the training mean
        else:
            w["missing"] = float(sum(stats[f]["freq"][lv] * w["weights"][lv] for lv in levels))
        out[f] = w
    return out


def _mask(a: pd.DataFrame, rng, copies: int) -> pd.DataFrame:
    base = a.to_numpy(dtype=object)
    parts = [base]
    for _ in range(copies):
        copy = base.copy()
        copy[rng.random(copy.shape) < MASK_P] = None
        parts.append(copy)
    return pd.DataFrame(np.concatenate(parts), columns=a.columns)


def _fit_lr(x, y, c, weight=None) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny folds; the grid compares log-loss anyway
        return LogisticRegression(C=c, solver="newton-cholesky", max_iter=200).fit(x, y, sample_weight=weight)


def _fit_answers(a: pd.DataFrame, y, groups, missing_rule: str, seed: int) -> ContextModel:
    """Context-only logistic regression on the training rows, C chosen by grouped cross-validation (the strongest
    regularisation in the grid when no fold holds both classes, said in `C_chosen_by`)."""
    if len(set(y)) < 2:
        raise ContextError(f"the context model's training rows hold one class only ({len(y)} images, all "
                           f"{'malignant' if y.all() else 'benign'})")
    if len(set(groups)) < 2:
        raise ContextError("the context model's training rows come from one patient: C cannot be chosen")
    copies = MASK_COPIES  # both rules are scored on the same masked copies of the held-out rows
    n_folds = min(5, len(set(groups)))
    losses = {c: [] for c in C_GRID}
    for k, (tr, te) in enumerate(GroupKFold(n_splits=n_folds).split(a, y, groups)):
        rng = np.random.default_rng([seed, k])
        a_fit = _mask(a.iloc[tr], rng, copies) if missing_rule == "masked_level" else a.iloc[tr]
        y_fit = np.tile(y[tr], copies + 1) if missing_rule == "masked_level" else y[tr]
        a_eval, y_eval = _mask(a.iloc[te], rng, copies), np.tile(y[te], copies + 1)
        if len(set(y_fit)) < 2 or len(set(y_eval)) < 2:
            continue
        stats = _stats(a.iloc[tr])
        x_fit, x_eval = _design(a_fit, stats, missing_rule), _design(a_eval, stats, missing_rule)
        for c in C_GRID:
            p = _fit_lr(x_fit, y_fit, c).predict_proba(x_eval)[:, 1]
            losses[c].append(log_loss(y_eval, p, labels=[0, 1]))
    mean = {c: float(np.mean(v)) if v else None for c, v in losses.items()}  # None: no fold to measure it on
    measured = [c for c in C_GRID if mean[c] is not None]
    best = min(measured, key=lambda c: (mean[c], c)) if measured else min(C_GRID)
    rng = np.random.default_rng([seed, 99])
    a_fit = _mask(a, rng, copies) if missing_rule == "masked_level" else a
    y_fit = np.tile(y, copies + 1) if missing_rule == "masked_level" else y
    stats = _stats(a)
    lr = _fit_lr(_design(a_fit, stats, missing_rule), y_fit, best)
    return ContextModel(fields=tuple(a.columns), intercept=float(lr.intercept_[0]),
                        weights=_weights(lr.coef_[0], a.columns, stats, missing_rule),
                        fusion={"intercept": 0.0, "image": 0.0, "context": 1.0}, missing_rule=missing_rule,
                        fitted={"C": best, "C_chosen_by": f"grouped {n_folds}-fold cross-validation" if measured else
                                "default (the strongest regularisation tried): no grouped fold held both classes",
                                "cv_log_loss": {str(c): None if v is None else round(v, 4) for c, v in mean.items()}})


# ---------------------------------------------------------------- fusion (validation rows)
def _fit_fusion(z_img, z_ctx, y) -> dict:
    if len(set(y)) < 2:
        raise ContextError("the validation split needs malignant and benign images to fit the fusion")
    lr = _fit_lr(np.column_stack([z_img, z_ctx]), y, FUSION_C)
    return {"intercept": float(lr.intercept_[0]), "image": float(lr.coef_[0][0]), "context": float(lr.coef_[0][1])}


def refresh_fusion_refits(model: ContextModel, df: pd.DataFrame, image_probs, *, n_boot: int = 1000,
                          seed: int = 0) -> tuple[ContextModel, float]:
    """A stored stage given the fusion refits it lacks (one saved before they were kept), from the rows its fusion
    was fitted on and their image probabilities. Returns the stage and how far the fusion refitted on these rows
    lies from the stored one (largest absolute difference of the three numbers): the caller decides whether the
    rows and scores are the ones it was fitted on. The stored fusion itself is kept."""
    a = context_frame(df, model.fields)
    z_img, z_ctx, y = image_logit(np.asarray(image_probs, float)), _context_logits(model, a), _y(df)
    fresh = _fit_fusion(z_img, z_ctx, y)
    drift = max(abs(fresh[k] - float(model.fusion[k])) for k in FUSION_BOOT_KEYS)
    return _with_refits(model, z_img, z_ctx, y, df, n_boot, seed), drift


def _with_refits(model: ContextModel, z_img, z_ctx, y, df: pd.DataFrame, n_boot: int, seed: int) -> ContextModel:
    """The stage with its fusion refitted on `n_boot` resamples of the rows it was fitted on, whole patients (or
    lesions, or photos without ids) moving together; the answers' weights and the image scores stay as they are. A
    resample holding one class is skipped; with fewer than half left, none are kept (the rest would be the
    surer-looking subset), as core.calibration does."""
    from dataclasses import replace

    from core.evaluation import resample_unit
    if not n_boot:
        return model
    codes, n_groups = metrics.group_codes(_groups(df), len(y))[:2]
    x, fits = np.column_stack([z_img, z_ctx]), []
    for chunk in metrics.resample_weights(codes, n_groups, n_boot, seed):
        for w in chunk:
            if w @ y > 0 and w @ (1 - y) > 0:
                lr = _fit_lr(x, y, FUSION_C, w)
                fits.append((lr.intercept_[0], *lr.coef_[0]))
    if len(fits) < metrics.MIN_VALID_FRACTION * n_boot:
        return model
    columns = np.round(np.array(fits).T, 6).tolist()
    return replace(model, fusion_bootstrap={
        "meaning": FUSION_BOOT_MEANING, "unit": resample_unit(df), "n": int(len(y)), "fits": len(fits),
        **dict(zip(FUSION_BOOT_KEYS, columns))})


def _scenarios(fields, n, rng) -> list[dict]:
    """Which answers are withheld, per validation row: none; each field in turn; three random masks."""
    out = [{}]
    out += [{f: np.ones(n, bool)} for f in fields]
    for _ in range(3):
        out.append({f: rng.random(n) < MASK_P for f in fields})
    return out


def _withhold(a: pd.DataFrame, withheld: dict) -> pd.DataFrame:
    """The answers with a scenario's fields withheld (mask: a boolean array over the rows of `a`)."""
    a = a.copy()
    for f, mask in withheld.items():
        if f in a:
            a.loc[np.asarray(mask, bool), f] = None
    return a


def _context_logits(model: ContextModel, a: pd.DataFrame) -> np.ndarray:
    return np.array([model.context_logit(r) for r in _records(a)], dtype=float)


def _crossfit_fusion(z_img, z_ctx, y, folds) -> np.ndarray:
    """Each fold's fused probabilities from a fusion fitted on the other folds (the base rate when those hold one
    class)."""
    p = np.empty(len(y))
    for tr, te in folds:
        if len(set(y[tr])) < 2:
            p[te] = y[tr].mean()
            continue
        f = _fit_fusion(z_img[tr], z_ctx[tr], y[tr])
        p[te] = sigmoid(f["intercept"] + f["image"] * z_img[te] + f["context"] * z_ctx[te])
    return p


def _fusion_loss(z_img, z_ctx_per_scenario, y, folds) -> float:
    """Mean log-loss of the fused model over the scenarios, each fold's fusion fitted on the other folds."""
    losses = [log_loss(y, np.clip(_crossfit_fusion(z_img, z_ctx, y, folds), 1e-6, 1 - 1e-6), labels=[0, 1])
              for z_ctx in z_ctx_per_scenario]
    return float(np.mean(losses))


def _with_thresholds(model: ContextModel, fused, ctx, y, groups, where: str, rule, target, n_boot,
                     seed) -> ContextModel:
    """The fused and context-only thresholds, chosen by the recipe's rule on these scores (every row through the
    fused formula, unanswered fields at their missing weight, as reported), with their numbers there."""
    from dataclasses import replace
    out = {}
    for name, p in (("fused", np.asarray(fused, float)), ("context", np.asarray(ctx, float))):
        chosen = metrics.choose_threshold(y, p, rule=rule, target=target)
        rep = metrics.metric_report(y, p, chosen["threshold"], groups=groups, n_boot=n_boot, seed=seed)
        m = rep["metrics"]
        out[name] = {"value": chosen["threshold"], "rule": rule, "target": target,
                     "chosen_on": f"{where} ({name} output)", "val_sensitivity": m["recall"],
                     "val_specificity": m["specificity"], "val_roc_auc": m["roc_auc"], "n_val": int(len(y)),
                     "n_val_malignant": int(y.sum())}
    return replace(model, threshold=out["fused"], context_threshold=out["context"])


# ---------------------------------------------------------------- checks
def _records(a: pd.DataFrame) -> list[dict]:
    return [{k: v for k, v in r.items() if v is not None and not (isinstance(v, float) and np.isnan(v))}
            for r in a.to_dict("records")]


def _y(df) -> np.ndarray:
    return df["label"].to_numpy().astype(int)


def _groups(df) -> np.ndarray:
    from core.splits import grouping
    return grouping(df)[1].to_numpy()


def _check_rows(df: pd.DataFrame, split: str) -> None:
    if df.empty:
        raise ContextError(f"no {split} rows to fit the context stage on")
    if "split" in df and not (df["split"] == split).all():
        others = sorted(set(df["split"].dropna()) - {split})
        raise ContextError(f"the context stage's {split} rows include rows of split(s) {others}: a held-out "
                           "patient's answers must never reach it")


def _check_folds(fold: np.ndarray, groups: np.ndarray, y: np.ndarray) -> None:
    """Cross-fitting needs patient-grouped folds, each fold's complement holding both classes."""
    per_patient = pd.Series(fold).groupby(groups).nunique()
    if (per_patient > 1).any():
        raise ContextError(f"patient {per_patient[per_patient > 1].index[0]!r} is in more than one fold")
    for k in np.unique(fold):
        if len(set(y[fold != k])) < 2:
            raise ContextError(f"the folds other than {k} hold one class only: the context model cannot be "
                               "cross-fitted")


def _check_disjoint(train_df: pd.DataFrame, val_df: pd.DataFrame) -> None:
    g_tr, g_val = set(_groups(train_df)), set(_groups(val_df))
    both = g_tr & g_val
    if both:
        raise ContextError(f"{len(both)} patient(s) in both the training and validation rows, e.g. "
                           f"{sorted(both)[0]!r}")
