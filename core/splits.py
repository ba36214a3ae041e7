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


def _present(df: pd.DataFrame, col: str) -> pd.Series:
    if col not in df:
        return pd.Series(False, index=df.index)
    return df[col].notna() & (df[col].astype(str).str.strip() != "")


def grouping(df: pd.DataFrame) -> tuple[str, pd.Series]:
    """Per-row group: the patient where known, else the lesion, else the image; and a name for that choice.

    Decided row by row, so mixing a dataset with patient ids and one without keeps the first grouped by patient."""
    has_patient, has_lesion = _present(df, "patient_id"), _present(df, "lesion_id")
    groups = pd.Series("image:" + df["image"].astype(str), index=df.index)
    if has_lesion.any():
        groups[has_lesion] = "lesion:" + df.loc[has_lesion, "lesion_id"].astype(str)
    if has_patient.any():
        groups[has_patient] = "patient:" + df.loc[has_patient, "patient_id"].astype(str)
    if has_patient.all():
        return "patient_id", groups
    if has_lesion.all() and not has_patient.any():
        return "lesion_id", groups
    if not has_patient.any() and not has_lesion.any():
        return "image", groups
    return "patient_id where known, else lesion_id or image", groups


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
    if "split" in out and out["split"].notna().any():
        if not out["split"].notna().all():
            raise ManifestError(f"the split column covers {int(out['split'].notna().sum())} of {len(out)} images: "
                                "give every image a split, or none (to split by patient here)")
        check_no_leak(out, groups, by)
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
    check_no_leak(out, groups, by)
    how = f"stratified by label, grouped by {by}, seed {cfg.seed}"
    if by != "patient_id":
        how += " (rows without a patient id are grouped by lesion or image: one patient may appear in two splits)"
    return out, how


def check_no_leak(df: pd.DataFrame, groups: pd.Series, by: str = "group") -> None:
    per_group = df.groupby(groups.to_numpy())["split"].nunique()
    leaked = per_group[per_group > 1]
    if len(leaked):
        raise ManifestError(f"{len(leaked)} group(s) ({by}) appear in more than one split, e.g. {leaked.index[0]!r}")


def split_counts(df: pd.DataFrame) -> dict:
    """Images, malignant images and groups per split (for provenance)."""
    by, groups = grouping(df)
    unit = f"{by}s" if by in ("patient_id", "lesion_id", "image") else "groups"
    out = {}
    for name, part in df.groupby("split"):
        out[name] = {"images": int(len(part)), "malignant": int(part["label"].sum()),
                     unit: int(groups[part.index].nunique())}
    return out
