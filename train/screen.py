"""Command line: screen a folder or manifest of photos with a run's model, writing one CSV row per image.

    python -m train.screen --run runs/X --images DIR --out predictions.csv
    python -m train.screen --run runs/X --manifest M.csv --out predictions.csv [--batch-size 32] [--device auto]

Each row: image, P(malignant), the verdict at the bundle's threshold, quality warning codes, and an error for
files that could not be read (those are reported on stderr and skipped, never fatal). Every row names the model
run and threshold, and <out>.provenance.json next to the CSV records the model's provenance (training data,
validation metrics, intended use, weights hash): probabilities never travel without it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Dataset

from core import builtin
from core.bundle import BundleError, load_bundle
from core.device import dataloader_workers
from core.images import SUPPORTED_SUFFIXES, ImageLoadError, load_image
from core.inference import Predictor, model_view
from core.manifest import ManifestError, crop_of, file_sha256, read_manifest
from core.quality import quality_warnings

CARRIED = ("label", "patient_id", "lesion_id", "domain", "fitzpatrick", "split")  # manifest columns kept in the CSV


class ScreenDataset(Dataset):
    """Decode (draft), quality-check and crop in the DataLoader workers; errors travel as text, not exceptions."""

    def __init__(self, paths: list[str], crops: list[dict | None], pp, decode_kw: dict):
        self.paths, self.crops, self.pp, self.decode_kw = paths, crops, pp, decode_kw

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = load_image(self.paths[i], crop=self.crops[i], **self.decode_kw)
            quality = ";".join(w.code for w in quality_warnings(img))
            return i, model_view(img, self.pp), quality, ""
        except ImageLoadError as e:
            return i, None, "", str(e)
        except Exception as e:  # noqa: BLE001 - one odd file must not stop a screening run of thousands
            return i, None, "", f"{self.paths[i]}: {type(e).__name__}: {e}"


def collate(items):
    return items  # crops are stacked in the main process (failed items have none)


def list_images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)


def inputs_from_args(args) -> tuple[pd.DataFrame, dict]:
    if args.images:
        folder = Path(args.images)
        if not folder.is_dir():
            raise ManifestError(f"{folder}: image folder not found")
        paths = list_images(folder)
        if not paths:
            raise ManifestError(f"{folder}: no images ({', '.join(SUPPORTED_SUFFIXES)}) found")
        return pd.DataFrame({"image": paths}), {"images": str(folder.resolve()), "n": len(paths)}
    df = read_manifest(args.manifest)
    if df.empty:
        raise ManifestError(f"{args.manifest}: manifest has no rows")
    return df.reset_index(drop=True), {"manifest": str(Path(args.manifest).resolve()), "n": len(df),
                                       "sha256": file_sha256(args.manifest)}


def screen(predictor: Predictor, df: pd.DataFrame, *, batch_size: int, workers: int, progress=True) -> pd.DataFrame:
    crops = [crop_of(r) for _, r in df.iterrows()] if any(c.startswith("crop_") for c in df.columns) \
        else [None] * len(df)
    ds = ScreenDataset(df["image"].tolist(), crops, predictor.pp, predictor.decode_kw)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    probs = np.full(len(df), np.nan)
    quality = [""] * len(df)
    errors = [""] * len(df)
    from tqdm import tqdm
    bar = tqdm(total=len(df), unit="img", desc="screening", file=sys.stderr, disable=None if progress else True)
    for items in loader:
        ok = [it for it in items if it[1] is not None]
        for i, _, _, err in items:
            if err:
                errors[i] = err
                tqdm.write(f"skipped: {err}", file=sys.stderr)
        if ok:
            x = predictor.to_input(np.stack([it[1] for it in ok]))
            p = predictor.probs(x)
            for (i, _, q, _), pi in zip(ok, p):
                probs[i], quality[i] = pi, q
        bar.update(len(items))
    bar.close()
    thr = predictor.bundle.threshold
    out = pd.DataFrame({"image": df["image"]})
    out["prob_malignant"] = np.round(probs, 6)
    out["verdict"] = np.where(np.isnan(probs), "", np.where(probs >= thr, "malignant", "benign"))
    out["threshold"] = thr
    out["quality"] = quality
    out["error"] = errors
    out["model_run"] = predictor.summary.get("run")
    for col in CARRIED:
        if col in df.columns:
            out[col] = df[col].values
    return add_context(out, df, predictor)


def add_context(out: pd.DataFrame, df: pd.DataFrame, predictor: Predictor) -> pd.DataFrame:
    """With a context stage and context columns in the manifest: the fused result per row, and what it used."""
    from core.context import context_frame, fuse
    stage = predictor.context
    if stage is None or not any(f in df.columns for f in stage.fields):
        return out
    answers = context_frame(df, stage.fields).to_dict("records")
    thr = predictor.bundle.threshold
    rows = [fuse(stage, p, thr, a) if not np.isnan(p) else None for p, a in zip(out["prob_malignant"], answers)]
    out["fused_prob"] = [round(r.prob, 6) if r else np.nan for r in rows]
    out["fused_verdict"] = ["" if r is None else "malignant" if r.malignant else "benign" for r in rows]
    out["fused_threshold"] = [r.threshold if r else np.nan for r in rows]
    out["inputs"] = [r.inputs if r else "" for r in rows]
    return out


def provenance(predictor: Predictor, run: str, inputs: dict, table: pd.DataFrame, seconds: float) -> dict:
    bundle = predictor.bundle
    weights = Path(bundle.path) / "model.safetensors" if bundle.path else None
    failed = int((table["error"] != "").sum())
    return {"what": "P(malignant) per image from python -m train.screen; research use only",
            "model": predictor.summary, "run": str(run), "bundle": str(bundle.path),
            "weights_sha256": file_sha256(weights) if weights and weights.is_file() else None,
            "weights_sha256_short": bundle.meta.short_hash,
            "preprocessing": bundle.meta.preprocessing, "threshold": bundle.meta.threshold.to_dict(),
            "context_stage": bundle.meta.context.to_dict() if bundle.meta.context else None,
            "inputs": inputs, "n_images": int(len(table)), "n_predicted": int(len(table) - failed),
            "n_failed": failed, "n_malignant_verdicts": int((table["verdict"] == "malignant").sum()),
            "precision": predictor.precision, "device": str(predictor.device),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 1)}


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.stem + ".provenance.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.screen", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run folder, bundle folder, or 'demo' for the built-in demo model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of photos (searched recursively)")
    src.add_argument("--manifest", help="manifest CSV (image paths and optional crop boxes)")
    p.add_argument("--out", required=True, help="predictions CSV to write")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: cores - 1, max 8)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.run = str(builtin.resolve_model(args.run))
    if args.batch_size < 1:
        print("error: --batch-size must be positive", file=sys.stderr)
        return 2
    try:
        bundle = load_bundle(args.run)
        df, inputs = inputs_from_args(args)
    except (BundleError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    predictor = Predictor(bundle, device=args.device, fast=True)
    workers = args.workers if args.workers is not None else dataloader_workers()
    workers = min(workers, -(-len(df) // args.batch_size))  # no idle processes for a handful of photos
    table = screen(predictor, df, batch_size=args.batch_size, workers=workers)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    meta = provenance(predictor, args.run, inputs, table, time.time() - t0)
    sidecar_path(out).write_text(json.dumps(meta, indent=1, default=str))
    print(f"{meta['n_predicted']} of {meta['n_images']} images screened ({meta['n_malignant_verdicts']} above the "
          f"threshold {bundle.threshold:.3f}); {meta['n_failed']} unreadable")
    print(f"wrote {out} and {sidecar_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
