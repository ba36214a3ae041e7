"""Command line: export a run's model to ONNX with a checked dynamic batch and a provenance sidecar.

    python -m train.export --run runs/X --onnx model.onnx [--opset N]

Writes model.onnx and model.onnx.json (preprocessing, threshold, provenance, the onnxruntime check). Exits 1
when onnxruntime's probabilities differ from PyTorch's by more than --tolerance (default 1e-4).
"""
from __future__ import annotations

import argparse
import sys
import warnings

from core import builtin
from core.bundle import BundleError, load_bundle
from core.export import DEFAULT_TOLERANCE, ExportError, export_onnx, sidecar_path
from core.fileio import UnwritableError, check_writable


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run folder, bundle folder, or 'demo' for the built-in demo model")
    p.add_argument("--onnx", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="largest accepted |P_onnx - P_torch| (default %(default)g)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.run = str(builtin.resolve_model(args.run))
    try:
        bundle = load_bundle(args.run)
        check_writable(args.onnx)
        check_writable(sidecar_path(args.onnx))
    except (BundleError, UnwritableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's business
            meta = export_onnx(bundle, args.onnx, opset=args.opset, tolerance=args.tolerance)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    v = meta["verification"]
    print(f"wrote {args.onnx} (opset {meta['opset']}) and {sidecar_path(args.onnx)}")
    print(f"onnxruntime check on a batch of {v['batch']}: max |dP| {v['max_abs_prob_diff']:.2e} "
          f"(tolerance {v['tolerance']:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
