"""Knowing when not to answer: fit the gate, calibration and similar-case index together, and apply them together.

Every prediction path (the app, train.screen, train.evaluate) decides a photo's verdict here, so they agree:
- a quality refusal (core.quality) or a photo beyond the out-of-distribution gate (core.ood) -> "not assessed",
  with the reason; the raw score is kept but is not a verdict;
- otherwise "flagged" (raw score >= the stored threshold) or "not flagged". The calibrated probability is
  monotone in the raw score, so the verdict is the same on either scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from core import calibration as cal
from core.device import ieee_fp32
from core.metrics import RESAMPLED, format_whole_percent
from core import ood
from core.scores import sigmoid
from core.similar import SimilarIndex, build_index

FLAGGED, NOT_FLAGGED, NOT_ASSESSED = "flagged", "not flagged", "not assessed"
VERDICTS = (FLAGGED, NOT_FLAGGED, NOT_ASSESSED)
OOD_MESSAGE = ("This photo does not look like the photos this model was trained on ({detail}); the model cannot "
               "assess it.")


@dataclass(frozen=True)
class TrustParts:
    """What fit_trust produces and the bundle stores (each part may be None in an older bundle)."""
    gate: ood.OODGate | None
    calibration: cal.Calibration | None
    similar: SimilarIndex | None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Assessment:
    """One photo's outcome: the verdict (see VERDICTS), why it was not assessed, and its numbers."""
    verdict: str
    raw_prob: float
    prob_calibrated: float | None = None
    ood_score: float | None = None
    refusal: str | None = None        # "quality" | "out_of_distribution" | None
    reason: str | None = None         # plain language, for the app and the CSV
    quality_codes: tuple[str, ...] = field(default=())
    members: object = None            # an ensemble's core.ensemble.Disagreement (None: one model)
    prob_calibrated_ci95: tuple[float, float] | None = None  # over the calibration's refits (None: none stored)

    @property
    def assessed(self) -> bool:
        return self.verdict != NOT_ASSESSED


