"""How far JPEG draft decoding moves probabilities and blur scores, per draft rule, against a full decode.

    python benchmarks/draft_accuracy.py --json benchmarks/results/draft_accuracy_<cpu>.json

A JPEG can be decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (core.images.load_image). The smaller the
scale the faster, but a draft that comes too close to the model's resize target aliases. For each candidate
draft rule (the current one is core.dataset.decode_limits) this script measures, in fp32,
|P(draft) - P(full decode)| and the relative change of the blur score (core.quality.sharpness).

Photos (real pixels, from shared/data):
- `isic2017`: the ISIC 2017 JPEGs as they are (800-1024 px; only 1/2 drafts are possible);
- `phone-size`: the 1024 px photos (all 16 PAD-UFES-20 phone photos of that size, and ISIC 2017) enlarged
  (Lanczos) to a short side of 3000 px, as a 12 MP phone photo has, with mild sensor grain, saved as JPEG q92,
  so the decode reaches the 1/4 and 1/8 drafts. Detail above the original resolution is synthetic; the detail
  that the draft must not alias is real.
Models: the `shared_demo` bundle when `--bundle` points at one (a trained classifier), and random-weight
ConvNeXt-Tiny with its head rescaled to logit std 2 (as in predict_latency.py).
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path
import numpy as np
import torch
from PIL import Image

from common import REAL_PHOTOS, finish, machine_info, random_model, set_threads
from core.dataset import decode_limits
from core.images import load_image
from core.quality import sharpness
from core.transforms import eval_transform
from predict_latency import calibrate_head

# Candidate draft limits (load_image keyword arguments); `resize_to` is filled in per model.
CANDIDATES = {
    "margin 2, short floor 512 (DECODE_VERSION 3)": lambda n: {"min_side": max(2 * n, 512)},
    "margin 1.4, long floor 480 (DECODE_VERSION 4)": decode_limits,
    "margin 1 (draft to the target)": lambda n: {"min_side": n},
}
# Not a draft: the full decode resized with Lanczos instead of the weights' filter. It shows how much the
# models move under an equally reasonable resampling choice, the scale against which a draft's shift is read.
FILTER_SWAP = "full decode, Lanczos resize (reference: filter sensitivity)"


def phone_size_versions(n_isic: int, short: int = 3000, seed: int = 0) -> list[tuple[str, bytes]]:
    """Real 1024 px photos enlarged to a `short` px short side with grain, as q92 JPEG bytes."""
    rng = np.random.default_rng(seed)
    pad = sorted(p for p in REAL_PHOTOS["pad_ufes_20"].iterdir() if _size(p)[0] >= 1000)
    isic = sorted(p for p in REAL_PHOTOS["isic2017"].iterdir() if _size(p)[0] >= 1000)[:n_isic]
    out = []
    for p in pad + isic:
        img = load_image(str(p))
        k = short / min(img.size)
        big = img.resize((round(img.width * k), round(img.height * k)), Image.LANCZOS)
        a = np.asarray(big, np.float32) + rng.normal(0, 3, (big.height, big.width, 1)).astype(np.float32)
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
        out.append((p.name, buf.getvalue()))
    return out


def _size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def study(models: dict, photos: list[tuple[str, bytes | str]], resize_to: int) -> dict:
    """Per candidate: the draft scales reached, max / p95 |dP| per model, blur-score change."""
    full = [load_image(src) for _, src in photos]
    ref_p = {name: _probs(m, tf, full) for name, (m, tf) in models.items()}
    ref_s = np.array([sharpness(im) for im in full])
    out = {}
    for label, limits in {**CANDIDATES, FILTER_SWAP: None}.items():
        if limits is None:
            imgs = [_lanczos_short(im, resize_to) for im in full]
            row = {"limits": None, "scales": [], "n_drafted": 0}
        else:
            kw = limits(resize_to)
            imgs = [load_image(src, **kw) for _, src in photos]
            scales = [round(d.width / f.width, 3) for d, f in zip(imgs, full)]
            row = {"limits": kw, "scales": sorted(set(scales)), "n_drafted": int(sum(s < 1 for s in scales))}
        for name, (m, tf) in models.items():
            d = np.abs(_probs(m, tf, imgs) - ref_p[name])
            row[name] = {"max_abs_dp": round(float(d.max()), 4), "p95_abs_dp": round(float(np.quantile(d, .95)), 4)}
        if limits is not None:
            rel = np.abs(np.array([sharpness(im) for im in imgs]) / np.maximum(ref_s, 1e-9) - 1)
            row["blur_score_rel_change"] = {"max": round(float(rel.max()), 3),
                                            "median": round(float(np.median(rel)), 3)}
        out[label] = row
    return out


def _lanczos_short(img: Image.Image, target: int) -> Image.Image:
    """Short side to `target` (long side truncated, as torchvision's Resize) with Lanczos."""
    k = target / min(img.size)
    return img.resize((max(target, int(img.width * k)), max(target, int(img.height * k))), Image.LANCZOS)


def _probs(model, tf, imgs) -> np.ndarray:
    with torch.no_grad():
        return np.array([float(torch.sigmoid(model(tf(im).unsqueeze(0))).item()) for im in imgs])


def build_models(bundle_dir: str | None, calib_imgs) -> tuple[dict, int]:
    models = {}
    cx = random_model("convnext_tiny").eval()
    tf = eval_transform(cx.spec.preprocessing)
    calibrate_head(cx, [tf(im).unsqueeze(0) for im in calib_imgs])
    models["convnext_tiny (random, head std 2)"] = (cx, tf)
    if bundle_dir:
        from core.bundle import load_bundle
        b = load_bundle(bundle_dir)
        run = Path(bundle_dir).resolve()
        run = run.parent if run.name == "bundle" else run
        models[f"{b.spec.name} (trained: {run.name})"] = (b.model.eval(), eval_transform(b.spec.preprocessing))
    sides = {tf.transforms[0].size for _, tf in models.values()}
    if len(sides) != 1:
        raise SystemExit(f"models resize to different sizes {sides}; compare them in separate runs")
    return models, sides.pop()


def table(out: dict) -> str:
    """The results as a markdown table (also used by report.py)."""
    names = out["models"]
    rows = [f"Resize target {out['resize_to']} px; |dP| against a full decode, fp32.", "",
            "| set | decode | draft scales | drafted | " + " | ".join(f"{n}: max / p95 \\|dP\\|" for n in names)
            + " | blur score change: max / median |",
            "|---|---|---|---:|" + "---|" * len(names) + "---|"]
    for s, cands in out["sets"].items():
        for label, r in cands.items():
            cells = " | ".join(f"{r[n]['max_abs_dp']:.4f} / {r[n]['p95_abs_dp']:.4f}" for n in names)
            b = r.get("blur_score_rel_change")
            blur = f"{b['max']:.1%} / {b['median']:.1%}" if b else "-"
            rows.append(f"| {s} ({out['n_photos'][s]}) | {label} | {r['scales'] or '-'} | {r['n_drafted']} | {cells} "
                        f"| {blur} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write results here")
    p.add_argument("--bundle", help="a trained model bundle folder to include (e.g. runs/shared_demo/bundle)")
    p.add_argument("--isic", type=int, default=60, help="ISIC 2017 JPEGs used as they are")
    p.add_argument("--large", type=int, default=40, help="ISIC 2017 photos among the enlarged ones")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    set_threads(a.threads)
    if not REAL_PHOTOS["isic2017"].is_dir():
        raise SystemExit("needs ../shared/data (ISIC 2017 and PAD-UFES-20 photos)")
    isic = [(q.name, str(q)) for q in sorted(REAL_PHOTOS["isic2017"].iterdir()) if q.suffix.lower() == ".jpg"]
    isic = isic[:a.isic]
    large = phone_size_versions(a.large)
    models, resize_to = build_models(a.bundle, [load_image(s) for _, s in isic[:24]])
    out = {"machine": machine_info(), "resize_to": resize_to, "models": list(models),
           "sets": {"isic2017": study(models, isic, resize_to), "phone-size": study(models, large, resize_to)},
           "n_photos": {"isic2017": len(isic), "phone-size": len(large)}}
    print(table(out))
    return finish(out, a.json)


if __name__ == "__main__":
    raise SystemExit(main())
