"""Command line: rebuild the built-in demo model in assets/demo from ../shared (train.fit, then copy its evidence).

    python -m train.build_demo        # trains train/configs/shared_demo_context.yaml into runs/shared_demo_context
    python -m train.build_demo --run runs/NAME   # packages a run that already finished
    python -m train.build_demo --run runs/NAME --refresh-reports   # only re-measures its evidence reports
    python -m train.build_demo --run runs/NAME --refresh-similar   # only fills its similar cases' diagnoses
    python -m train.build_demo --run runs/NAME --refresh-calibration   # only adds its calibration's refits
    python -m train.build_demo --refresh-context   # only adds its context stage's fusion refits (no run needed)

What it writes (no photos, only numbers and file names): assets/demo/bundle (weights in float16 when that moves
no probability on the run's validation photos by more than 0.01, else float32), evidence/ (the run's
validation and test reports, and a PCA of the shared smartphone and ISIC sets), splits.csv (which image and
patient was in which split, so evaluating the demo on them is flagged), and expected_predictions.json (the
probabilities on assets/examples that tests/core/test_builtin.py checks).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from core import builtin, runfolder
from core.fileio import atomic_write_json, read_json_or_none, report_data

SHARED = Path("../shared/data")
PCA_SETS = (("pad_ufes_20_subset", "pad_ufes_20"), ("isic2017_dermoscopic_subset", "isic2017_dermoscopic"),
            ("isic_9class_test_180px", "isic_9class_dermoscopic"))
HALF_TOLERANCE = 0.01


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.build_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a finished run folder (default: train --config into runs/<recipe name>)")
    p.add_argument("--config", default="train/configs/shared_demo_context.yaml",
                   help="the recipe to train (default: the shared demo with its clinical-context stage)")
    p.add_argument("--out", default=str(builtin.DEMO_DIR), help="where the demo goes (default assets/demo)")
    p.add_argument("--no-pca", action="store_true", help="skip the PCA evidence (it embeds 879 photos)")
    p.add_argument("--refresh-reports", action="store_true",
                   help="with --run: re-measure the run's validation and test reports with this version's report "
                        "code (same model, threshold and photos) and replace only the demo's evidence reports")
    p.add_argument("--refresh-similar", action="store_true",
                   help="with --run: give the shipped bundle's similar cases the fields (diagnosis) they lack from "
                        "the run's split files; weights, gate and embeddings stay as they are")
    p.add_argument("--refresh-calibration", action="store_true",
                   help="with --run: give the shipped bundle's calibration map the refits a photo's interval needs "
                        "(the run's validation logits measured again; the map must come out as stored)")
    p.add_argument("--refresh-context", action="store_true",
                   help="give the shipped bundle's context stage the fusion refits a photo + answers interval needs "
                        "(its validation patients, from the demo's splits.csv and ../shared, scored again with the "
                        "shipped weights; the fusion must come out as stored)")
    return p


def train_run(config: str) -> Path:
    from train import fit
    out = Path("runs") / Path(config).stem
    if fit.main(["--config", config, "--out", str(out)] + (["--resume"] if (out / runfolder.CHECKPOINT).exists() else [])):
        raise SystemExit("training failed; see the messages above")
    return out


def run_rows(run: Path) -> pd.DataFrame:
    """Every image the run used, once, with its split and the manifest's other columns (its split files)."""
    from core.evaluation import split_files
    from core.manifest import read_manifest
    return pd.concat([read_manifest(p) for p in split_files(run)], ignore_index=True).drop_duplicates("image")


def split_membership(run: Path) -> pd.DataFrame:
    """Image file name, patient and split of every image the run used (the last stage's split file)."""
    df = run_rows(run)
    return pd.DataFrame({"image": df["image"].map(lambda p: Path(str(p)).name),
                         "patient_id": df.get("patient_id"), "split": df["split"]})


def check_examples_unseen(membership: pd.DataFrame) -> None:
    """The shipped examples must come from the model's test patients: a demo on its training photos would flatter it."""
    listed = pd.read_csv(builtin.EXAMPLES_DIR / "examples.csv")
    split = dict(zip(membership["image"], membership["split"]))
    wrong = {src: split.get(src, "not in the run") for src in listed["source_image"] if split.get(src) != "test"}
    if wrong:
        raise SystemExit(f"examples not from this run's test patients: {wrong}; pick others in assets/examples")


def strip_paths(report: dict) -> dict:
    """Reports name images by absolute path on the training machine; the shipped copy keeps file names only."""
    for row in report.get("predictions") or []:
        if isinstance(row, dict) and "image" in row:
            row["image"] = Path(str(row["image"])).name
    return report


