"""Command line: two models on the same photos, ROC-AUC and PR-AUC with a paired patient-bootstrap CI of the
difference (`python -m train.compare runs/A runs/B`): the yardstick for changing a recipe.

Each side is a cross-validated run folder (its out-of-fold predictions: compare recipes on these, never on the
test split) or an evaluation report JSON (e.g. runs/X/test_report.json, once the recipe is chosen)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core import metrics
from core.evaluation import compare_scores, scored_rows
from core.fileio import atomic_write_json, check_writable


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="the reference: a cross-validated run folder or a report JSON")
    p.add_argument("b", help="the candidate, scored on the same photos")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the patients (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the comparison here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.json:  # before the bootstrap, not after it
            check_writable(args.json, [args.a, args.b])
        result = compare_scores(scored_rows(args.a), scored_rows(args.b), n_boot=args.n_boot, seed=args.seed)
    except (OSError, ValueError) as e:  # UnwritableError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"a": str(args.a), "b": str(args.b), **result}
    print(f"{result['n']} photos ({result['n_positive']} malignant, {result['n_groups']} patients); "
          f"a = {args.a}, b = {args.b}")
    for key in ("roc_auc", "pr_auc"):
        r = result[key]
        print(f"{metrics.display_name(key):8s} a {r['a']:.3f}  b {r['b']:.3f}  b - a "
              f"{metrics.format_estimate(r['difference'], '+.3f', '+.3f')}")
    print(f"({result['ci_method']}; photos matched by {result['matched_by']})")
    if args.json:
        atomic_write_json(args.json, result, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