# -------------------------------------------------------------------- features
@torch.no_grad()
def features_and_logits(model, df: pd.DataFrame, *, device="cpu", batch_size: int = 32,
                        num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (N, D) and logits (N,) in fp32 for every manifest row, decoded as training decodes."""
    from core.embeddings import embed
    feats = embed(model, df, model.spec.preprocessing, device=device, batch_size=batch_size,
                  num_workers=num_workers)
    was_training = model.training
    model.eval()
    head = model.head.to(device)
    with ieee_fp32(torch.device(device)):  # the logits calibration is fitted on: IEEE fp32 as the app's fp32 path
        logits = head(torch.from_numpy(feats).to(device)).float().squeeze(1).cpu().numpy().astype(np.float64)
    model.train(was_training)
    return feats, logits


def fit_trust(model, split_df: pd.DataFrame, *, device="cpu", seed: int = 0) -> TrustParts:
    """Gate (train photos describe, validation photos set the threshold), calibration (validation logits) and the
    similar-case index (train + validation photos) for a trained model. Test rows are never read."""
    from core.evaluation import groups_of, resample_unit
    train = split_df[split_df["split"] == "train"].reset_index(drop=True)
    val = split_df[split_df["split"] == "val"].reset_index(drop=True)
    both = pd.concat([train, val], ignore_index=True)
    feats, logits = features_and_logits(model, both, device=device)
    f_train, f_val, z_val = feats[:len(train)], feats[len(train):], logits[len(train):]
    notes = []
    gate = calibration = None
    try:
        gate = ood.fit_gate(f_train, f_val, seed=seed)
    except ood.GateError as e:
        notes.append(f"no out-of-distribution gate: {e}")
    try:
        calibration = cal.fit_calibration(z_val, val["label"].to_numpy(), groups=groups_of(val), seed=seed,
                                          unit=resample_unit(val))
    except cal.CalibrationError as e:
        notes.append(f"no calibration map: {e}")
    return TrustParts(gate, calibration, build_index(both, feats, seed=seed), tuple(notes))


# -------------------------------------------------------------------- decisions
def assess(raw_prob: float, threshold: float, *, calibration: cal.Calibration | None = None,
           gate_result: ood.GateResult | None = None, quality=()) -> Assessment:
    """The verdict for one photo from its raw score, the gate's result and its quality findings."""
    prob_cal = None if calibration is None else float(calibration.apply(np.array([raw_prob]))[0])
    codes = tuple(w.code for w in quality)
    score = None if gate_result is None else gate_result.score
    refused = [w for w in quality if getattr(w, "refusal", False)]
    # A refused photo keeps its raw score (shown as unreliable) but gets no calibrated probability: calibration
    # describes photos like the validation photos, which this one is not.
    if refused:
        return Assessment(NOT_ASSESSED, raw_prob, None, score, "quality", " ".join(w.message for w in refused), codes)
    if gate_result is not None and not gate_result.accepted:
        return Assessment(NOT_ASSESSED, raw_prob, None, score, "out_of_distribution",
                          OOD_MESSAGE.format(detail=gate_result.reason), codes)
    return Assessment(FLAGGED if raw_prob >= threshold else NOT_FLAGGED, raw_prob, prob_cal, score, None, None,
                      codes, prob_calibrated_ci95=None if calibration is None else calibration.interval(raw_prob))


def assess_batch(raw_probs, threshold: float, *, calibration=None, gate=None, feats=None,
                 quality_lists=None, member_probs=None) -> list[Assessment]:
    """assess() for a batch; the gate is applied to `feats` when both are given; `member_probs` (N, K): an
    ensemble's members' raw scores, recorded as each photo's disagreement."""
    from dataclasses import replace

    from core.ensemble import disagreement
    raw = np.asarray(raw_probs, dtype=np.float64)
    results = gate.check(feats) if gate is not None and feats is not None else [None] * len(raw)
    quality_lists = quality_lists if quality_lists is not None else [()] * len(raw)
    members = [None] * len(raw) if member_probs is None else [disagreement(m, threshold) for m in member_probs]
    return [replace(assess(float(p), threshold, calibration=calibration, gate_result=g, quality=q), members=d)
            for p, g, q, d in zip(raw, results, quality_lists, members)]


def reference_population(calibration: cal.Calibration | None) -> str | None:
    """The sentence that says what a calibrated probability is relative to."""
    if calibration is None:
        return None
    return (f"among photos like the {calibration.n} {calibration.fitted_on} photos, where {calibration.prevalence:.0%} were "
            f"malignant")


def interval_sentence(calibration: cal.Calibration | None, ci: tuple[float, float] | None,
                      threshold: float | None = None) -> str | None:
    """What a calibrated probability's interval means, or why there is none; None without a calibration.
    `threshold`: the calibrated threshold, named when the interval holds it (that reads as 'borderline', but each
    refit moves score and threshold alike, so the verdict holds under every one)."""
    if calibration is None:
        return None
    unit = calibration.boot_unit
    if ci is None:
        return ("No interval: this model's calibration has no refits stored (it was saved before they were kept, or "
                f"it had too few malignant and benign {unit} to refit it).")
    return (f"95% interval {interval_text(ci)}: the calibration refitted on {len(calibration.boot)} bootstrap "
            f"resamples of its {calibration.n} {calibration.fitted_on} photos "
            f"({RESAMPLED.get(unit, 'whole groups resampled')}) put this number in that range; with other {unit} "
            "it would most likely have read within it." + (
                f" The threshold ({format_whole_percent(threshold)} calibrated) lies in this range too, yet the "
                "verdict holds under every refit: each one moves the threshold with the score."
                if threshold is not None and ci[0] <= threshold <= ci[1] else ""))


def with_interval(text: str, ci: tuple[float, float] | None) -> str:
    """'97% (95% interval 89% to >99%)', or the text alone when there is no interval."""
    return text + (f" (95% interval {interval_text(ci)})" if ci else "")


def interval_text(ci: tuple[float, float]) -> str:
    """'15% to 34%': whole percentages rounded outwards, so the printed interval never claims to be narrower ('to',
    not a dash: '90%–>99%' read as an arrow)."""
    return f"{percent_outward(ci[0], math.floor)} to {percent_outward(ci[1], math.ceil)}"


def percent_outward(p: float, rounding) -> str:
    """A whole percentage rounded away from the interval's centre (floor low ends, ceil high ends). A calibrated
    probability is a sigmoid, never 0 or 1 (even where it saturates in floating point): '<1%' and '>99%' instead."""
    whole = int(rounding(round(p * 100, 9)))
    if whole <= 0:
        return "<1%"
    if whole >= 100:
        return ">99%"
    return f"{whole}%"


# -------------------------------------------------------------------- evaluation
def trust_report(df: pd.DataFrame, logits: np.ndarray, feats: np.ndarray, bundle, *, quality_lists=None,
                 n_boot: int = 1000, seed: int = 0) -> dict:
    """For train.evaluate: how many photos the gate (and quality) refused, metrics on the accepted photos beside
    metrics on all, and Brier/ECE before and after calibration with patient-bootstrap intervals."""
    from core.evaluation import build_report, groups_of
    raw = sigmoid(logits)
    assessments = assess_batch(raw, bundle.threshold, calibration=bundle.calibration, gate=bundle.gate,
                               feats=feats, quality_lists=quality_lists)
    refused = np.array([not a.assessed for a in assessments])
    y = df["label"].to_numpy().astype(int)
    groups = groups_of(df)
    out = {"lacks": bundle.lacks(), "n": int(len(df)), "n_not_assessed": int(refused.sum()),
           "n_refused_by_gate": int(sum(a.refusal == "out_of_distribution" for a in assessments)),
           "n_refused_by_quality": int(sum(a.refusal == "quality" for a in assessments)),
           "gate": None if bundle.gate is None else {"method": bundle.gate.method, "threshold": bundle.gate.threshold},
           "calibration_before": cal.calibration_report(y, raw, groups=groups, n_boot=n_boot, seed=seed)}
    if bundle.calibration is not None:
        out["calibration_after"] = cal.calibration_report(y, bundle.calibration.apply_logit(logits), groups=groups,
                                                          n_boot=n_boot, seed=seed)
        meta = bundle.calibration.to_meta()
        out["calibration_map"] = {k: v for k, v in meta.items() if k != "bootstrap"}  # the refits stay in the bundle
        out["calibration_map"]["bootstrap_fits"] = len(bundle.calibration.boot)
    accepted = ~refused
    if accepted.any() and refused.any():
        sub = df[accepted].reset_index(drop=True)
        rep = build_report(sub, raw[accepted], bundle.threshold, n_boot=n_boot, seed=seed)
        out["accepted_metrics"] = {k: rep[k] for k in ("metrics", "confusion_matrix", "n", "n_positive", "notes")}
    out["per_image"] = [{"verdict": a.verdict, "not_assessed_reason": a.reason, "prob_calibrated": a.prob_calibrated,
                         "ood_score": a.ood_score} for a in assessments]
    return out


def summary_lines(trust: dict) -> list[str]:
    """The trust section of a report in a few printable lines."""
    from core.metrics import format_estimate
    lines = [f"not assessed: {trust['n_not_assessed']} of {trust['n']} photos ({trust['n_refused_by_gate']} by the "
             f"out-of-distribution gate, {trust['n_refused_by_quality']} by quality refusals)"]
    lines += [f"this model has {lack}" for lack in trust["lacks"]]
    before, after = trust["calibration_before"], trust.get("calibration_after")
    for key, name in (("brier", "Brier score"), ("ece", "ECE")):
        text = f"{name}: raw {format_estimate(before[key], '.4f', '.3f')}"
        if after:
            text += f", calibrated {format_estimate(after[key], '.4f', '.3f')}"
        lines.append(text)
    if any(_above(part.get("ece")) for part in (before, after) if part):
        lines.append(f"  ({cal.ECE_INTERVAL})")
    return lines


def _above(entry) -> bool:
    """An estimate whose interval lies wholly above it (a biased statistic's resamples)."""
    ci = (entry or {}).get("ci95")
    return bool(ci) and entry.get("value") is not None and ci[0] > entry["value"]


def attach(report: dict, trust: dict) -> dict:
    """Put the trust section into an evaluation report: per-image verdicts join the report's prediction rows."""
    per_image = trust.pop("per_image")
    for row, extra in zip(report.get("predictions", []), per_image):
        row.update(extra)
        if extra["verdict"] == NOT_ASSESSED:
            row["pred"] = None  # no verdict was given: it is neither a correct nor an incorrect prediction
    report["trust"] = trust
    return report


def quality_of(df: pd.DataFrame, pp) -> list[list]:
    """core.quality findings for every manifest row, decoded as the app decodes (an unreadable file: none)."""
    from core.dataset import decode_limits
    from core.images import ImageLoadError, load_image
    from core.manifest import crop_of
    from core.quality import quality_warnings
    kw = decode_limits(pp.resize_to)
    out = []
    for _, r in df.iterrows():
        try:
            out.append(quality_warnings(load_image(r["image"], crop=crop_of(r), **kw)))
        except ImageLoadError:
            out.append([])
    return out