def refresh_reports(run: Path) -> None:
    """Re-measure a finished single run's validation and test reports with this version's report code.

    Same model, threshold and photos, and nothing is chosen again: only how numbers are computed can change (e.g.
    proportions at 0 or 1 getting Wilson intervals). The validation report is rebuilt from its own per-photo
    probabilities; the test report is measured again from the photos (its trust and context sections need them)."""
    from core import training
    from core.config import run_config_from_dict
    from core.evaluation import build_report, prediction_rows
    from core.manifest import read_manifest
    cfg = run_config_from_dict(runfolder.read_config(run))
    val = read_json_or_none(run / runfolder.VAL_REPORT)
    if val is None or cfg.cv.folds:
        raise SystemExit(f"{run} is not a finished single run with {runfolder.VAL_REPORT}")
    rows = prediction_rows(val, str(run / runfolder.VAL_REPORT))
    new = build_report(rows.drop(columns=["prob", "pred"]), rows["prob"].to_numpy(), val["threshold"],
                       n_boot=cfg.n_boot, seed=cfg.seed, split=val.get("split"))
    new["notes"] += [n for n in val.get("notes", []) if n not in new["notes"]]  # e.g. the context stage's
    new["model"] = val.get("model")
    atomic_write_json(run / runfolder.VAL_REPORT, report_data(new), indent=1)
    if cfg.report_test:
        last = len(cfg.stages) - 1
        df = read_manifest(runfolder.split_path(run, last, cfg.stages[last].name))
        rf = runfolder.RunFolder(run)
        rf.log("reports re-measured with this version's report code (same model, threshold and photos)")
        training.report_test(rf, cfg, run / runfolder.BUNDLE, df)


def half_precision_shift(bundle_dir: Path, run: Path) -> tuple[float, int]:
    """Max |P(fp16 weights) - P(fp32 weights)| over the run's validation photos, and their count (a storage choice
    is a model choice: the test photos play no part in it)."""
    import torch

    from core.bundle import load_bundle
    from core.evaluation import predict_probs
    df = run_rows(run)
    df = df[df["split"] == "val"].reset_index(drop=True)
    full = load_bundle(bundle_dir)
    half = load_bundle(bundle_dir)
    with torch.no_grad():
        for p in half.model.parameters():
            p.copy_(p.half().float())  # what a float16 file gives back after loading
    a = predict_probs(full.model, df, device="cpu")
    b = predict_probs(half.model, df, device="cpu")
    return float(np.max(np.abs(a - b))), len(df)


def write_bundle(run: Path, dest: Path) -> dict:
    """The run's bundle, its weights stored in float16 when the measured shift allows it."""
    import torch

    from core.bundle import load_bundle, read_meta, repack
    src = read_meta(run).folder
    shift, n = half_precision_shift(src, run)
    bundle = load_bundle(src)
    if bundle.similar is not None:  # a run trained before a field was carried (PAD's 'diagnostic') gains it here
        bundle.similar = bundle.similar.filled_from(run_rows(run))
    # similar-case references become relative to the bundle: they resolve where ../shared sits beside the checkout
    repack(bundle, dest, weights_dtype=torch.float16 if shift <= HALF_TOLERANCE else None, relative_images=True)
    return {"weights_dtype": "float16" if shift <= HALF_TOLERANCE else "float32",
            "max_abs_prob_shift_fp16": shift, "photos_checked": n, "tolerance": HALF_TOLERANCE}


def refresh_similar(run: Path, bundle_dir: Path) -> int:
    """Fill the shipped bundle's similar-case records from the run's split files, in place; the weights are written
    back in the dtype they are stored in, and must keep their hash. Returns how many records gained a field."""
    from core.bundle import load_bundle
    bundle = load_bundle(bundle_dir)
    if bundle.similar is None:
        raise SystemExit(f"{bundle_dir} has no similar-case index")
    before, weights = bundle.similar.records, bundle.meta.weights_sha256
    bundle.similar = bundle.similar.filled_from(run_rows(run))
    rewrite_in_place(bundle, bundle_dir, weights)
    return sum(a != b for a, b in zip(before, bundle.similar.records))


def rewrite_in_place(bundle, bundle_dir: Path, weights_sha256: str) -> None:
    """Write a shipped bundle back where it is, its weights in the dtype they are stored in; they must keep their
    hash (only the description or trust parts were meant to change)."""
    import torch

    from core.bundle import load_bundle, repack
    stored = (read_json_or_none(bundle_dir.parent / "weights_storage.json") or {}).get("weights_dtype")
    repack(bundle, bundle_dir, weights_dtype=torch.float16 if stored == "float16" else None)
    if load_bundle(bundle_dir).meta.weights_sha256 != weights_sha256:
        raise SystemExit(f"{bundle_dir}: re-writing changed the weights (restore it from git)")


