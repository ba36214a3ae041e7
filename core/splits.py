"""Seeded, stratified train/val/test splits grouped by patient, so no patient appears in two splits."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from core.manifest import ManifestError


@dataclass(frozen=True)
class SplitConfig:
    val: float = 0.15
    test: float = 0.15
    seed: int = 0


def grouping(df: pd.DataFrame) -> tuple[str, pd.Series]:
    """Group by patient; fall back to lesion, then image, and say which was used."""
    for col in ("patient_id", "lesion_id"):
        if col in df and df[col].notna().all() and (df[col].astype(str).str.strip() != "").all():
            return col, df[col].astype(str)
    return "image", df["image"].astype(str)


def _take_fold(y, groups, frac: float, seed: int) -> np.ndarray:
    """Boolean mask of one stratified group fold holding about `frac` of the rows."""
    n_splits = max(2, int(round(1 / frac)))
    n_groups = len(set(groups))
    if n_groups < n_splits:
        raise ManifestError(f"only {n_groups} groups: too few to hold out {frac:.0%} by patient")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(cv.split(np.zeros(len(y)), y, groups))
    mask = np.zeros(len(y), bool)
    mask[held] = True
    return mask


def assign_splits(df: pd.DataFrame, cfg: SplitConfig) -> tuple[pd.DataFrame, str]:
    """Return a copy with a `split` column and a sentence on how it was made.

    A manifest that already has a complete split column is respected (after a leak check)."""
    out = df.copy()
    by, groups = grouping(out)
    if "split" in out and out["split"].notna().all():
        check_no_leak(out, by)
        return out, f"split column from the manifest (checked: no {by} in two splits)"
    y = out["label"].to_numpy()
    split = np.array(["train"] * len(out), dtype=object)
    if cfg.test > 0:
        test = _take_fold(y, groups.to_numpy(), cfg.test, cfg.seed)
        split[test] = "test"
    rest = split == "train"
    if cfg.val > 0:
        val = _take_fold(y[rest], groups.to_numpy()[rest], cfg.val / (1 - cfg.test), cfg.seed + 1)
        split[np.flatnonzero(rest)[val]] = "val"
    out["split"] = split
    check_no_leak(out, by)
    how = f"stratified by label, grouped by {by}, seed {cfg.seed}"
    if by != "patient_id":
        how += f" (no patient ids: grouped by {by} instead, so one patient may appear in two splits)"
    return out, how


def check_no_leak(df: pd.DataFrame, by: str) -> None:
    per_group = df.groupby(df[by].astype(str))["split"].nunique()
    leaked = per_group[per_group > 1]
    if len(leaked):
        raise ManifestError(f"{len(leaked)} {by}(s) appear in more than one split, e.g. {leaked.index[0]!r}")


def split_counts(df: pd.DataFrame) -> dict:
    """Images, malignant images and groups per split (for provenance)."""
    by, groups = grouping(df)
    out = {}
    for name, part in df.groupby("split"):
        out[name] = {"images": int(len(part)), "malignant": int(part["label"].sum()),
                     f"{by}s": int(groups[part.index].nunique())}
    return out
