"""Single-photo latency: the naive path against Predictor's fast path per inference engine, plus accuracy checks.

    python benchmarks/predict_latency.py --json benchmarks/results/predict_latency_<cpu>.json
    python benchmarks/predict_latency.py --backbones convnext_tiny mobilenetv2_100 --repeats 9 --threads 2
    python benchmarks/predict_latency.py --device cuda --json benchmarks/results/predict_latency_<gpu>.json

NAIVE: full decode of a 12 MP phone JPEG, torchvision eval transform on the full image, fp32 model (NCHW),
a no-grad forward for the probability, then pytorch-grad-cam's GradCAM (forward + backward).
FAST: Predictor(fast=True, engine=E).predict_source(jpeg_bytes): draft decode, the feature map from engine E
(`pytorch`: channels-last, in the precision the load-time check chose; `onnxruntime`: the fp32 ONNX graph;
`auto`: whichever core.engine's load-time measurement picks, recorded), head-only Grad-CAM, plus the quality checks
(the naive path skips them). The naive and fast calls alternate so all see the same load on a shared machine;
medians after warm-up. `fast_ms` / `ratio` are the `auto` engine's (what the app does), the per-engine numbers are
under `engines`. `batch` times a batch of --batch photo-like inputs per engine: the screening path
(Predictor.outputs) and the embedding path (fp32 pooled features, as core.embeddings computes them).
The machine's instruction set is recorded (`machine.isa`, `machine.isa_class`): results are only comparable within
one class (AVX2-only laptops, AVX-512, AMX with native bf16), so run it unchanged on each class of machine.

Accuracy, on real photos from shared/data (random weights: the head's last layer is rescaled so that the
fp32 logits over these photos have mean 0 and standard deviation 2, as a trained classifier's do; a raw
random head barely reacts to its input and would make every difference look small):
- max_abs_prob_diff: |P_fast - P_fp32| on the identical input tensor (the fast path's precision and CAM-free
  head evaluation against the fp32 reference model);
- max_abs_prob_diff_vs_naive: |P_fast - P_naive| end to end (draft vs full decode and resize, plus precision);
- cam_corr (mean) / cam_corr_min: Pearson correlation of the fast heat-map with pytorch-grad-cam's GradCAM
  on the backbone's Grad-CAM layer, fp32, same decoded photo.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from common import (DEFAULT_BACKBONES, TFLITE_WEIGHTS, machine_info, make_bundle, median_ms, phone_jpeg,
                    random_model, real_photos, set_threads, finish)
import core.engine as engine_mod
import core.inference as inf
from core.device import fast_dtype, ieee_fp32
from core.gradcam import reference_cam
from core.images import load_image
from core.inference import Predictor
from core.transforms import eval_transform

LOGIT_STD = 2.0
ENGINES = ("pytorch", "onnxruntime", "auto")


def calibrate_head(model, inputs: list[torch.Tensor]) -> None:
    """Rescale the last head layer so fp32 logits over `inputs` have mean 0 and std LOGIT_STD."""
    with torch.no_grad():
        z = torch.cat([model(x) for x in inputs]).flatten()
        std = float(z.std())
        if len(z) < 2 or std < 1e-12:
            return
        last = model.head[-1]
        a = LOGIT_STD / std
        last.weight.mul_(a)
        last.bias.sub_(float(z.mean())).mul_(a)


def naive_predict(model, tf, data) -> tuple[float, np.ndarray, dict]:
    t0 = time.perf_counter()
    img = load_image(data)  # full resolution
    t1 = time.perf_counter()
    device = next(model.parameters()).device
    x = tf(img).unsqueeze(0).to(device)
    t2 = time.perf_counter()
    with torch.no_grad(), ieee_fp32(device):  # the fp32 reference is IEEE fp32 on a GPU too (no TF32)
        prob = float(torch.sigmoid(model(x)).item())
    t3 = time.perf_counter()
    with ieee_fp32(device):
        cam = reference_cam(model, x)[0]
    t4 = time.perf_counter()
    return prob, cam, {"decode": t1 - t0, "transform": t2 - t1, "forward": t3 - t2, "gradcam": t4 - t3}


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() < 1e-12 and b.std() < 1e-12:
        return 1.0
    if a.std() < 1e-12 or b.std() < 1e-12:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def accuracy(predictor, naive_model, tf, photos, with_naive: bool) -> dict:
    e2e, same, corrs = [], [], []
    for path in photos:
        pred = predictor.predict_source(str(path))
        if with_naive:
            e2e.append(abs(pred.prob - naive_predict(naive_model, tf, str(path))[0]))
        img = load_image(str(path), **predictor.decode_kw)  # the fast path's decode
        x, _ = predictor.prepare(img)
        with torch.no_grad(), ieee_fp32(x.device):
            p32 = float(torch.sigmoid(naive_model(x.contiguous())).item())
        same.append(abs(pred.prob - p32))
        with ieee_fp32(x.device):
            corrs.append(corr(pred.cam, reference_cam(naive_model, x.contiguous())[0]))
    out = {"max_abs_prob_diff": round(max(same), 5), "cam_corr": round(float(np.mean(corrs)), 4),
           "cam_corr_min": round(float(np.min(corrs)), 4)}
    if with_naive:
        out["max_abs_prob_diff_vs_naive"] = round(max(e2e), 5)
    return out


def batch_ms(predictors: dict, model, batch: int, reps: int = 2, device: str = "cpu") -> dict:
    """Median ms for a batch of `batch` photo-like inputs: screening (Predictor.outputs, per engine) and embeddings
    (fp32 pooled features: PyTorch's backbone vs the ONNX graph). One untimed call each first; calls alternate."""
    x = inf.check_inputs(model.spec.preprocessing, device, n=batch)
    fns = {f"screen_{e}": p.outputs for e, p in predictors.items() if e != "auto"}
    backbone = copy.deepcopy(model.backbone).eval()
    fns["embed_pytorch"] = lambda t: backbone(t.contiguous()).cpu()  # .cpu(): a GPU call returns before it ends
    # a Predictor holds one feature engine per ensemble member (one here); the ONNX Runtime one, if any was built
    ort = next((f for p in predictors.values() for f in p._features if isinstance(f, engine_mod.OrtFeatures)), None)
    if ort is not None:
        fns["embed_onnxruntime"] = ort.pooled
    with torch.no_grad():
        ms = engine_mod.measure_ms(fns, x, time.perf_counter, warmup=1, reps=reps)
    return {"batch": batch, "ms": ms, "ms_per_image": {k: round(v / batch, 2) for k, v in ms.items()}}


def bench_backbone(name: str, jpeg: bytes, photos, repeats: int, warmup: int, engines, batch: int,
                   device: str = "cpu") -> dict:
    model = random_model(name)
    pp = model.spec.preprocessing
    tf = eval_transform(pp)
    calibrate_head(model, [tf(load_image(p)).unsqueeze(0) for p in photos])
    naive_model = copy.deepcopy(model).to(device).eval()  # fp32, default (NCHW) memory format
    predictors, init_s = {}, {}
    for e in engines:
        t0 = time.perf_counter()
        predictors[e] = Predictor(make_bundle(copy.deepcopy(model)), device=device, fast=True, engine=e)
        init_s[e] = round(time.perf_counter() - t0, 2)

    # ---- latency, interleaved: naive, then each engine, in every repeat
    for _ in range(warmup):
        naive_predict(naive_model, tf, jpeg)
        for p in predictors.values():
            p.predict_source(jpeg)
    naive_t, naive_parts = [], []
    fast_t = {e: [] for e in engines}
    fast_parts = {e: [] for e in engines}
    for _ in range(repeats):
        t = time.perf_counter()
        *_, parts = naive_predict(naive_model, tf, jpeg)
        naive_t.append(time.perf_counter() - t)
        naive_parts.append(parts)
        for e, p in predictors.items():
            t = time.perf_counter()
            pred = p.predict_source(jpeg)
            fast_t[e].append(time.perf_counter() - t)
            fast_parts[e].append(pred.timings_ms)
    naive_ms = median_ms(naive_t)

    # ---- accuracy on real photos (auto computes exactly what the engine it chose computes)
    per_engine = {}
    for e, p in predictors.items():
        chosen = p.engine["engine"]
        acc = per_engine[chosen]["accuracy"] if e == "auto" and chosen in per_engine else \
            accuracy(p, naive_model, tf, photos, with_naive=True)
        fast_ms = median_ms(fast_t[e])
        per_engine[e] = {"fast_ms": fast_ms, "ratio": round(naive_ms / fast_ms, 2), "accuracy": acc,
                         "engine": p.engine, "precision": p.precision, "predictor_init_s": init_s[e],
                         "fast_breakdown_ms": {k: round(float(np.median([q[k] for q in fast_parts[e]])), 2)
                                               for k in fast_parts[e][0]},
                         "fast_all_ms": [round(t * 1e3, 1) for t in fast_t[e]]}
    main_engine = "auto" if "auto" in per_engine else engines[0]
    main = per_engine[main_engine]

    out_forced = None
    ref = predictors.get("pytorch") or predictors[main_engine]
    if ref.precision["dtype"] == "float32" and fast_dtype(ref.device) is not None:
        # what the rejected reduced precision would have given (the evidence for the fallback)
        saved = inf.FEATURE_TOLERANCE, inf.PRECISION_TOLERANCE
        inf.FEATURE_TOLERANCE = inf.PRECISION_TOLERANCE = float("inf")
        try:
            forced = Predictor(make_bundle(copy.deepcopy(naive_model)), device=device, fast=True, engine="pytorch")
        finally:
            inf.FEATURE_TOLERANCE, inf.PRECISION_TOLERANCE = saved
        forced_t = []
        for _ in range(repeats):
            t = time.perf_counter()
            forced.predict_source(jpeg)
            forced_t.append(time.perf_counter() - t)
        fa = accuracy(forced, naive_model, tf, photos, with_naive=False)
        out_forced = {"dtype": forced.precision["dtype"], "fast_ms": median_ms(forced_t),
                      "max_abs_prob_diff": fa["max_abs_prob_diff"], "cam_corr_min": fa["cam_corr_min"],
                      "feature_rel_err": forced.precision["feature_rel_err"]}

    return {
        "naive_ms": naive_ms, "fast_ms": main["fast_ms"], "ratio": main["ratio"], "fast_engine": main_engine,
        "auto_chose": predictors["auto"].engine["engine"] if "auto" in predictors else None,
        **main["accuracy"], "n_photos": len(photos),
        "fast_precision": ref.precision,
        "rejected_precision_if_forced": out_forced,
        "weights": "shared/weights TFLite ImageNet backbone" if name == "mobilenetv2_100_tflite" else "random",
        "input_size": pp.input_size,
        "predictor_init_s": main["predictor_init_s"],
        "naive_breakdown_ms": {k: median_ms([p[k] for p in naive_parts]) for k in naive_parts[0]},
        "fast_breakdown_ms": main["fast_breakdown_ms"],
        "engines": per_engine,
        "batch": batch_ms(predictors, naive_model, batch, device=device) if batch else None,
        "naive_all_ms": [round(t * 1e3, 1) for t in naive_t], "fast_all_ms": main["fast_all_ms"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write results here")
    p.add_argument("--backbones", nargs="+", default=None,
                   help=f"default: {' '.join(DEFAULT_BACKBONES)} (+ mobilenetv2_100_tflite if its weights exist)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--photos", type=int, default=6, help="real photos per data set for the accuracy checks")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = idle cores by load average")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES,
                   help="inference engines of the fast path (default: all three)")
    p.add_argument("--batch", type=int, default=32, help="batch size of the screening/embedding timing; 0 = skip")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or mps: where both paths run the model")
    args = p.parse_args(argv)
    backbones = args.backbones or list(DEFAULT_BACKBONES) + (
        ["mobilenetv2_100_tflite"] if TFLITE_WEIGHTS.is_file() else [])
    threads = set_threads(args.threads)
    info = machine_info()
    jpeg = phone_jpeg()
    photos = real_photos(args.photos)
    out = {"machine": info, "settings": {"repeats": args.repeats, "warmup": args.warmup, "threads": threads,
                                         "engines": args.engines, "batch": args.batch,
                                         "device": args.device,
                                         "phone_jpeg": "synthetic 4000x3000, quality 92",
                                         "phone_jpeg_bytes": len(jpeg), "photos": [str(p.name) for p in photos]}}
    print(f"{info['cpu']} | {info['cores']} cores | {info.get('isa_class')} | torch {info['torch']} | threads "
          f"{threads} | bf16 {info['cpu_bf16']} | load {info['load_avg_1min_at_start']}")
    cols = "".join(f"{e + ' ms':>16}" for e in args.engines)
    hdr = f"{'backbone':24} {'naive ms':>9}{cols} {'ratio':>6} {'max|dP|':>8} {'min r':>7}  auto chose / precision"
    print(hdr)
    print("-" * len(hdr))
    for name in backbones:
        r = bench_backbone(name, jpeg, photos, args.repeats, args.warmup, args.engines, args.batch, args.device)
        out[name] = r
        fp = r["fast_precision"]
        err = f" ({fp['feature_rel_err']:.2%})" if fp.get("feature_rel_err") is not None else ""
        ms = "".join(f"{r['engines'][e]['fast_ms']:16.1f}" for e in args.engines)
        print(f"{name:24} {r['naive_ms']:9.1f}{ms} {r['ratio']:6.2f} {r['max_abs_prob_diff']:8.4f} "
              f"{r['cam_corr_min']:7.4f}  {r['auto_chose']} / {fp['dtype']}{err}", flush=True)
        if r["batch"]:
            print(f"{'':24} batch {r['batch']['batch']} ms/image: " + ", ".join(
                f"{k} {v:.1f}" for k, v in r["batch"]["ms_per_image"].items()), flush=True)
    return finish(out, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
