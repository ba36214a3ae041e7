"""Ensemble bundles: K fold models saved as one model, and how much the members disagree about a photo."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.bundle import Bundle, BundleError, Provenance, Threshold, save_bundle
from core.metrics import format_score
from core.model import COMBINE_RULES, EnsembleClassifier
from core.ood import EnsembleGate

DEFAULT_COMBINE = "mean_prob"


def build_ensemble(members: list[Bundle], combine: str = DEFAULT_COMBINE) -> EnsembleClassifier:
    """One EnsembleClassifier from loaded single-model bundles (one architecture; an ensemble is not nested)."""
    if not members:
        raise BundleError("an ensemble needs at least one member bundle")
    nested = [b.path for b in members if isinstance(b.model, EnsembleClassifier)]
    if nested:
        raise BundleError(f"{nested[0]} is itself an ensemble; give its members instead")
    seen, models = set(), []
    for b in members:  # the same model given twice becomes two copies: one weights file cannot share tensors
        models.append(copy.deepcopy(b.model) if id(b.model) in seen else b.model)
        seen.add(id(b.model))
    try:
        return EnsembleClassifier(models, combine)
    except ValueError as e:
        raise BundleError(str(e)) from e


def save_ensemble(members: list[Bundle], folder: str | Path, *, threshold: Threshold,
                  provenance: Provenance | dict, calibration=None, member_info=(), similar_df: pd.DataFrame | None = None,
                  seed: int = 0, combine: str = DEFAULT_COMBINE, device="cpu", context=None) -> Path:
    """Write the members as one bundle: their weights side by side, a gate made of the members' own gates (when
    every member has one), the caller's threshold, calibration and context stage (fitted on out-of-fold
    predictions), and a similar-case index over `similar_df` in the ensemble's feature space."""
    if combine not in COMBINE_RULES:
        raise BundleError(f"combine must be one of {', '.join(COMBINE_RULES)}, not {combine!r}")
    model = build_ensemble(members, combine)
    gates = [b.gate for b in members]
    gate = EnsembleGate(tuple(gates)) if all(g is not None for g in gates) else None
    similar = None
    if similar_df is not None and len(similar_df):
        from core.similar import build_index
        from core.trust import features_and_logits
        feats, _ = features_and_logits(model, similar_df.reset_index(drop=True), device=device)
        similar = build_index(similar_df.reset_index(drop=True), feats, seed=seed)
    info = [{**dict(m), "weights_sha256": b.meta.weights_sha256} for m, b in
            zip(list(member_info) or [{} for _ in members], members)]
    if len(info) != len(members):
        raise BundleError(f"member_info has {len(member_info)} entries for {len(members)} members")
    return save_bundle(model, folder, threshold=threshold, provenance=provenance, gate=gate, calibration=calibration,
                       similar=similar, context=context,
                       ensemble={"members": len(members), "combine": combine, "member_info": info})


@dataclass(frozen=True)
class Disagreement:
    """The members' raw scores for one photo and how far apart they are, against the raw threshold."""
    probs: tuple[float, ...]
    threshold: float

    @property
    def n(self) -> int:
        return len(self.probs)

    @property
    def n_flagging(self) -> int:
        return int(sum(p >= self.threshold for p in self.probs))

    @property
    def sd(self) -> float:
        return float(np.std(self.probs, ddof=1)) if self.n > 1 else 0.0

    @property
    def split(self) -> bool:
        """Some members flag the photo and some do not: the verdict rests on which models were trained."""
        return 0 < self.n_flagging < self.n

    def sentence(self) -> str:
        lo, hi = min(self.probs), max(self.probs)
        verb = "disagree" if self.split else "agree"
        flag = {0: "none flags it", self.n: "all flag it"}.get(self.n_flagging, f"{self.n_flagging} of {self.n} flag it")
        return (f"The {self.n} models {verb}: {flag} (their raw scores {format_score(lo)}-{format_score(hi)}, SD "
                f"{self.sd * 100:.1f} points, threshold {format_score(self.threshold)}).")


def disagreement(member_probs, threshold: float) -> Disagreement | None:
    """None for a single model (nothing to disagree)."""
    probs = tuple(float(p) for p in np.ravel(member_probs))
    return Disagreement(probs, float(threshold)) if len(probs) > 1 else None


def member_scores(model: EnsembleClassifier, feats: np.ndarray) -> np.ndarray:
    """(N, K) each member's raw score from the ensemble's side-by-side features (no second pass over the photos)."""
    import torch
    parts = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)).chunk(len(model.members), dim=1)
    with torch.no_grad():
        return np.concatenate([torch.sigmoid(m.head(f)).numpy() for m, f in zip(model.members, parts)], axis=1)


def members_report(df: pd.DataFrame, feats: np.ndarray, bundle: Bundle, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """For train.evaluate: each member's own metrics on these photos beside the ensemble's, and how often the
    members fall on both sides of the threshold."""
    from core import metrics
    from core.evaluation import groups_of
    scores = member_scores(bundle.model, feats)
    y = df["label"].to_numpy().astype(int)
    info = bundle.meta.ensemble.member_info if bundle.meta.ensemble else []
    rows = []
    for k in range(scores.shape[1]):
        m = metrics.metric_report(y, scores[:, k], bundle.threshold, groups=groups_of(df), n_boot=n_boot, seed=seed)
        rows.append({"member": k, **({"fold": info[k].get("fold")} if k < len(info) else {}),
                     "metrics": m["metrics"]})
    split = [disagreement(s, bundle.threshold).split for s in scores]
    return {"members": rows, "split_fraction": float(np.mean(split)) if split else None,
            "median_sd": float(np.median(np.std(scores, axis=1, ddof=1))) if len(scores) else None,
            "what": "each member scored alone at the ensemble's threshold; split_fraction: share of photos some "
                    "members flag and others do not"}
