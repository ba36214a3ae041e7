"""Evaluate a model on manifest rows: probabilities, metrics with confidence intervals, ROC, subgroups."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from core import builtin, metrics, runfolder
from core.dataset import ManifestDataset
from core.device import autocast, dataloader_workers
from core.sources import parse_fitzpatrick
from core.transforms import eval_transform

SUBGROUP_COLUMNS = ("fitzpatrick", "domain")


@torch.no_grad()
def predict_probs(model, df: pd.DataFrame, *, device="cpu", batch_size=32, num_workers=None,
                  dtype=None, progress=None) -> np.ndarray:
    """P(malignant) for every row of df, in row order."""
    pp = model.spec.preprocessing
    ds = ManifestDataset(df, eval_transform(pp), short_side=pp.resize_to, interpolation=pp.interpolation)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False,
                        num_workers=dataloader_workers() if num_workers is None else num_workers)
    device = torch.device(device)
    model.eval()
    out = np.empty(len(ds), dtype=np.float64)
    for x, _, idx in (progress(loader) if progress else loader):
        with autocast(device, dtype):
            logits = model(x.to(device, memory_format=torch.channels_last))
        out[idx.numpy()] = torch.sigmoid(logits.float()).squeeze(1).cpu().numpy()
    return out


def groups_of(df: pd.DataFrame):
    """Cluster-bootstrap groups: the same units the split was grouped by (patient, else lesion), or None."""
    from core.splits import grouping
    by, groups = grouping(df)
    return None if by == "image" else groups.tolist()


UNITS = {"patient_id": "patients", "lesion_id": "lesions", "image": "photos"}


def resample_unit(df: pd.DataFrame) -> str:
    """What groups_of resamples whole, in words: patients, lesions, photos, or groups (a mix)."""
    from core.splits import grouping
    return UNITS.get(grouping(df)[0], "groups")


def build_report(df: pd.DataFrame, probs: np.ndarray, threshold: float, *, n_boot=1000, seed=0,
                 model_meta=None, split: str | None = None) -> dict:
    """The evaluation report: metrics with 95% CIs, confusion matrix, ROC points, per-image rows, subgroups."""
    y = df["label"].to_numpy().astype(int)
    groups = groups_of(df)
    report = metrics.metric_report(y, probs, threshold, groups=groups, n_boot=n_boot, seed=seed)
    report["roc"] = metrics.roc_points(y, probs)
    report["split"] = split
    report["subgroups"] = {}
    for col in SUBGROUP_COLUMNS:
        if col in df and df[col].notna().any():
            # a Fitzpatrick column with blanks reads back from CSV as floats: type 2 must be "2", not "2.0"
            values = [parse_fitzpatrick(v) for v in df[col]] if col == "fitzpatrick" else df[col].tolist()
            report["subgroups"][col] = metrics.subgroup_reports(
                y, probs, threshold, values, groups=groups, n_boot=min(n_boot, 500), seed=seed)
    keep = [c for c in ("image", "label", "patient_id", "lesion_id", "domain", "fitzpatrick") if c in df]
    # object dtype first: in a float column (a partly missing Fitzpatrick type) None would turn back into NaN,
    # which json writes as a bare NaN token that strict JSON readers (browsers, R's jsonlite) refuse
    rows = df[keep].astype(object).where(df[keep].notna(), None)
    rows["prob"] = probs
    rows["pred"] = (probs >= threshold).astype(int)
    report["predictions"] = rows.to_dict(orient="records")
    if model_meta is not None:
        report["model"] = model_meta.summary()  # a core.bundle.BundleMeta
    return report


def split_files(run_folder) -> list:
    """The split files of the run a model comes from: in the run folder, or beside a bundle folder given instead;
    [] when there are none (a bundle moved away from its run)."""
    from pathlib import Path
    run = Path(run_folder)
    if not (run / runfolder.SPLITS).is_dir() and (run.parent / runfolder.SPLITS).is_dir():
        run = run.parent  # a bundle folder: its run is the folder around it
    return sorted((run / runfolder.SPLITS).glob("*.csv"))


def seen_splits(run_folder, images) -> list[str]:
    """Per image: 'train' or 'val' when this run trained or validated on it (any stage, from its own split files;
    the built-in demo's by file name), else ''. A result on such a photo is no estimate for a new patient. Without
    split files (see split_files) nothing is known, and every entry is 'unknown'."""
    from pathlib import Path

    from core.manifest import read_manifest
    if builtin.is_builtin(run_folder):  # the shipped demo has no run folder: its split list names files only
        names = builtin.demo_split_names()
        return [names.get(Path(str(i)).name, "") for i in images]
    files = split_files(run_folder)
    if not files:
        return ["unknown"] * len(list(images))
    used: dict[str, str] = {}
    for path in files:
        split = read_manifest(path)
        for image, part in zip(split["image"], split["split"]):
            if part in ("train", "val") and used.get(image) != "train":
                used[image] = part
    return [used.get(str(i)) or used.get(str(Path(str(i)).resolve()), "") for i in images]


def seen_by_model(run_folder, df: pd.DataFrame) -> dict[str, int]:
    """How many of df's images this run trained or validated on. Metrics on such images are optimistic; the
    caller says so in the report."""
    hits = seen_splits(run_folder, df["image"])
    return {"train": hits.count("train"), "val": hits.count("val")} | (
        {"unknown": hits.count("unknown")} if "unknown" in hits else {})


def scored_rows(source) -> pd.DataFrame:
    """The (image, label, patient_id, prob) rows a comparison reads: a cross-validated run folder's out-of-fold
    predictions, or an evaluation report's per-photo rows (a run's test_report.json, a train.evaluate report)."""
    from pathlib import Path

    from core.reports import load_report
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (give a cross-validated run folder or a report JSON)")
    if path.is_dir():
        if not (path / runfolder.OOF).is_file():
            raise FileNotFoundError(f"{path} has no {runfolder.OOF} (not a cross-validated run); give a report "
                                    "JSON instead, e.g. its test_report.json")
        return runfolder.read_oof(path)
    return prediction_rows(load_report(path), str(path))


def prediction_rows(report: dict, where: str = "the report") -> pd.DataFrame:
    """An evaluation report's per-photo rows (image, label, prob, ...); a ValueError when it has none."""
    rows = pd.DataFrame(report.get("predictions") or [])
    missing = [c for c in ("image", "label", "prob") if c not in rows]
    if missing or rows.empty:
        raise ValueError(f"{where}: no per-photo predictions (missing {', '.join(missing) or 'rows'})")
    return rows


