"""How dimming a photo moves a model's verdicts: its validation photos, darkened step by step, scored as the app scores.

    python benchmarks/lighting.py --json benchmarks/results/lighting_builtin_demo_<cpu>.json    # the built-in demo
    python benchmarks/lighting.py --run runs/NAME --factors 0.7 0.5 0.35

Each validation photo of the model's run (the built-in demo: assets/demo/splits.csv, photos in ../shared) is
dimmed with PIL's ImageEnhance.Brightness by each factor and predicted with the app's fast path. Per factor: the
median brightness (mean luma, as core.quality measures it), the share refused (quality or gate), the share whose
quality check warns 'too dark', and among photos still assessed, the share whose verdict changed and in which
direction. Nothing is fitted or chosen: this measures how far a lighting change alone moves the answers.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance

from common import finish, machine_info, set_threads
from core import builtin
from core.bundle import load_bundle
from core.inference import Predictor
from core.trust import NOT_ASSESSED

FACTORS = (0.7, 0.5, 0.35, 0.25, 0.18)


def validation_photos(run: str) -> list[Path]:
    """The model's validation photos on this machine (the demo names them; a run's split file holds their paths)."""
    if run == "demo":
        splits = pd.read_csv(builtin.DEMO_DIR / "splits.csv")
        return [builtin.DEMO_PHOTOS / n for n in splits.loc[splits["split"] == "val", "image"]]
    from core.evaluation import split_files
    from core.manifest import read_manifest
    df = read_manifest(split_files(Path(run))[-1])
    return [Path(p) for p in df.loc[df["split"] == "val", "image"]]


def measure(predictor: Predictor, photos: list[Path], factors) -> pd.DataFrame:
    rows = []
    for path in photos:
        img = Image.open(path).convert("RGB")
        base = predictor.predict_image(img, cam_method=None)
        for f in factors:
            dim = ImageEnhance.Brightness(img).enhance(f)
            pred = predictor.predict_image(dim, cam_method=None)
            rows.append({"photo": path.name, "factor": f, "luma": float(np.asarray(dim.convert("L"), float).mean()),
                         "before": base.verdict, "after": pred.verdict, "prob_change": pred.prob - base.prob,
                         "too_dark": any(w.code == "too_dark" for w in pred.quality)})
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> list[dict]:
    out = []
    for f, g in df.groupby("factor", sort=False):
        kept = g[(g["after"] != NOT_ASSESSED) & (g["before"] != NOT_ASSESSED)]
        out.append({"factor": f, "n": len(g), "median_luma": round(float(g["luma"].median()), 1),
                    "refused": round(float((g["after"] == NOT_ASSESSED).mean()), 3),
                    "warned_too_dark": round(float(g["too_dark"].mean()), 3),
                    "assessed_both": len(kept),
                    "verdict_changed": round(float((kept["after"] != kept["before"]).mean()), 3) if len(kept) else None,
                    "flagged_to_not": int(((kept["before"] == "flagged") & (kept["after"] == "not flagged")).sum()),
                    "not_to_flagged": int(((kept["before"] == "not flagged") & (kept["after"] == "flagged")).sum()),
                    "median_raw_score_change": round(float(g["prob_change"].median()), 4)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="demo", help="a run folder, or 'demo' for the built-in demo (default)")
    ap.add_argument("--factors", nargs="+", type=float, default=list(FACTORS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    photos = validation_photos(args.run)
    missing = [p for p in photos if not p.is_file()]
    if not photos or missing:
        raise SystemExit(f"{len(missing)} of {len(photos)} validation photos not found (first: "
                         f"{missing[0] if missing else 'none listed'}); the demo's are in {builtin.DEMO_PHOTOS}")
    threads = set_threads(args.threads)
    bundle = load_bundle(builtin.DEMO_BUNDLE if args.run == "demo" else args.run)
    predictor = Predictor(bundle, device="cpu", fast=True)
    rows = summary(measure(predictor, photos, args.factors))
    print(f"{'factor':>6} {'luma':>5} {'refused':>8} {'too dark':>9} {'changed':>8} {'flag->not':>9} {'not->flag':>9}")
    for r in rows:
        changed = "n/a" if r["verdict_changed"] is None else f"{r['verdict_changed']:.0%}"
        print(f"{r['factor']:>6} {r['median_luma']:>5.0f} {r['refused']:>8.0%} {r['warned_too_dark']:>9.0%} "
              f"{changed:>8} {r['flagged_to_not']:>9} {r['not_to_flagged']:>9}")
    return finish({"machine": machine_info(), "threads": threads, "run": args.run, "n_photos": len(photos),
                   "precision": predictor.precision, "results": rows}, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
