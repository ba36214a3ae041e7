"""Command line: the paper's KNN baseline on frozen backbone features (`python -m train.knn --manifest M.csv ...`).

Train rows are the neighbours, k is chosen on the val rows only (ROC-AUC of the malignant-neighbour
fraction; ties: smaller k), and val and test are reported like the neural models (majority vote,
threshold 0.5). A manifest without a split column is split by patient (seeded) and the split is saved.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core import knn, metrics
from core.backbones import WeightsError
from core.bundle import BundleError, BundleMeta, Provenance, Threshold
from core.dataset import check_images
from core.evaluation import build_report
from core.fileio import atomic_write_json, report_data
from core.images import ImageLoadError
from core.manifest import ManifestError, read_manifest, write_manifest
from core.splits import SplitConfig, assign_splits, split_counts
from train.pca import add_embedder_arguments, embed_rows, embedder_from_args


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k wants comma-separated integers, not {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError("--k values must be >= 1")
    return ks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.knn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="manifest CSV with a split column (e.g. a run's "
                                                     "splits/<stage>.csv); without one it is split by patient")
    p.add_argument("--out", required=True, help="output folder (val_report.json, test_report.json)")
    p.add_argument("--k", type=_ks, default=knn.K_GRID, help="candidate k, comma-separated (default 1,3,...,25)")
    p.add_argument("--standardize", action="store_true",
                   help="standardise features with train statistics (default: raw L2, as in the paper)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--val", type=float, default=0.15, help="val fraction when the manifest has no split column")
    p.add_argument("--test", type=float, default=0.15, help="test fraction when the manifest has no split column")
    p.add_argument("--name", default=None, help="row label in the printed table (default KNN k=<k> <backbone>)")
    add_embedder_arguments(p, default_backbone="resnet18")
    return p


def load_splits(args, out: Path) -> tuple:
    """The manifest with a complete split column, and how the split was made."""
    df = read_manifest(args.manifest)
    if "split" in df and df["split"].isna().any():
        raise ManifestError(f"{args.manifest}: {int(df['split'].isna().sum())} rows have no split")
    df, how = assign_splits(df, SplitConfig(val=args.val, test=args.test, seed=args.seed))
    if "from the manifest" not in how:
        write_manifest(df, out / "split_manifest.csv")
        how += f"; saved to {out / 'split_manifest.csv'}"
    for s in ("train", "val", "test"):
        if not (df["split"] == s).any():
            raise ManifestError(f"{args.manifest}: no {s} rows")
    if df.loc[df["split"] == "train", "label"].nunique() < 2:
        raise ManifestError(f"{args.manifest}: the train split needs both benign and malignant images")
    return df, how


def _meta(args, embedder, df, k: int, val_metrics=None) -> BundleMeta:
    """A bundle-like description so build_report's model summary reads the same as for neural models."""
    backbone = embedder.description["backbone"]
    return BundleMeta(backbone={"name": backbone},
                      threshold=Threshold(value=knn.THRESHOLD, rule="majority vote (malignant fraction >= 0.5)"),
                      provenance=Provenance(run_name=f"knn-k{k}-{backbone}",
                                            weights=embedder.description.get("weights", args.run),
                                            data=[str(args.manifest)], split_counts=split_counts(df),
                                            validation_metrics=val_metrics))


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df, how = load_splits(args, out)
    check_images(df)
    embedder = embedder_from_args(args)
    X, t_emb, hits, computed, cache = embed_rows(args, embedder, df)
    part = {s: (df["split"] == s).to_numpy() for s in ("train", "val", "test")}
    y = df["label"].to_numpy().astype(int)
    model = knn.KNN(X[part["train"]], y[part["train"]], standardize=args.standardize)
    # Only train and val rows reach choose_k: test labels cannot influence k.
    k, curve = knn.choose_k(model, X[part["val"]], y[part["val"]], args.k)
    info = {"k": k, "k_grid": sorted(args.k), "validation_curve": curve, "metric": "euclidean (L2)",
            "standardize": args.standardize, "chosen_on": "validation ROC-AUC; ties -> smaller k",
            "n_train": int(part["train"].sum()), "split": how, "embedder": embedder.description,
            "timings": {"embeddings_s": round(t_emb, 2), "embeddings_from_cache": hits,
                        "embeddings_computed": computed, "embedding_cache": cache}}
    reports, val_metrics = {}, None
    for split in ("val", "test"):
        rows = df[part[split]].reset_index(drop=True)
        probs = model.malignant_fraction(X[part[split]], k)
        rep = build_report(rows, probs, knn.THRESHOLD, n_boot=args.n_boot, seed=args.seed,
                           model_meta=_meta(args, embedder, df, k, val_metrics), split=split)
        rep.update(knn=info, manifest=str(args.manifest))
        atomic_write_json(out / f"{split}_report.json", report_data(rep), indent=1)
        val_metrics = val_metrics or rep["metrics"]
        reports[split] = rep
    return reports


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        reports = run(args)
    except (ManifestError, ImageLoadError, WeightsError, BundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = reports["val"]["knn"]
    name = args.name or f"KNN k={info['k']} {info['embedder']['backbone']}"
    print(metrics.format_table([(f"{name} ({s})", reports[s]["metrics"]) for s in ("val", "test")]))
    for s in ("val", "test"):
        for note in reports[s].get("notes", []):
            print(f"note ({s}): {note}")
    print(f"k chosen on validation: {info['k']} (ROC-AUC by k: " +
          ", ".join(f"{c['k']}: {c['roc_auc']:.3f}" for c in info["validation_curve"] if c["roc_auc"] is not None)
          + ")")
    print(f"wrote {Path(args.out) / 'val_report.json'} and {Path(args.out) / 'test_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
