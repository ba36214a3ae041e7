"""Command line: evaluate a run's model on a manifest (`python -m train.evaluate --run runs/X --manifest M.csv`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core import metrics
from core import builtin
from core.bundle import BundleError, load_bundle
from core.dataset import check_images
from core.device import pick_device
from core.evaluation import build_report, seen_by_model
from core.fileio import UnwritableError, atomic_write_json, check_writable, report_data
from core.images import ImageLoadError
from core.manifest import ManifestError, read_manifest
from core.scores import sigmoid
from core.trust import attach, features_and_logits, quality_of, summary_lines, trust_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__)
    p.add_argument("--run", required=True, help="run folder, bundle folder, or 'demo' for the built-in demo model")
    p.add_argument("--manifest", required=True, help="manifest CSV to evaluate on")
    p.add_argument("--split", default=None, help="test|val|train|all (default: test when the manifest has "
                                                  "a split column, else all)")
    p.add_argument("--out", help="report.json to write (default <run>/report_<manifest>_<split>.json; for the "
                                 "built-in demo, that name in the current folder)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--device", default="auto")
    p.add_argument("--name", help="row label in the printed table")
    return p


def select_rows(df, split):
    if split in (None, "all") or "split" not in df:
        if split not in (None, "all"):
            raise ManifestError(f"--split {split} asked for, but the manifest has no split column")
        return df.reset_index(drop=True), "all"
    chosen = df[df["split"] == split]
    if chosen.empty:
        raise ManifestError(f"the manifest has no rows with split == {split!r}")
    return chosen.reset_index(drop=True), split


def check_once_each(df) -> None:
    """Each photo once: a photo counted twice narrows every interval, and one listed with both labels is both a
    hit and a miss (train.compare refuses such a report)."""
    twice = df[df["image"].duplicated(keep=False)]
    if len(twice):
        listed = [f"{image} ({len(rows)} times, labels {', '.join(map(str, sorted(set(rows['label']))))})"
                  for image, rows in twice.groupby("image", sort=False)]
        raise ManifestError(f"{len(listed)} photo(s) listed more than once; list each once:\n  " + "\n  ".join(listed))


def add_context(report: dict, df, probs, bundle, n_boot: int) -> str:
    """With a context stage and context columns in the manifest: image-only, context-only and fused side by side."""
    from core.context import context_of
    from core.context_report import context_report, format_context_table
    stage = context_of(bundle.meta)
    if stage is None or not any(f in df.columns for f in stage.fields):
        return ""
    report["context"] = context_report(df, probs, bundle.threshold, stage, n_boot=n_boot)
    for row in report["context"]["unusable_answers"]:
        report.setdefault("notes", []).append(f"context answers of {row['image']}: {'; '.join(row['problems'])}")
    return format_context_table(report["context"], "")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.run = str(builtin.resolve_model(args.run))
    try:
        bundle = load_bundle(args.run, device=pick_device(args.device))
        df = read_manifest(args.manifest)
        split = args.split or ("test" if "split" in df else "all")
        df, split = select_rows(df, split)
        check_once_each(df)
        default_dir = Path(".") if builtin.is_builtin(args.run) else Path(args.run)  # never write into assets/
        out = check_writable(args.out or default_dir / f"report_{Path(args.manifest).stem}_{split}.json",
                             [args.manifest, *df["image"]])
        check_images(df)  # every missing, damaged or unboxable image named at once, before any scoring
        device = pick_device(args.device)
        feats, logits = features_and_logits(bundle.model, df, device=device)  # one pass: score and gate features
    # ImageLoadError: a photo damaged between check_images decoding it and scoring
    except (BundleError, ManifestError, UnwritableError, ImageLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    probs = sigmoid(logits)
    report = build_report(df, probs, bundle.threshold, n_boot=args.n_boot, model_meta=bundle.meta, split=split)
    attach(report, trust_report(df, logits, feats, bundle, quality_lists=quality_of(df, bundle.spec.preprocessing),
                                n_boot=args.n_boot))
    report["manifest"] = str(args.manifest)
    seen = seen_by_model(args.run, df)
    report["seen_by_model"] = seen
    if seen.get("unknown"):
        report.setdefault("notes", []).append("no split files beside this model (a bundle moved away from its run): "
                                              "whether it trained on these photos is unknown")
    if seen["train"] or seen["val"]:
        warning = (f"{seen['train']} of these {len(df)} images were in this model's training split and "
                   f"{seen['val']} in its validation split: these metrics are optimistic, not an estimate "
                   f"for new patients")
        report.setdefault("notes", []).append(warning)
        print(f"warning: {warning}", file=sys.stderr)
    if bundle.meta.ensemble is not None:
        from core.ensemble import members_report
        report["ensemble"] = members_report(df, feats, bundle, n_boot=args.n_boot)
    context_table = add_context(report, df, probs, bundle, args.n_boot)
    atomic_write_json(out, report_data(report), indent=1)
    name = args.name or f"{bundle.meta.provenance.run_name} ({split})"
    rows = [(name, report["metrics"])]
    if "accepted_metrics" in report["trust"]:
        rows.append((f"{name}, assessed only", report["trust"]["accepted_metrics"]["metrics"]))
    print(metrics.format_table(rows))
    for line in summary_lines(report["trust"]):
        print(line)
    if "ensemble" in report:
        e = report["ensemble"]
        print(metrics.format_table([(f"member {r['member']}" + (f" (fold {r['fold']})" if r.get("fold") is not None
                                     else ""), r["metrics"]) for r in e["members"]]))
        print(f"members disagree (some flag, some not) on {e['split_fraction']:.1%} of these photos")
    if context_table:
        print(context_table)
    for note in report.get("notes", []):
        print(f"note: {note}")
    print(f"wrote {out} (model weights sha256 {bundle.meta.short_hash or 'not recorded (format-1 bundle)'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