CALIBRATION_TOLERANCE = 1e-3  # the refitted map may differ from the stored one by float noise only


def refresh_calibration(run: Path, bundle_dir: Path) -> int:
    """Add the refits (core.calibration.BOOT_FITS) to the shipped bundle's calibration map, in place. The run's
    validation logits are measured again with the shipped weights and the map refitted with the run's seed: it must
    come out as the stored map (else nothing is written). Weights, gate and index stay. Returns the refits' count."""
    import dataclasses

    from core.bundle import load_bundle
    from core.calibration import fit_calibration
    from core.config import run_config_from_dict
    from core.evaluation import groups_of, resample_unit
    from core.trust import features_and_logits
    bundle = load_bundle(bundle_dir)
    stored, weights = bundle.calibration, bundle.meta.weights_sha256
    if stored is None:
        raise SystemExit(f"{bundle_dir} has no calibration map")
    val = run_rows(run)
    val = val[val["split"] == "val"].reset_index(drop=True)
    _, z = features_and_logits(bundle.model, val, device="cpu")
    seed = run_config_from_dict(runfolder.read_config(run)).seed
    fresh = fit_calibration(z, val["label"].to_numpy(), groups=groups_of(val), seed=seed, unit=resample_unit(val))
    drift = max(abs(fresh.slope - stored.slope), abs(fresh.intercept - stored.intercept))
    if (fresh.method, fresh.n) != (stored.method, stored.n) or drift > CALIBRATION_TOLERANCE:
        raise SystemExit(f"the refitted map ({fresh.method}, {fresh.slope:.4f}, {fresh.intercept:.4f} on {fresh.n}) is "
                         f"not the stored one ({stored.method}, {stored.slope:.4f}, {stored.intercept:.4f} on "
                         f"{stored.n}): is {run} the run this bundle came from? Nothing was written")
    bundle.calibration = dataclasses.replace(stored, boot=fresh.boot, boot_unit=fresh.boot_unit)
    rewrite_in_place(bundle, bundle_dir, weights)
    return len(fresh.boot)


CONTEXT_TOLERANCE = 0.05  # the shipped float16 weights move validation logits by a little, and the fusion with them


def refresh_context(demo: Path, config: str) -> int:
    """Add the fusion refits to the shipped bundle's context stage, in place. Its validation rows are the demo's
    splits.csv `val` photos, imported from ../shared as the recipe imports them (answers included), scored again with
    the shipped weights; the fusion refitted on them must come out as stored (else nothing is written). Returns the
    refits' count."""
    import dataclasses

    import yaml

    from core.bundle import load_bundle
    from core.config import run_config_from_dict
    from core.context_fit import refresh_fusion_refits
    from core.scores import sigmoid
    from core.sources import import_pad_ufes
    from core.trust import features_and_logits
    bundle = load_bundle(demo / "bundle")
    stage, weights = bundle.meta.context, bundle.meta.weights_sha256
    if stage is None:
        raise SystemExit(f"{demo / 'bundle'} has no context stage")
    cfg = run_config_from_dict(yaml.safe_load(Path(config).read_text(encoding="utf-8")))
    rows, _ = import_pad_ufes(SHARED / "pad_ufes_20_subset" / "metadata.csv", SHARED / "pad_ufes_20_subset" / "images")
    split = pd.read_csv(demo / "splits.csv")
    val_names = set(split.loc[split["split"] == "val", "image"])
    val = rows[rows["image"].map(lambda p: Path(p).name).isin(val_names)].reset_index(drop=True)
    if len(val) != stage.fitted.get("n_val") or len(val) != len(val_names):
        raise SystemExit(f"found {len(val)} of the demo's {len(val_names)} validation photos in {SHARED} (its context "
                         f"stage was fitted on {stage.fitted.get('n_val')}); nothing was written")
    _, z = features_and_logits(bundle.model, val, device="cpu")
    fresh, drift = refresh_fusion_refits(stage, val, sigmoid(z), n_boot=cfg.n_boot, seed=cfg.seed)
    if drift > CONTEXT_TOLERANCE or not fresh.fusion_bootstrap:
        raise SystemExit(f"the fusion refitted on these photos lies {drift:.4f} from the stored one (limit "
                         f"{CONTEXT_TOLERANCE}), or no refit held both classes: nothing was written")
    bundle.meta = dataclasses.replace(bundle.meta, context=fresh)
    rewrite_in_place(bundle, demo / "bundle", weights)
    return fresh.fusion_bootstrap["fits"]


def write_evidence(run: Path, dest: Path, pca: bool) -> None:
    dest.mkdir(parents=True)
    write_reports(run, dest)
    if pca:
        write_pca(run, dest / "pca")