def compare_scores(a: pd.DataFrame, b: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Two models' scores on the same photos, matched by image: their ROC-AUC and PR-AUC and b minus a, with a
    paired patient-bootstrap interval. Refuses photo sets or labels that differ (a comparison on other photos
    would measure the photos, not the models)."""
    for name, rows in (("first", a), ("second", b)):
        twice = rows["image"][rows["image"].duplicated()]
        if len(twice):
            raise ValueError(f"the {name} score set lists {len(twice)} photos more than once, e.g. {twice.iloc[0]}; "
                             "each photo must be scored once")
    a, b, matched_by = _matched(a, b)
    both = a.merge(b[["image", "label", "prob"]], on="image", suffixes=("_a", "_b"))
    differ = both["label_a"].astype(int) != both["label_b"].astype(int)
    if differ.any():
        raise ValueError(f"{int(differ.sum())} photos have different labels in the two score sets, e.g. "
                         f"{both.loc[differ, 'image'].iloc[0]}")
    return metrics.paired_auc_difference(both["label_a"].astype(int), both["prob_a"], both["prob_b"],
                                         groups=groups_of(both), n_boot=n_boot, seed=seed) | {"matched_by": matched_by}


def _matched(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The two score sets keyed alike: by image path, or by file name where one side keeps file names only (the
    built-in demo's shipped reports) and every name is unique on both sides; else a ValueError naming the
    photos only one side has."""
    from pathlib import Path
    if set(a["image"]) == set(b["image"]):
        return a, b, "image path"
    names = [rows.assign(image=rows["image"].map(lambda p: Path(str(p)).name)) for rows in (a, b)]
    if all(not n["image"].duplicated().any() for n in names) and set(names[0]["image"]) == set(names[1]["image"]):
        return names[0], names[1], "file name (one side names photos without their folders)"
    only_a, only_b = set(a["image"]) - set(b["image"]), set(b["image"]) - set(a["image"])
    example = sorted(only_a or only_b)[:3]
    raise ValueError(f"the two score sets are not the same photos ({len(a)} and {len(b)} rows; {len(only_a)} "
                     f"only in the first, {len(only_b)} only in the second{', e.g. ' if example else ''}"
                     f"{', '.join(example)}); compare runs scored on the same photos")
