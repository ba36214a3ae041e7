"""Batch throughput: screening (inference) and training images/s per backbone, against the machine's matmul floor.

    python benchmarks/throughput.py --json benchmarks/results/throughput_<cpu>.json
    python benchmarks/throughput.py --backbones convnext_tiny resnet50 --batch-size 32 --iters 5
    python benchmarks/throughput.py --device cuda --batch-size 64 --json benchmarks/results/throughput_<gpu>.json

- matmul rate: 2048x2048 matmuls in fp32 and bf16 (GFLOP/s), the most this machine's BLAS does;
- FLOPs per image from torch.utils.flop_counter.FlopCounterMode (forward; and forward+backward for each stage);
- screening: Predictor(fast=True).logits on a normalised batch (model only: decode runs in DataLoader workers and
  is reported separately as 12 MP JPEG decodes per second per core);
- training: one optimiser step per batch in train mode, channels-last, for the frozen-backbone stage (head-only
  gradients) and the unfrozen stage, in fp32 and under bf16 autocast (what Fabric's 'bf16-mixed' does);
- bf16 is measured only where training's precision 'auto' would use it (CUDA, CPUs with native bf16 units):
  elsewhere bf16 is emulated, about a hundred times slower, and no run uses it (the JSON says so; --force-bf16
  measures it anyway);
- ideal images/s = matmul rate / FLOPs per image; efficiency = measured / ideal (convolutions, depthwise layers,
  norms and activations run far below the matmul rate, so well under 100% is expected).
Random weights (speed does not depend on them). Shared machine: medians, and noisy.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from common import machine_info, make_bundle, phone_jpeg, random_model, set_threads, finish
from report import num
from core.dataset import decode_limits
from core.device import fabric_precision
from core.images import load_image
from core.inference import Predictor

DEFAULT = ("convnext_tiny", "resnet18", "mobilenetv2_100")


def sync(device: str = "cpu") -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, iters: int, warmup: int = 1, device: str = "cpu") -> float:
    """Median seconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def matmul_gflops(dtype: torch.dtype, n: int = 2048, iters: int = 5, device: str = "cpu") -> float:
    a, b = torch.randn(n, n).to(device, dtype), torch.randn(n, n).to(device, dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, iters, warmup=2, device=device) / 1e9


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask, out_shape=None) -> int:
    """grad_input and grad_weight each cost one forward convolution: 2 * N * out_pixels * C_out * C_in/groups * k*k.

    torch 2.14's built-in formula ignores `groups` in the backward and overcounts a depthwise convolution's backward
    ~groups-fold (a 64-channel depthwise 3x3: 65x its forward instead of 2x), which made ConvNeXt and MobileNet
    training look like 77 and 12 GFLOP per image."""
    n, c_out = grad_out_shape[0], grad_out_shape[1]
    out_pixels = 1
    for d in grad_out_shape[2:]:
        out_pixels *= d
    per_weight = 1
    for d in w_shape[1:]:
        per_weight *= d
    fwd = 2 * n * out_pixels * c_out * per_weight
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flops(model, x: torch.Tensor, backward: bool) -> int:
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        if backward:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def train_step_fn(model, batch: int, size: int, dtype, device: str = "cpu"):
    x = torch.randn(batch, 3, size, size).to(device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch) > 0.5).float().to(device)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        with torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(x).squeeze(1)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench(name: str, batch: int, iters: int, rates: dict, device: str = "cpu") -> dict:
    """FLOPs, screening and training images/s of one backbone (bf16 rows only when rates['bf16'] was measured)."""
    model = random_model(name)
    size = model.spec.preprocessing.input_size
    x1 = torch.randn(1, 3, size, size)
    f_fwd = flops(model, x1, backward=False)
    model.freeze_backbone(True)
    model.train()
    f_frozen = flops(model, x1, backward=True)
    model.freeze_backbone(False)
    f_full = flops(model, x1, backward=True)
    model.eval()

    out = {"input_size": size, "batch_size": batch, "gflops_per_image": {
        "forward": round(f_fwd / 1e9, 3), "train_frozen_backbone": round(f_frozen / 1e9, 3),
        "train_unfrozen": round(f_full / 1e9, 3)}}
    # screening (the fast path's batched forward) and the four training set-ups, timed round-robin so that a
    # change of load on the shared machine hits every measurement alike
    predictor = Predictor(make_bundle(random_model(name)), device=device, fast=True)
    xb = torch.randn(batch, 3, size, size).to(device).contiguous(memory_format=torch.channels_last)
    calls = {"screening": (lambda: predictor.logits(xb), f_fwd, predictor.dtype)}
    for stage, frozen, f in (("frozen_backbone", True, f_frozen), ("unfrozen", False, f_full)):
        for label, dtype in (("fp32", None), ("bf16_autocast", torch.bfloat16))[:1 + (rates["bf16"] is not None)]:
            m = random_model(name).to(device, memory_format=torch.channels_last)
            m.freeze_backbone(frozen)
            m.train()
            calls[f"{stage}_{label}"] = (train_step_fn(m, batch, size, dtype, device), f, dtype)
    times = {k: [] for k in calls}
    for fn, _, _ in calls.values():
        fn()  # warm-up
    sync(device)
    for _ in range(iters):
        for k, (fn, _, _) in calls.items():
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    out["training"] = {} if rates["bf16"] is not None else {
        f"{stage}_bf16_autocast": {"images_per_s": None, "ideal_images_per_s": None, "efficiency": None}
        for stage in ("frozen_backbone", "unfrozen")}
    for k, (_, f, dtype) in calls.items():
        ips = batch / float(np.median(times[k]))
        peak = rates["bf16" if dtype is not None else "fp32"]
        row = {"images_per_s": round(ips, 2), "ideal_images_per_s": round(peak * 1e9 / f, 1),
               "efficiency": round(ips * f / (peak * 1e9), 3)}
        if k == "screening":
            out["screening"] = {"precision": predictor.precision["dtype"], **row}
        else:
            out["training"][k] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write results here")
    p.add_argument("--backbones", nargs="+", default=list(DEFAULT))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=3, help="timed iterations per measurement (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = idle cores by load average")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the models and matmuls run")
    p.add_argument("--force-bf16", action="store_true", help="measure bf16 also where it is emulated (slow)")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    info = machine_info()
    n = 8192 if args.device.startswith("cuda") else 2048  # a GPU reaches its matmul rate only on large matrices
    native_bf16 = fabric_precision("auto", torch.device(args.device).type) == "bf16-mixed"
    rates = {"fp32": matmul_gflops(torch.float32, n, device=args.device),
             "bf16": matmul_gflops(torch.bfloat16, n, device=args.device) if native_bf16 or args.force_bf16 else None}
    jpeg = phone_jpeg()
    decode_s = timed(lambda: load_image(jpeg, **decode_limits(256)), 5)  # as the fast path decodes it
    out = {"machine": info, "settings": {"threads": threads, "batch_size": args.batch_size, "iters": args.iters,
                                         "device": args.device},
           "matmul_gflops": {k: v if v is None else round(v, 1) for k, v in rates.items()}, "matmul_n": n,
           "bf16": ("measured" + ("" if native_bf16 else ", emulated (--force-bf16)") if rates["bf16"] is not None
                    else "not measured: no native bf16 here, so training's 'auto' runs fp32 (--force-bf16 to measure)"),
           "decode_12mp_jpeg_per_s_per_core": round(1 / decode_s, 1)}
    print(f"{info['cpu']} | {info['cores']} cores | torch {info['torch']} | threads {threads} | "
          f"load {info['load_avg_1min_at_start']}")
    print(f"matmul {n}^2: fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {num(rates['bf16'], '.0f')} GFLOP/s; "
          f"12 MP JPEG draft decode: {1 / decode_s:.1f}/s per core")
    hdr = (f"{'backbone':18} {'GF/img':>7} {'screen/s':>9} {'ideal':>7} {'eff':>6} | "
           f"{'frozen fp32':>11} {'frozen bf16':>11} {'full fp32':>9} {'full bf16':>9} {'ideal full bf16':>15}")
    print(hdr)
    print("-" * len(hdr))
    for name in args.backbones:
        r = bench(name, args.batch_size, args.iters, rates, args.device)
        out[name] = r
        tr, sc = r["training"], r["screening"]
        print(f"{name:18} {r['gflops_per_image']['forward']:7.2f} {sc['images_per_s']:9.1f} "
              f"{sc['ideal_images_per_s']:7.0f} {sc['efficiency']:6.1%} | "
              f"{tr['frozen_backbone_fp32']['images_per_s']:11.1f} "
              f"{num(tr['frozen_backbone_bf16_autocast']['images_per_s'], '11.1f')} "
              f"{tr['unfrozen_fp32']['images_per_s']:9.1f} {num(tr['unfrozen_bf16_autocast']['images_per_s'], '9.1f')} "
              f"{num(tr['unfrozen_bf16_autocast']['ideal_images_per_s'], '15.0f')}", flush=True)
    if rates["bf16"] is None:
        print(out["bf16"])
    return finish(out, args.json)



if __name__ == "__main__":
    raise SystemExit(main())
