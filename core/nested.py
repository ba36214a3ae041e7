"""Nested cross-validation: the pair runs and the ensemble scores an ensemble's threshold is chosen on.

A K-fold ensemble averages K models, and averaging can move scores: a threshold chosen on the single fold models'
out-of-fold scores is not the ensemble's own, and the test split is too small to tell (README, "Nested
cross-validation"). An honest ensemble-like score for a photo needs several models that never trained on it.

With `cv.nested`, one more model is trained for each pair of folds (k, j), leaving both out (trained on the other
K-2 folds, validated on k and j); the K-1 pair models that leave out fold k score its photos, and their combined
score (the ensemble's own combine rule) is that photo's nested out-of-fold score. K(K-1)/2 more runs, each on
(K-2)/K of the non-test photos: K-1 models trained on less data stand in for the K-model ensemble, so these scores
are close to, not equal to, the bundle's.
"""
from __future__ import annotations

from dataclasses import replace
from itertools import combinations
from pathlib import Path

import pandas as pd
import torch

from core import runfolder
from core.bundle import Provenance, load_bundle
from core.config import CVConfig, RunConfig
from core.manifest import read_manifest
from core.model import combine_logits
from core.runfolder import BUNDLE
from core.scores import sigmoid

NESTED_COLUMNS = ("image", "label", "patient_id", "fold", "prob", "logit", "members")


def pairs(k_folds: int) -> list[tuple[int, int]]:
    """Every pair of folds (k < j), in a fixed order: the pair runs' training order."""
    return list(combinations(range(k_folds), 2))


def pair_config(cfg: RunConfig, k: int, j: int) -> RunConfig:
    """Pair (k, j)'s run: the recipe as one ordinary run that validates on folds k and j, with its own seed (after
    the fold runs' seeds), no test report and no context stage; split.val is only descriptive (about the share two
    folds hold)."""
    index = pairs(cfg.cv.folds).index((k, j))
    val = round(2 * (1 - cfg.split.test) / cfg.cv.folds, 4)
    return replace(cfg, name=f"{cfg.name}.pair_{k}_{j}", seed=cfg.seed + cfg.cv.folds + index, report_test=False,
                   cv=CVConfig(), split=replace(cfg.split, val=val), context=None)


def pair_scores(run: Path, cfg: RunConfig) -> tuple[pd.DataFrame, list[Provenance]]:
    """Every pair model's fp32 logit on each photo it left out (the last stage's validation rows): one row per
    (photo, pair), with columns image, label, patient_id, pair, logit; and the pair models' provenance (their
    training time and machines are part of making the ensemble's threshold)."""
    from core.trust import features_and_logits
    last = len(cfg.stages) - 1
    parts, provenances = [], []
    for k, j in pairs(cfg.cv.folds):
        pair_dir = runfolder.pair_path(run, k, j)
        bundle = load_bundle(pair_dir / BUNDLE)
        provenances.append(bundle.meta.provenance)
        split = read_manifest(runfolder.split_path(pair_dir, last, cfg.stages[last].name))
        val = split[split["split"] == "val"].reset_index(drop=True)
        _, logits = features_and_logits(bundle.model, val)
        parts.append(val.assign(pair=f"{k}_{j}", logit=logits))
    return pd.concat(parts, ignore_index=True), provenances


def nested_oof(scores: pd.DataFrame, folds: pd.DataFrame, combine: str) -> pd.DataFrame:
    """Each non-test photo's nested out-of-fold score: the combined logit (and probability) of the K-1 pair models
    that left out its fold, with `members` = how many. Raises when a photo is not scored by exactly those models
    (a pair run's split that does not match the folds would silently bias the threshold)."""
    fold_of = dict(zip(folds["image"], folds["fold"]))
    k_folds = int(folds["fold"].max()) + 1
    scores = scores.assign(fold=scores["image"].map(fold_of))
    rows = []
    for image, part in scores.groupby("image", sort=False):
        f = int(part["fold"].iloc[0])
        expected = {f"{min(f, o)}_{max(f, o)}" for o in range(k_folds) if o != f}
        if set(part["pair"]) != expected or len(part) != len(expected):
            raise RuntimeError(f"{image} (fold {f}) was scored by pair models {sorted(part['pair'])}, not by the "
                               f"{k_folds - 1} that leave out its fold: the pair runs' splits do not match "
                               f"{runfolder.FOLDS}")
        logit = float(combine_logits(torch.tensor(part["logit"].to_numpy()[None, :], dtype=torch.float64),
                                     combine)[0, 0])
        first = part.iloc[0]
        rows.append({"image": image, "label": int(first["label"]), "patient_id": first.get("patient_id"),
                     "fold": f, "prob": sigmoid(logit), "logit": logit, "members": len(part)})
    out = pd.DataFrame(rows, columns=list(NESTED_COLUMNS))
    non_test = set(folds.loc[folds["split"] != "test", "image"])
    if set(out["image"]) != non_test:
        raise RuntimeError(f"nested out-of-fold scores cover {len(set(out['image']) & non_test)} of {len(non_test)} "
                           "non-test photos: a pair run is missing photos")
    return out


def how(k_folds: int) -> str:
    """The nested scores in words (the threshold's `chosen_on` starts with "out-of-fold", as the app reads it)."""
    return (f"out-of-fold predictions of {k_folds - 1}-model ensembles (nested cross-validation: "
            f"{len(pairs(k_folds))} pair models, each photo scored by the {k_folds - 1} that never trained on it)")
