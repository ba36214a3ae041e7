"""Seeded, stratified train/val/test splits grouped by patient, so no patient appears in two splits."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

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


TEST_FOLD = -1  # the `fold` of a held-out test row in assign_folds' output


def assign_folds(df: pd.DataFrame, k: int, cfg: SplitConfig) -> tuple[pd.DataFrame, str]:
    """Return a copy with `split` (test or train) and `fold` (0..k-1; TEST_FOLD for test rows), and how.

    The test patients are held out exactly as assign_splits holds them out (same fraction, same seed: the same
    patients as a single-split run of the same recipe; a complete split column in the rows is respected). The
    other rows are cut into k folds by StratifiedGroupKFold: grouped like every split (core.splits.grouping),
    stratified by label. cfg.val is not used: each fold is the validation set of one fold run."""
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, not {k}")
    out, how = assign_splits(df, replace(cfg, val=0.0))
    out.loc[out["split"] != "test", "split"] = "train"  # a given split column's val rows join the folds
    by, groups = grouping(out)
    rest = np.flatnonzero((out["split"] != "test").to_numpy())
    y, g = out["label"].to_numpy()[rest], groups.to_numpy()[rest]
    n_groups = len(set(g))
    if n_groups < k:
        raise ManifestError(f"only {n_groups} groups ({by}) outside the test split: too few for {k} folds")
    fold = np.full(len(out), TEST_FOLD, dtype=int)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=cfg.seed + 1)
    for i, (_, held) in enumerate(cv.split(np.zeros(len(rest)), y, g)):
        fold[rest[held]] = i
    out["fold"] = fold
    for i in range(k):
        labels = set(y[fold[rest] == i])
        if labels != {0, 1}:
            missing = "malignant" if 1 not in labels else "benign"
            raise ManifestError(f"fold {i} of {k} has no {missing} photos: use fewer folds (or more data)")
    return out, f"{k} folds stratified by label, grouped by {by}, seed {cfg.seed + 1}; test: {how}"


def fold_split(folds: pd.DataFrame, k: int) -> dict[str, str]:
    """image -> split for fold run k: its fold is 'val', the other folds 'train', the test rows 'test'."""
    f = folds["fold"].to_numpy()
    split = np.where(f == TEST_FOLD, "test", np.where(f == k, "val", "train"))
    return dict(zip(folds["image"], split))


def pair_split(folds: pd.DataFrame, k: int, j: int) -> dict[str, str]:
    """image -> split for the nested cross-validation's pair run (k, j): folds k and j are 'val', the others
    'train', the test rows 'test'."""
    f = folds["fold"].to_numpy()
    split = np.where(f == TEST_FOLD, "test", np.where((f == k) | (f == j), "val", "train"))
    return dict(zip(folds["image"], split))


@dataclass(frozen=True)
class FixedSplit:
    """A split decided before the run (one cross-validation fold): image -> train/val/test, and how it was made."""
    split_of: Mapping[str, str]
    how: str

    def apply(self, df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
        """df with this split as its `split` column (every image must be covered), checked for leaks."""
        split = df["image"].map(self.split_of)
        if split.isna().any():
            missing = df.loc[split.isna(), "image"]
            raise ManifestError(f"{len(missing)} image(s) have no place in the given split (the data changed since "
                                f"the folds were made?), e.g. {missing.iloc[0]}")
        out = df.assign(split=split)
        by, groups = grouping(out)
        check_no_leak(out, groups, by)
        return out, self.how


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