def write_reports(run: Path, dest: Path) -> None:
    """The run's validation and test reports, with file names instead of paths, into dest."""
    for name in (runfolder.VAL_REPORT, runfolder.TEST_REPORT):
        report = read_json_or_none(run / name)
        if report is not None:
            atomic_write_json(dest / name, strip_paths(report), indent=1)


def write_pca(run: Path, dest: Path) -> None:
    """PCA of the shared smartphone and ISIC sets in the demo model's feature space: coordinates and summary."""
    from train import data, pca
    with tempfile.TemporaryDirectory() as tmp:
        manifests = []
        for folder, domain in PCA_SETS:
            m = Path(tmp) / f"{domain}.csv"
            data.main(["csv", str(SHARED / folder / "labels.csv"), "--images", str(SHARED / folder / "images"),
                       "--out", str(m), "--domain", domain])
            manifests += ["--manifest", str(m)]
        if pca.main(manifests + ["--run", str(run), "--out", str(Path(tmp) / "pca")]):
            raise SystemExit("PCA failed; see the messages above")
        dest.mkdir(parents=True)
        for f in (Path(tmp) / "pca").iterdir():
            if f.suffix == ".csv":
                table = pd.read_csv(f)
                if "image" in table:
                    table["image"] = table["image"].map(lambda p: Path(str(p)).name)
                table.to_csv(dest / f.name, index=False, float_format="%.5g")
            elif f.name == "summary.json":
                shutil.copy(f, dest / f.name)


def expected_predictions(bundle_dir: Path) -> dict:
    """The probabilities the shipped bundle gives each example photo (what tests check against)."""
    from core.bundle import load_bundle
    from core.inference import Predictor
    predictor = Predictor(load_bundle(bundle_dir), device="cpu", fast=False)  # fp32: the same on every CPU class
    out = {}
    for ex in builtin.examples():
        pred = predictor.predict_source(ex.path.read_bytes(), name=ex.path.name, cam_method=None)
        out[ex.path.name] = {"prob": float(pred.prob), "label": ex.label, "diagnosis": ex.diagnosis}
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not SHARED.is_dir():
        print(f"error: {SHARED} not found: the demo is rebuilt from the shared PAD-UFES-20 and ISIC sets "
              "(run from the repository root with ../shared beside it)", file=sys.stderr)
        return 2
    if args.refresh_reports:
        if not args.run:
            print("error: --refresh-reports needs --run (the finished run the demo was packaged from)", file=sys.stderr)
            return 2
        refresh_reports(Path(args.run))
        write_reports(Path(args.run), Path(args.out) / "evidence")
        print(f"evidence reports in {Path(args.out) / 'evidence'} re-measured from {args.run}")
        return 0
    if args.refresh_similar:
        if not args.run:
            print("error: --refresh-similar needs --run (the finished run the demo was packaged from)", file=sys.stderr)
            return 2
        n = refresh_similar(Path(args.run), Path(args.out) / "bundle")
        print(f"{n} similar-case records in {Path(args.out) / 'bundle'} gained fields from {args.run}'s split files")
        return 0
    if args.refresh_calibration:
        if not args.run:
            print("error: --refresh-calibration needs --run (the finished run the demo was packaged from)",
                  file=sys.stderr)
            return 2
        n = refresh_calibration(Path(args.run), Path(args.out) / "bundle")
        print(f"the calibration map in {Path(args.out) / 'bundle'} gained {n} refits (its photos' 95% intervals)")
        return 0
    if args.refresh_context:
        n = refresh_context(Path(args.out), args.config)
        print(f"the context stage in {Path(args.out) / 'bundle'} gained {n} fusion refits (photo + answers 95% "
              "intervals)")
        return 0
    run = Path(args.run) if args.run else train_run(args.config)
    out = Path(args.out)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the demo is read by whoever runs the app
    try:
        storage = write_bundle(run, staging / "bundle")
        write_evidence(run, staging / "evidence", pca=not args.no_pca)
        membership = split_membership(run)
        check_examples_unseen(membership)
        membership.to_csv(staging / "splits.csv", index=False)
        atomic_write_json(staging / "weights_storage.json", storage)
        atomic_write_json(staging / builtin.DEMO_EXPECTED.name, expected_predictions(staging / "bundle"))
        for keep in ("README.md",):  # hand-written attribution and intended use stay
            if (out / keep).is_file():
                shutil.copy(out / keep, staging / keep)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"demo written to {out}: weights {storage['weights_dtype']} (max |dP| {storage['max_abs_prob_shift_fp16']:.4f}"
          f" over {storage['photos_checked']} validation photos)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
