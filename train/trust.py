"""Command line: fit the out-of-distribution gate, calibration and similar-case index for an existing run.

    python -m train.trust --run runs/X

Training does this at its end; this command upgrades a run trained before those features (or refits them). It
reads the run's own split file (train photos describe the gate; validation photos set its threshold and fit the
calibration; test photos are never read), then rewrites the bundle with the same weights and threshold.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core import builtin
from core.bundle import BundleError, load_bundle, other_sections, save_bundle
from core.dataset import check_images
from core.device import pick_device
from core.manifest import ManifestError, read_manifest
from core.runfolder import SPLITS
from core.trust import fit_trust


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.trust", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run folder (with splits/ and bundle/)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p


def last_split_file(run: Path) -> Path:
    files = sorted((run / SPLITS).glob("*.csv"))
    if not files:
        raise ManifestError(f"{run}: no {SPLITS}/*.csv (not a run folder; the gate needs the run's own split)")
    return files[-1]  # stages are numbered: the last stage's split, on which the threshold was chosen


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run = Path(args.run)
    try:
        if builtin.is_builtin(builtin.resolve_model(run)):
            raise BundleError("train.trust rebuilds a run's trust arrays inside its bundle; the built-in demo ships "
                              "with its own (python -m train.build_demo rebuilds the demo)")
        bundle = load_bundle(run)
        df = read_manifest(last_split_file(run))
        check_images(df[df["split"].isin(["train", "val"])])  # the photos fit_trust reads, every bad one named
    except (BundleError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trust = fit_trust(bundle.model, df, device=pick_device(args.device), seed=args.seed)
    for note in trust.notes:
        print(f"note: {note}", file=sys.stderr)
    m = bundle.meta
    save_bundle(bundle.model, bundle.path, threshold=m.threshold, provenance=m.provenance, gate=trust.gate,
                calibration=trust.calibration, similar=trust.similar, **other_sections(m))  # e.g. the context stage
    if trust.gate:
        g = trust.gate
        print(f"gate: {g.method} (k={g.k}), threshold {g.threshold:.4g} = the {g.accept_quantile:.1%} quantile of "
              f"{g.n_validation} validation photos' scores; {g.n_reference} training photos as reference")
    if trust.calibration:
        c = trust.calibration
        print(f"calibration: {c.method}, slope {c.slope:.3f}, intercept {c.intercept:.3f} ({c.chosen_by})")
    print(f"similar cases: {len(trust.similar.records)} photos indexed; wrote {bundle.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
