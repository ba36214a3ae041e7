"""Single-photo latency of ensembles on the fast path: 1 model against K members, and sequential against stacked.

    python benchmarks/ensemble_latency.py --json benchmarks/results/ensemble_latency_<cpu>.json
    python benchmarks/ensemble_latency.py --backbones mobilenetv2_100 --members 5 --repeats 7 --threads 2
    python benchmarks/ensemble_latency.py --device cuda --json benchmarks/results/ensemble_latency_<gpu>.json

FAST: Predictor(fast=True).predict_source(12 MP phone JPEG) with Grad-CAM, as the app runs it: decode and crop
once, then every member's forward (in the precision the load-time check chose) and its head-only Grad-CAM.
STACKED: the members' backbones as one vmapped function over stacked weights (torch.func.stack_module_state),
against the same backbones called one after another, feature maps only, batch 1, fp32. The Predictor runs the members
one after another; the stacked column says what stacking would save on this machine.
Random weights (speed does not depend on them); calls alternate between configurations so that all see the same
load on a shared machine; medians after warm-up.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch

from common import finish, machine_info, make_bundle, median_ms, phone_jpeg, random_model, set_threads
from core.bundle import EnsembleInfo
from core.inference import Predictor
from core.model import EnsembleClassifier


def ensemble_bundle(name: str, k: int):
    members = [random_model(name, seed=s) for s in range(k)]
    bundle = make_bundle(members[0])
    if k > 1:
        bundle.model = EnsembleClassifier(members)
        bundle.meta = dataclasses.replace(bundle.meta, ensemble=EnsembleInfo(members=k))
    return bundle


class _FeatureMap(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.forward_features(x)


def stacked_vs_sequential(members, size: int, repeats: int, device: str = "cpu") -> dict:
    """Median ms of the members' feature maps for one photo: a Python loop against one vmapped call."""
    from torch.func import functional_call, stack_module_state, vmap
    backbones = [m.backbone.eval() for m in members]
    params, buffers = stack_module_state(backbones)
    state = {f"m.{k}": v for k, v in {**params, **buffers}.items()}
    base = _FeatureMap(copy.deepcopy(backbones[0]).to("meta"))
    stacked = vmap(lambda s, x: functional_call(base, s, (x,)), in_dims=(0, None))
    x = torch.randn(1, 3, size, size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)  # GPU calls return before they end
    seq, vm = [], []
    with torch.no_grad():
        try:
            ref = torch.stack([b.forward_features(x) for b in backbones])
            err = float((stacked(state, x) - ref).abs().max() / ref.abs().max())
        except Exception as e:  # noqa: BLE001 - some layers have no batching rule; record it
            return {"stacked": f"not possible: {type(e).__name__}: {str(e)[:200]}"}
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            [b.forward_features(x) for b in backbones]
            sync()
            seq.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            stacked(state, x)
            sync()
            vm.append(time.perf_counter() - t0)
    return {"sequential_ms": median_ms(seq[1:]), "stacked_vmap_ms": median_ms(vm[1:]), "stacked_rel_err": err}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbones", nargs="+", default=["mobilenetv2_100", "convnext_tiny"])
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps (the Predictor's device)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    out = {"machine": machine_info(), "device": args.device, "threads": threads, "members": args.members,
           "results": []}
    photo = phone_jpeg()
    print(f"{'backbone':18} {'K':>2} {'precision':>9} {'engine':>11} {'ms/photo':>9} {'x single':>8}  stacked vs sequential")
    for name in args.backbones:
        preds = {k: Predictor(ensemble_bundle(name, k), device=args.device, fast=True) for k in (1, args.members)}
        times = {k: [] for k in preds}
        for _ in range(args.repeats + 1):  # alternate, first round is warm-up
            for k, p in preds.items():
                t0 = time.perf_counter()
                p.predict_source(photo)
                times[k].append(time.perf_counter() - t0)
        stack = stacked_vs_sequential(list(preds[args.members].members), preds[1].pp.input_size, args.repeats,
                                     args.device)
        single = median_ms(times[1][1:])
        for k, p in preds.items():
            ms = median_ms(times[k][1:])
            row = {"backbone": name, "members": k, "precision": p.precision["dtype"], "engine": p.engine["engine"],
                   "ms_per_photo": ms,
                   "ratio_to_single": round(ms / single, 2), "samples_ms": [round(t * 1e3, 1) for t in times[k][1:]]}
            if k > 1:
                row["stacked_vs_sequential"] = stack
            out["results"].append(row)
            extra = "" if k == 1 else ", ".join(f"{a} {b}" for a, b in stack.items())
            print(f"{name:18} {k:>2} {row['precision']:>9} {row['engine']:>11} {ms:>9.1f} {row['ratio_to_single']:>8.2f}  {extra}")
    return finish(out, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
