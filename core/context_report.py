"""Image-only, context-only and fused metrics side by side (95% CIs, patient bootstrap), each answer withheld in
turn, and the fused model's weight per field: what the answers add, for a clinician-researcher."""
from __future__ import annotations

import numpy as np
import pandas as pd

from core import metrics
from core.context import ContextModel, context_frame, image_logit
from core.scores import sigmoid


def context_report(df: pd.DataFrame, image_probs, image_threshold: float, model: ContextModel, *, n_boot=1000,
                   seed=0) -> dict:
    """The report for manifest rows with their context columns and the image model's probabilities.

    'fused' applies the context stage to every row (an unanswered field contributes its missing weight), so all
    rows share the fused threshold; `fuse` (app, screen) returns the image-only result for a photo with no answer."""
    from core.evaluation import groups_of
    y = df["label"].to_numpy().astype(int)
    groups = groups_of(df)
    problems = {}  # a bad answer counts as unanswered: the report names it instead of failing
    answers = context_frame(df, model.fields, problems)
    image_probs = np.asarray(image_probs, float)

    def report(p, t):
        return metrics.metric_report(y, p, t, groups=groups, n_boot=n_boot, seed=seed)

    def fused(a):
        z = [model.fused_logit(pi, _answered(r)) for pi, r in zip(image_probs, a.to_dict("records"))]
        return sigmoid(np.array(z))

    ctx = sigmoid(np.array([model.context_logit(_answered(r)) for r in answers.to_dict("records")]))
    t_fused, t_ctx = float(model.threshold["value"]), float(model.context_threshold["value"])
    out = {"image_only": report(image_probs, image_threshold),
           "context_only": report(ctx, t_ctx),
           "fused": report(fused(answers), t_fused), "withheld": {},
           "answered": {f: int(answers[f].notna().sum()) for f in model.fields},
           "n_rows_without_answers": int(answers.isna().all(axis=1).sum()),
           "weights_per_field": model.per_field_weights(), "fusion": model.fusion,
           "missing_rule": model.missing_rule, "excluded_fields": model.excluded,
           "thresholds": {"image_only": image_threshold, "context_only": t_ctx, "fused": t_fused},
           "unusable_answers": [{"image": str(df["image"].iloc[i]), "problems": why} for i, why in problems.items()]}
    for f in model.fields:
        out["withheld"][f] = report(fused(answers.assign(**{f: None})), t_fused)
    # with no answer at all, `fuse` (the app, screen) gives the photo-only result at the photo-only threshold: the
    # row says what a user would get, not the fused model with every missing weight at the fused threshold
    out["withheld"]["all answers"] = report(image_probs, image_threshold)
    out["per_image"] = pd.DataFrame({"image": df["image"].values, "label": y, "image_prob": image_probs,
                                     "context_prob": ctx, "fused_prob": out_probs(model, image_probs, answers),
                                     "image_logit": image_logit(image_probs)}).to_dict(orient="records")
    return out


def out_probs(model: ContextModel, image_probs, answers: pd.DataFrame) -> list[float]:
    return [float(sigmoid(model.fused_logit(p, _answered(r)))) for p, r in zip(image_probs, answers.to_dict("records"))]


def format_context_table(report: dict, name: str) -> str:
    """The side-by-side table, then one row per withheld answer (paper's table layout, 95% CIs)."""
    rows = [(f"{name} image only", report["image_only"]["metrics"]),
            (f"{name} context only", report["context_only"]["metrics"]),
            (f"{name} fused", report["fused"]["metrics"])]
    rows += [(f"{name} fused, {f} withheld", r["metrics"]) for f, r in report["withheld"].items()]
    return metrics.format_table(rows)


def _answered(row: dict) -> dict:
    return {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and np.isnan(v))}
