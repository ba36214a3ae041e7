"""Command line: domain overlap of several manifests in raw-pixel and embedding space (`python -m train.pca ...`).

Writes to --out: pixels_pca.csv and embeddings_pca.csv (image, domain, label, pc1, pc2), overlap.csv
(one row per space and pair of domains), pca.html (2x2 plotly figure) and summary.json (written last).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from core import builtin, pca, userdirs
from core.backbones import BACKBONES, WeightsError
from core.bundle import BundleError
from core.dataset import check_images
from core.device import pick_device
from core.embeddings import EmbeddingCache, embed, load_embedder
from core.fileio import atomic_write_json
from core.device import dataloader_workers
from core.images import ImageLoadError
from core.manifest import ManifestError

PIXEL_METHOD = ("each image after its crop box: centre square (no distortion), bilinear antialiased resize to "
                "{s}x{s} RGB, flattened to {n} values in [0, 1], each standardised over all images before PCA")


def add_embedder_arguments(p: argparse.ArgumentParser, default_backbone: str | None) -> None:
    """The model options shared by the PCA and KNN commands."""
    src = p.add_mutually_exclusive_group(required=default_backbone is None)
    src.add_argument("--run", help="a run (or bundle) folder: use its trained backbone's pooled features")
    src.add_argument("--backbone", default=default_backbone, choices=sorted(BACKBONES),
                     help="registry backbone" + (f" (default {default_backbone})" if default_backbone else ""))
    p.add_argument("--weights", default="imagenet", help="with --backbone: imagenet | none | path to a weights file")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for random (--weights none) initialisation and subsampling (default 0)")
    p.add_argument("--input-size", type=int, default=None,
                   help="override the network's input resolution (default: the weights' own)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache", default=None, metavar="DIR",
                       help="embedding cache folder (default: <per-user cache>/embeddings, i.e. $SKINSCREEN_CACHE/"
                            "embeddings or the platform's user cache folder, e.g. ~/.cache/skinscreen/embeddings)")
    cache.add_argument("--no-cache", action="store_true", help="compute every embedding and store none")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 1)")


def embedder_from_args(args):
    run = str(builtin.resolve_model(args.run)) if args.run else None  # 'demo': the built-in model
    return load_embedder(run=run, backbone=None if args.run else args.backbone, weights=args.weights,
                         seed=args.seed, input_size=args.input_size)


def cache_folder(args) -> Path | None:
    """The embedding cache to use: --cache, else the per-user one; None with --no-cache or when the folder cannot
    be written (said on stderr: a cache must not stop an analysis)."""
    if args.no_cache:
        return None
    folder = Path(args.cache) if args.cache else userdirs.cache_dir("embeddings")
    problem = userdirs.writable(folder)
    if problem:
        print(f"warning: embedding cache {folder} is not writable ({problem}); computing without a cache",
              file=sys.stderr)
        return None
    return folder


def embed_rows(args, embedder, df) -> tuple:
    """Embeddings of df plus (seconds, served from cache, computed, cache folder or None)."""
    folder = cache_folder(args)
    cache = EmbeddingCache(folder) if folder else None
    t = time.perf_counter()
    report = {}
    X = embed(embedder.module, df, embedder.preprocessing, cache, identity=embedder.identity,
              device=pick_device(args.device), batch_size=args.batch_size,
              num_workers=dataloader_workers() if args.workers is None else args.workers, report=report)
    # which engine computed the new vectors (PyTorch or ONNX Runtime, core.engine): summary.json's "model" entry
    embedder.description["engine"] = report.get("engine")
    hits = cache.hits if cache else 0
    return X, time.perf_counter() - t, hits, len(df) - hits, None if folder is None else str(folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.pca", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", action="append", required=True,
                   help="manifest CSV (repeat; domain = its domain column, else its file stem)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pixel-size", type=int, default=pca.PIXEL_SIZE, help="side of the pixel thumbnail (default 32)")
    p.add_argument("--max-per-domain", type=int, default=None, help="random subsample per domain (seeded)")
    add_embedder_arguments(p, default_backbone=None)
    return p


def analyse(args) -> dict:
    """Load, featurise, project and score; returns summary.json's content and writes everything else."""
    t_all = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = pca.subsample(pca.load_manifests(args.manifest), args.max_per_domain, args.seed)
    if len(df) < 3:
        raise ManifestError(f"PCA needs at least 3 images, the manifests hold {len(df)}")
    check_images(df)
    t = time.perf_counter()
    spaces = {"pixels": pca.pixel_features(df, args.pixel_size)}
    t_pix = time.perf_counter() - t
    t = time.perf_counter()
    embedder = embedder_from_args(args)
    t_model = time.perf_counter() - t
    spaces["embeddings"], t_emb, hits, computed, cache = embed_rows(args, embedder, df)

    t = time.perf_counter()
    frames, explained, result = {}, {}, {}
    for name, X in spaces.items():
        coords, explained[name] = pca.pca_2d(X, seed=args.seed)
        frames[name] = pca.scatter_frame(df, coords)
        frames[name].to_csv(out / f"{name}_pca.csv", index=False)
        result[name] = {"dim": int(X.shape[1]), "explained_variance_ratio": explained[name],
                        "overlap": pca.overlap(X, coords, df, seed=args.seed)}
    t_overlap = time.perf_counter() - t
    rows = [{"space": s, **r} for s, v in result.items() for r in v["overlap"]]
    pd.DataFrame(rows).to_csv(out / "overlap.csv", index=False)
    pca.figure(frames, explained).write_html(out / "pca.html", include_plotlyjs=True)  # offline-viewable

    counts = df.groupby("domain")["label"].agg(["size", "sum"])
    summary = {
        "manifests": [str(m) for m in args.manifest],
        "n": int(len(df)),
        "n_per_domain": {d: int(r["size"]) for d, r in counts.iterrows()},
        "n_malignant_per_domain": {d: int(r["sum"]) for d, r in counts.iterrows()},
        "max_per_domain": args.max_per_domain, "seed": args.seed,
        "pixel_size": args.pixel_size,
        "pixel_method": PIXEL_METHOD.format(s=args.pixel_size, n=3 * args.pixel_size ** 2),
        "model": embedder.description,
        "overlap_method": pca.OVERLAP_METHOD,
        "spaces": result,
        "timings": {"pixels_s": round(t_pix, 2), "model_load_s": round(t_model, 2),
                    "embeddings_s": round(t_emb, 2), "embeddings_from_cache": int(hits),
                    "embeddings_computed": int(computed), "embedding_cache": cache,
                    "overlap_s": round(t_overlap, 2),
                    "total_s": round(time.perf_counter() - t_all, 2)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def print_summary(summary: dict, out: str) -> None:
    t = summary["timings"]
    print(f"{summary['n']} images: " + ", ".join(f"{d} {n}" for d, n in summary["n_per_domain"].items()))
    print(f"pixels {t['pixels_s']:.1f}s; embeddings {t['embeddings_s']:.1f}s "
          f"({t['embeddings_from_cache']} from cache, {t['embeddings_computed']} computed; "
          f"cache {t['embedding_cache'] or 'off'})")
    print("domain-classifier ROC-AUC (0.5 = indistinguishable, 1 = separable):")
    for space, v in summary["spaces"].items():
        evr = v["explained_variance_ratio"]
        print(f"  {space} (PC1 {evr[0]:.1%}, PC2 {evr[1]:.1%}):")
        for r in v["overlap"]:
            print(f"    {r['domain_a']} vs {r['domain_b']}: auc {_fmt(r['auc'])}, auc_2pc {_fmt(r['auc_2pc'])}, "
                  f"silhouette_2pc {_fmt(r['silhouette_2pc'])}")
    print(f"wrote {out}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = analyse(args)
    except (ManifestError, ImageLoadError, WeightsError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
