"""Patient-level splits: stratified, seeded, and never leaking a patient across train/val/test."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.manifest import ManifestError
from core.splits import SplitConfig, assign_splits, check_no_leak, split_counts


def _df(n_patients=120, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.random() < 0.35)
        for k in range(rng.integers(1, 4)):  # 1-3 images per patient
            rows.append({"image": f"/x/p{p}_{k}.png", "label": label, "patient_id": f"P{p}",
                         "lesion_id": f"L{p}_{k % 2}"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_no_patient_in_two_splits(seed):
    out, how = assign_splits(_df(seed=seed), SplitConfig(0.15, 0.15, seed))
    assert out.groupby("patient_id")["split"].nunique().max() == 1
    assert set(out["split"]) == {"train", "val", "test"}
    assert "patient_id" in how


def test_fractions_and_stratification_are_roughly_kept():
    df = _df(400)
    out, _ = assign_splits(df, SplitConfig(0.15, 0.15, 0))
    frac = out["split"].value_counts(normalize=True)
    assert abs(frac["test"] - 0.15) < 0.05 and abs(frac["val"] - 0.15) < 0.05
    rate = df["label"].mean()
    for name, part in out.groupby("split"):
        assert abs(part["label"].mean() - rate) < 0.08, name


def test_same_seed_same_split_different_seed_different_split():
    df = _df()
    a, _ = assign_splits(df, SplitConfig(seed=3))
    b, _ = assign_splits(df, SplitConfig(seed=3))
    c, _ = assign_splits(df, SplitConfig(seed=4))
    assert (a["split"] == b["split"]).all()
    assert (a["split"] != c["split"]).any()


def test_falls_back_to_lesion_then_image_and_says_so():
    df = _df().drop(columns=["patient_id"])
    out, how = assign_splits(df, SplitConfig())
    assert "grouped by lesion_id" in how and "one patient may appear" in how
    assert out.groupby("lesion_id")["split"].nunique().max() == 1
    _, how = assign_splits(df.drop(columns=["lesion_id"]), SplitConfig())
    assert "grouped by image" in how


def test_rows_without_patient_ids_do_not_switch_off_patient_grouping_for_the_rest():
    # e.g. a dataset with patient ids mixed with one without (ISIC subsets)
    df = _df()
    others = pd.DataFrame({"image": [f"/isic/{i}.jpg" for i in range(60)], "label": [i % 3 == 0 for i in range(60)]})
    mixed = pd.concat([df, others.astype({"label": int})], ignore_index=True)
    out, how = assign_splits(mixed, SplitConfig())
    assert "patient_id where known" in how
    with_ids = out[out["patient_id"].notna()]
    assert with_ids.groupby("patient_id")["split"].nunique().max() == 1


def test_a_partial_split_column_is_refused():
    df = _df()
    df["split"] = None
    df.loc[:5, "split"] = "train"
    with pytest.raises(ManifestError, match="covers 6 of"):
        assign_splits(df, SplitConfig())


def test_existing_split_column_is_kept_but_checked_for_leaks():
    df = _df()
    df["split"] = "train"
    df.loc[df["patient_id"] == "P1", "split"] = "test"
    out, how = assign_splits(df, SplitConfig())
    assert (out["split"] == df["split"]).all() and "from the manifest" in how
    leaky = df.copy()
    leaky.loc[leaky.index[leaky["patient_id"] == "P0"][:1], "split"] = "val"
    if (leaky["patient_id"] == "P0").sum() > 1:
        with pytest.raises(ManifestError, match="more than one split"):
            assign_splits(leaky, SplitConfig())


def test_check_no_leak_names_the_patient():
    df = pd.DataFrame({"patient_id": ["A", "A", "B"], "split": ["train", "test", "val"]})
    with pytest.raises(ManifestError, match="'A'"):
        check_no_leak(df, df["patient_id"], "patient_id")


def test_too_few_patients_is_a_clear_error():
    df = _df(3)
    with pytest.raises(ManifestError, match="too few to hold out"):
        assign_splits(df, SplitConfig(0.15, 0.15))


def test_split_counts_report_images_malignant_and_patients():
    out, _ = assign_splits(_df(), SplitConfig())
    counts = split_counts(out)
    assert sum(c["images"] for c in counts.values()) == len(out)
    assert sum(c["patient_ids"] for c in counts.values()) == out["patient_id"].nunique()


# ------------------------------------------------------------------ cross-validation folds
@pytest.mark.parametrize("seed", [0, 3])
def test_folds_never_share_a_patient_with_each_other_or_with_test(seed):
    from core.splits import TEST_FOLD, assign_folds
    df = _df(150, seed=seed)
    out, how = assign_folds(df, 5, SplitConfig(0.15, 0.15, seed))
    assert set(out["fold"]) == {TEST_FOLD, 0, 1, 2, 3, 4}
    assert out.groupby("patient_id")["fold"].nunique().max() == 1  # one patient, one fold (or test)
    assert (out["split"] == "test").eq(out["fold"] == TEST_FOLD).all()
    assert "5 folds" in how and "patient_id" in how
    rate = out.loc[out["fold"] != TEST_FOLD, "label"].mean()
    for k, part in out[out["fold"] != TEST_FOLD].groupby("fold"):
        assert abs(part["label"].mean() - rate) < 0.12, k  # stratified by label


def test_fold_test_patients_are_those_of_a_single_split_run_with_the_same_settings():
    from core.splits import TEST_FOLD, assign_folds
    df = _df(150)
    single, _ = assign_splits(df, SplitConfig(0.15, 0.15, 4))
    folds, _ = assign_folds(df, 5, SplitConfig(0.3, 0.15, 4))  # val does not matter with folds
    assert (single["split"] == "test").tolist() == (folds["fold"] == TEST_FOLD).tolist()


def test_fold_split_gives_each_fold_run_its_fold_as_validation():
    from core.splits import FixedSplit, assign_folds, fold_split
    out, _ = assign_folds(_df(120), 3, SplitConfig(0.15, 0.0, 0))  # test 0: every row is in a fold
    assert (out["fold"] >= 0).all()
    vals = []
    for k in range(3):
        split = fold_split(out, k)
        fixed, how = FixedSplit(split, "fold").apply(out.drop(columns=["split"]))
        assert how == "fold" and set(fixed["split"]) == {"train", "val"}
        vals += fixed.loc[fixed["split"] == "val", "image"].tolist()
    assert sorted(vals) == sorted(out["image"])  # each photo validates exactly one fold run


def test_a_fixed_split_missing_an_image_or_leaking_a_patient_is_refused():
    from core.splits import FixedSplit
    df = _df(30)
    with pytest.raises(ManifestError, match="no place in the given split"):
        FixedSplit({df["image"].iloc[0]: "train"}, "x").apply(df)
    leaky = {img: ("val" if i % 2 else "train") for i, img in enumerate(df["image"])}
    with pytest.raises(ManifestError, match="more than one split"):
        FixedSplit(leaky, "x").apply(df[df["patient_id"].duplicated(keep=False)])


def test_too_few_patients_or_a_one_class_fold_is_a_clear_error():
    from core.splits import assign_folds
    with pytest.raises(ManifestError, match="too few for 5 folds"):
        assign_folds(_df(4), 5, SplitConfig(0.15, 0.0, 0))
    df = _df(60)
    df["label"] = 0
    df.loc[df.index[:2], "label"] = 1  # two malignant photos cannot reach 3 folds
    with pytest.raises(ManifestError, match="has no malignant photos: use fewer folds"):
        assign_folds(df, 3, SplitConfig(0.15, 0.0, 0))
