"""Command line: screen a folder or manifest of photos with a run's model, writing one CSV row per image.

    python -m train.screen --run runs/X --images DIR --out predictions.csv
    python -m train.screen --run runs/X --manifest M.csv --out predictions.csv [--batch-size 32] [--device auto]

Every file handed over gets a row: every file under --images (recursively, whatever its name: the format is
read from the content, so a JPEG without an extension is scored), or every row of --manifest. A row's status is
`scored` or why the file was not scored: hidden (a name starting with '.', e.g. .DS_Store), broken_link,
not_a_file (a pipe, socket or device) and unreadable_folder (a subfolder that could not be listed: one row for it),
these in a folder only; not_an_image, unsupported_type (e.g. GIF), corrupt (truncated or damaged), too_large,
empty, not_found, unreadable, bad_crop; `error` says it in words, and the end of the run lists them. Scored rows carry the verdict
(flagged / not flagged / not assessed, with the reason in not_assessed_reason: a quality refusal, or a photo unlike
the training photos), the calibrated probability, the raw score, the out-of-distribution score and quality codes. Every row names the model run and
threshold, and <out>.provenance.json next to the CSV records the model's provenance (training data, validation
metrics, intended use, weights hash): probabilities never travel without it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Dataset

from core import builtin
from core.bundle import WEIGHTS_FILE, BundleError, load_bundle
from core.device import dataloader_workers
from core.evaluation import seen_splits
from core.fileio import UnwritableError, atomic_write, atomic_write_text, check_writable
from core.images import SUPPORTED_FORMATS, ImageLoadError, load_image
from core.inference import Predictor, model_view
from core.manifest import ManifestError, crop_of, file_sha256, read_manifest
from core.quality import quality_warnings
from core.trust import FLAGGED, NOT_ASSESSED, NOT_FLAGGED

CARRIED = ("label", "patient_id", "lesion_id", "domain", "fitzpatrick", "split")  # manifest columns kept in the CSV
SCORED = "scored"
LISTED_PER_REASON = 20  # files named per reason at the end of a run; the CSV names them all
COLUMNS = {
    "verdict": "flagged / not flagged (raw score vs threshold) / not assessed (see not_assessed_reason); a screening "
               "flag, not a diagnosis",
    "not_assessed_reason": "why no verdict: a quality refusal, or the photo is unlike the training photos",
    "prob_calibrated": "calibrated probability of malignancy among photos like the validation set (empty: the model "
                       "has no calibration map)",
    "prob_calibrated_low": "lower end of prob_calibrated's 95% interval: the calibration map refitted on bootstrap "
                           "resamples of its patients (empty: no calibration, or a model from before these were kept)",
    "prob_calibrated_high": "upper end of the same interval",
    "fused_prob_low": "lower end of fused_prob's 95% interval when answers were used: the fusion refitted on bootstrap "
                      "resamples of its patients (empty: photo only, or a model from before these were kept)",
    "fused_prob_high": "upper end of the same interval",
    "raw_score": "the model's uncalibrated sigmoid output; threshold applies to it",
    "ood_score": "distance from the training photos in the model's feature space; > the gate's threshold = refused",
    "members_flagging": "ensemble only: how many of its models flag the photo on their own (raw score >= threshold)",
    "members_sd": "ensemble only: standard deviation of its models' raw scores (how much they disagree)",
    "context_note": "context answers that could not be used (out of range, not a known answer) and were counted as "
                    "not answered",
    "seen_by_model": "train / val when the model trained or validated on this photo (its run's split files): its "
                     "result is then no estimate for a new patient; unknown when no split files are beside the "
                     "model; empty otherwise",
}


class ScreenDataset(Dataset):
    """Decode (draft), quality-check and crop in the DataLoader workers; errors travel as text, not exceptions."""

    def __init__(self, paths: list[str], crops: list[dict | None], pp, decode_kw: dict):
        self.paths, self.crops, self.pp, self.decode_kw = paths, crops, pp, decode_kw

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        """(index, crop or None, quality codes, reason the file was not scored or '', message)."""
        try:
            img = load_image(self.paths[i], crop=self.crops[i], formats=SUPPORTED_FORMATS, **self.decode_kw)
            return i, model_view(img, self.pp), quality_warnings(img), "", ""
        except ImageLoadError as e:
            return i, None, [], e.reason, str(e)
        except Exception as e:  # noqa: BLE001 - one odd file must not stop a screening run of thousands
            return i, None, [], "error", f"{self.paths[i]}: {type(e).__name__}: {e}"


def collate(items):
    return items  # crops are stacked in the main process (failed items have none)


# why a folder entry is listed but never opened (opening a pipe would block the run)
SKIPPED = {"hidden": "hidden file, not screened",
           "broken_link": "a link to a file that does not exist, not screened",
           "not_a_file": "not a regular file (a pipe, socket or device), not screened",
           "unreadable_folder": "folder could not be listed, its files were not screened"}


def list_files(folder: Path) -> list[tuple[str, str]]:
    """Every entry under `folder`, recursively and sorted, with the reason it will not be opened ('' for a file to
    screen): nothing is left out because of its name or kind. Linked folders are followed, each real folder once
    (a link loop would never end); a folder that cannot be listed is an entry of its own."""
    out, seen = [], set()

    def unlisted(err: OSError) -> None:
        out.append((str(err.filename), "unreadable_folder"))

    for root, dirs, files in os.walk(folder, onerror=unlisted, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        for name in files:
            path = os.path.join(root, name)
            kind = "" if os.path.isfile(path) else ("broken_link" if os.path.islink(path) else "not_a_file")
            out.append((path, kind or ("hidden" if hidden(path, folder) else "")))
    return sorted(out)


def hidden(path: str, folder: Path) -> bool:
    """A name starting with '.' in the path below `folder` (.DS_Store, ._IMG_1.jpg, .thumbnails/...)."""
    return any(part.startswith(".") for part in Path(path).relative_to(folder).parts)


def inputs_from_args(args) -> tuple[pd.DataFrame, dict]:
    """The rows to screen (a folder's have `_skip`: a reason decided before decoding, else '') and a description."""
    if args.images:
        folder = Path(args.images)
        if folder.is_file():
            raise ManifestError(f"{folder}: is a file; --images takes a folder (one photo: put it in a folder; a "
                                "list of photos: --manifest)")
        if not folder.is_dir():
            raise ManifestError(f"{folder}: image folder not found")
        entries = list_files(folder)
        if not entries:
            raise ManifestError(f"{folder}: no files found")
        return (pd.DataFrame(entries, columns=["image", "_skip"]),
                {"images": str(folder.resolve()), "n": len(entries)})
    df = read_manifest(args.manifest, labelled=False)  # screening needs photos, not diagnoses
    if df.empty:
        raise ManifestError(f"{args.manifest}: manifest has no rows")
    return df.reset_index(drop=True), {"manifest": str(Path(args.manifest).resolve()), "n": len(df),
                                       "sha256": file_sha256(args.manifest)}


def screen(predictor: Predictor, df: pd.DataFrame, *, batch_size: int, workers: int, progress=True) -> pd.DataFrame:
    """One row per row of df, in order: status ('scored' or the reason), probability, verdict, quality, error."""
    status = [SCORED] * len(df)
    errors = [""] * len(df)
    crops = [None] * len(df)
    if any(c.startswith("crop_") for c in df.columns):
        for i, (_, r) in enumerate(df.iterrows()):
            try:
                crops[i] = crop_of(r)
            except ManifestError as e:  # a partial or non-numeric box: that row is not scored, the rest are
                status[i], errors[i] = "bad_crop", str(e)
    if "_skip" in df.columns:  # decided from the folder listing (hidden files, links, pipes): never opened
        for i, reason in enumerate(df["_skip"].fillna("").tolist()):
            if reason:
                status[i], errors[i] = reason, f"{df['image'].iloc[i]}: {SKIPPED[reason]}"
    todo = [i for i in range(len(df)) if status[i] == SCORED]
    ds = ScreenDataset([df["image"].iloc[i] for i in todo], [crops[i] for i in todo], predictor.pp,
                       predictor.decode_kw)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=min(workers, -(-len(todo) // batch_size)),
                        collate_fn=collate)
    probs, calibrated, ood_scores = (np.full(len(df), np.nan) for _ in range(3))
    cal_ci = np.full((len(df), 2), np.nan)  # the calibrated probability's 95% interval per photo
    quality, verdicts, reasons = ([""] * len(df) for _ in range(3))
    flagging, spread = np.full(len(df), np.nan), np.full(len(df), np.nan)
    from tqdm import tqdm
    bar = tqdm(total=len(todo), unit="img", desc="screening", file=sys.stderr, disable=None if progress else True)
    for items in loader:
        ok = [it for it in items if it[1] is not None]
        for j, _, _, reason, err in items:
            if reason:
                status[todo[j]], errors[todo[j]] = reason, err
        if ok:
            x = predictor.to_input(np.stack([it[1] for it in ok]))
            for (j, *_), a in zip(ok, predictor.assess_batch(x, [it[2] for it in ok])):
                i = todo[j]
                probs[i], quality[i], verdicts[i], reasons[i] = a.raw_prob, ";".join(a.quality_codes), a.verdict, \
                    a.reason or ""
                calibrated[i] = np.nan if a.prob_calibrated is None else a.prob_calibrated
                cal_ci[i] = (np.nan, np.nan) if a.prob_calibrated_ci95 is None else a.prob_calibrated_ci95
                ood_scores[i] = np.nan if a.ood_score is None else a.ood_score
                if a.members is not None:
                    flagging[i], spread[i] = a.members.n_flagging, a.members.sd
        bar.update(len(items))
    bar.close()
    b = predictor.bundle
    out = pd.DataFrame({"image": df["image"], "status": status})
    out["verdict"] = verdicts
    out["not_assessed_reason"] = reasons
    out["prob_calibrated"] = np.round(calibrated, 6)
    out["prob_calibrated_low"], out["prob_calibrated_high"] = np.round(cal_ci[:, 0], 6), np.round(cal_ci[:, 1], 6)
    out["raw_score"] = np.round(probs, 6)
    out["threshold"] = b.threshold
    out["threshold_calibrated"] = b.calibration.threshold(b.threshold) if b.calibration else np.nan
    out["ood_score"] = np.round(ood_scores, 6)
    if len(predictor.members) > 1:
        out["members_flagging"] = pd.array(np.where(np.isnan(flagging), None, flagging), dtype="Int64")
        out["members_sd"] = np.round(spread, 6)
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
    problems = {}  # a bad answer counts as unanswered for its row, named in context_note; the run goes on
    answers = context_frame(df, stage.fields, problems).to_dict("records")
    thr = predictor.bundle.threshold
    # a photo the model cannot assess gets no fused result either: the answers do not make the photo usable
    rows = [fuse(stage, p, thr, a) if not np.isnan(p) and v != NOT_ASSESSED else None
            for p, a, v in zip(out["raw_score"], answers, out["verdict"])]
    out["fused_prob"] = [round(r.prob, 6) if r else np.nan for r in rows]
    for end, col in enumerate(("fused_prob_low", "fused_prob_high")):
        out[col] = [round(r.ci95[end], 6) if r and r.ci95 and r.used else np.nan for r in rows]
    out["fused_verdict"] = [NOT_ASSESSED if v == NOT_ASSESSED else "" if r is None else
                            FLAGGED if r.malignant else NOT_FLAGGED for r, v in zip(rows, out["verdict"])]
    out["fused_threshold"] = [r.threshold if r else np.nan for r in rows]
    out["inputs"] = [r.inputs if r else "" for r in rows]
    out["context_note"] = ["; ".join(problems.get(i, [])) for i in range(len(out))]
    return out


def not_scored_report(table: pd.DataFrame, limit: int = LISTED_PER_REASON) -> str:
    """The files that were not scored, grouped by reason (at most `limit` named per reason)."""
    lines = []
    skipped = table[table["status"] != SCORED]
    for reason, rows in skipped.groupby("status", sort=True):
        lines.append(f"not scored, {reason} ({len(rows)}):")
        lines += [f"  {msg or path}" for path, msg in zip(rows["image"][:limit], rows["error"][:limit])]
        if len(rows) > limit:
            lines.append(f"  ... and {len(rows) - limit} more (status column of the CSV)")
    return "\n".join(lines)


def provenance(predictor: Predictor, run: str, inputs: dict, table: pd.DataFrame, seconds: float) -> dict:
    bundle = predictor.bundle
    weights = Path(bundle.path) / WEIGHTS_FILE if bundle.path else None
    reasons = table.loc[table["status"] != SCORED, "status"].value_counts().sort_index()
    failed = int(reasons.sum())
    return {"what": "P(malignant) per image from python -m train.screen; research use only",
            "model": predictor.summary, "run": str(run), "bundle": str(bundle.path),
            "weights_sha256": file_sha256(weights) if weights and weights.is_file() else None,
            "weights_sha256_short": bundle.meta.short_hash,
            "preprocessing": bundle.meta.preprocessing, "threshold": bundle.meta.threshold.to_dict(),
            "context_stage": bundle.meta.context.to_dict() if bundle.meta.context else None,
            "ensemble": bundle.meta.ensemble.to_dict() if bundle.meta.ensemble else None,
            "inputs": inputs, "n_images": int(len(table)), "n_predicted": int(len(table) - failed),
            "n_failed": failed, "not_scored": {str(k): int(v) for k, v in reasons.items()},
            "n_flagged": int((table["verdict"] == FLAGGED).sum()),
            "n_not_assessed": int((table["verdict"] == NOT_ASSESSED).sum()),
            "lacks": bundle.lacks(), "ood_gate": bundle.meta.ood_gate, "calibration": bundle.meta.calibration,
            "columns": COLUMNS,
            "precision": predictor.precision, "engine": predictor.engine,
            "device": str(predictor.device),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 1)}


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.stem + ".provenance.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.screen", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run folder, bundle folder, or 'demo' for the built-in demo model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of photos (every file, recursively; hidden files are listed, "
                                      "not scored)")
    src.add_argument("--manifest", help="manifest CSV (image paths; optional crop boxes, labels and context "
                                        "answers)")
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
    out = Path(args.out)
    try:
        bundle = load_bundle(args.run)
        df, inputs = inputs_from_args(args)
        given = [args.manifest, *df["image"]]
        check_writable(out, given)
        check_writable(sidecar_path(out), given)
    except (BundleError, ManifestError, UnwritableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    predictor = Predictor(bundle, device=args.device, fast=True)
    workers = args.workers if args.workers is not None else dataloader_workers()
    table = screen(predictor, df, batch_size=args.batch_size, workers=workers)
    table["seen_by_model"] = seen_splits(args.run, df["image"])
    atomic_write(out, lambda tmp: table.to_csv(tmp, index=False))
    meta = provenance(predictor, args.run, inputs, table, time.time() - t0)
    atomic_write_text(sidecar_path(out), json.dumps(meta, indent=1, default=str))
    if meta["n_failed"]:
        print(not_scored_report(table), file=sys.stderr)
    why = ", ".join(f"{n} {reason}" for reason, n in meta["not_scored"].items())
    print(f"{meta['n_predicted']} of {meta['n_images']} files scored: {meta['n_flagged']} flagged (raw score >= "
          f"{bundle.threshold:.3f}), {meta['n_not_assessed']} not assessed (quality or unlike the training photos); "
          f"{meta['n_failed']} not scored" + (f": {why}" if why else ""))
    for lack in bundle.lacks():
        print(f"note: this model has {lack}")
    if (table["seen_by_model"] == "unknown").any():
        print("note: no split files beside this model (a bundle moved away from its run): whether it trained on "
              "these photos is unknown (seen_by_model column)", file=sys.stderr)
    elif seen := int((table["seen_by_model"] != "").sum()):
        print(f"warning: the model trained or validated on {seen} of these photos (seen_by_model column): their "
              "results are no estimate for new patients", file=sys.stderr)
    if "context_note" in table and (n := int((table["context_note"] != "").sum())):
        print(f"note: {n} row(s) had context answers that could not be used; they were counted as not answered "
              f"(context_note column)", file=sys.stderr)
    print(f"wrote {out} and {sidecar_path(out)}")
    return 0 if meta["n_predicted"] else 1


if __name__ == "__main__":
    sys.exit(main())
