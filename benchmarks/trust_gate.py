"""Does the model know when not to answer? Gate acceptance/refusal per set, gate methods compared, calibration.

    python benchmarks/trust_gate.py --run runs/shared_demo --json benchmarks/results/trust_gate.json

For a trained run (its splits/ and bundle/), computes the model's pooled features (fp32, decoded as the app and
training decode) for:
- in-distribution: the run's train (descriptor), val (threshold) and test (unseen patients) photos;
- unseen lesion photos from other domains: both dermoscopic ISIC sets in shared/data, separately;
- everyday non-skin photos: the sample photos shipped inside scikit-image's wheel (no downloads) and
  scikit-learn's two sample images;
- synthetic junk made here: uniform colours, noise, rendered text, screenshot-like images.
Then fits every gate variant on train, sets its threshold on val only (core.ood.fit_gate) and reports the
share of each set accepted, plus the threshold-free ROC-AUC of "test photo vs set" on the gate score. The quality
refusals (core.quality) are reported beside the gate, and both together (what the app does).
Calibration: temperature, Platt and (for comparison only) isotonic maps fitted on val logits, scored on the
test photos (held out): Brier and ECE with 95% patient-bootstrap intervals.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont

from common import SHARED, finish, machine_info, set_threads
from core import calibration as cal
from core import ood
from core.bundle import load_bundle
from core.dataset import decode_limits
from core.embeddings import embed
from core.evaluation import groups_of
from core.images import load_image
from core.manifest import read_manifest
from core.quality import quality_warnings, refusals

# scikit-image's bundled photos (inside the wheel; no pooch download). Scientific images (cells, retina, moon,
# telescope) count as "not a skin photo" too: a user could upload anything.
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
                  "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon",
                  "stereo_motorcycle", "page", "retina", "rocket", "text")
GATE_VARIANTS = {"knn k=1": ("knn", 1), "knn k=5": ("knn", 5), "knn k=10": ("knn", 10),
                 "knn k=20": ("knn", 20), "mahalanobis (Ledoit-Wolf)": ("mahalanobis", None)}


# -------------------------------------------------------------------- image sets
def everyday_photos() -> dict[str, Image.Image]:
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images
    out = {}
    for name in SKIMAGE_PHOTOS:
        arr = getattr(skdata, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr  # stereo_motorcycle: (left, right, disparity)
        arr = np.asarray(arr).astype(np.float64) if np.asarray(arr).dtype != np.uint8 else np.asarray(arr)
        if arr.dtype != np.uint8:
            arr = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-9)).astype(np.uint8)
        out[f"skimage:{name}"] = Image.fromarray(arr).convert("RGB")
    for name, arr in zip(("china", "flower"), load_sample_images().images):
        out[f"sklearn:{name}"] = Image.fromarray(arr).convert("RGB")
    return out


def junk_images(seed: int = 0) -> dict[str, Image.Image]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, rgb in {"black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128),
                      "skin": (224, 172, 150), "dark_skin": (110, 70, 50), "red": (200, 30, 30),
                      "blue": (40, 60, 200), "green": (40, 160, 60)}.items():
        out[f"uniform:{name}"] = Image.new("RGB", (640, 480), rgb)
    for i in range(4):
        out[f"noise:gaussian{i}"] = Image.fromarray(np.clip(rng.normal(128, 20 + 20 * i, (480, 640, 3)), 0, 255)
                                                    .astype(np.uint8))
        out[f"noise:uniform{i}"] = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
        low = rng.integers(0, 256, (6 + 4 * i, 8 + 4 * i, 3)).astype(np.uint8)
        out[f"noise:blobs{i}"] = Image.fromarray(low).resize((640, 480), Image.Resampling.BICUBIC)
    words = ("Patient letter: follow-up appointment in dermatology clinic, bring previous reports. "
             "The quick brown fox jumps over the lazy dog 0123456789").split()
    for i in range(6):
        bg, fg = ((255, 255, 255), (0, 0, 0)) if i % 2 == 0 else ((250, 245, 230), (30, 30, 90))
        img = Image.new("RGB", (640, 480), bg)
        d = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=14 + 6 * i)
        y = 10
        while y < 470:
            d.text((10, y), " ".join(rng.choice(words, 8)), fill=fg, font=font)
            y += 18 + 7 * i
        out[f"text:{i}"] = img
    for i in range(6):
        out[f"screenshot:{i}"] = _screenshot(rng, dark=i % 2 == 1)
    return out


def _screenshot(rng, dark: bool) -> Image.Image:
    """A desktop-app-like frame: title bar, sidebar, buttons, text lines, a chart."""
    bg, fg, panel = ((30, 30, 35), (220, 220, 220), (45, 45, 55)) if dark else \
        ((248, 248, 250), (30, 30, 30), (230, 232, 238))
    img = Image.new("RGB", (800, 600), bg)
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    d.rectangle((0, 0, 800, 28), fill=(60, 90, 160))
    d.text((10, 7), "skinscreen - Dashboard", fill=(255, 255, 255), font=font)
    d.rectangle((0, 28, 170, 600), fill=panel)
    for j in range(8):
        d.text((12, 45 + 30 * j), f"Menu item {j + 1}", fill=fg, font=font)
    for j in range(3):
        d.rounded_rectangle((200 + 130 * j, 50, 310 + 130 * j, 80), 6, fill=tuple(int(c) for c in
                                                                              rng.integers(60, 220, 3)))
    for j in range(12):
        d.text((200, 110 + 20 * j), "Lorem ipsum dolor sit amet " * int(rng.integers(1, 3)), fill=fg, font=font)
    vals = rng.integers(20, 150, 10)
    for j, v in enumerate(vals):
        d.rectangle((520 + 25 * j, 560 - v, 540 + 25 * j, 560), fill=(80, 140, 220))
    return img


def write_images(images: dict[str, Image.Image], folder: Path) -> pd.DataFrame:
    """PNG files (lossless, like a screenshot) in a temp folder, as a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, img) in enumerate(images.items()):
        path = folder / f"{i:03d}.png"
        img.save(path)
        rows.append({"image": str(path), "label": 0, "name": name})
    return pd.DataFrame(rows)


def shared_set(name: str) -> pd.DataFrame:
    root = SHARED / "data" / name
    df = pd.read_csv(root / "labels.csv")
    df["image"] = [str(root / "images" / i) for i in df["image"]]
    return df


# -------------------------------------------------------------------- measures
def quality_refused(df: pd.DataFrame, resize_to: int) -> np.ndarray:
    kw = decode_limits(resize_to)
    return np.array([bool(refusals(quality_warnings(load_image(p, **kw)))) for p in df["image"]])


def auc_vs(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(an out-of-distribution photo scores higher than an in-distribution one), ties half."""
    from sklearn.metrics import roc_auc_score
    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a trained run folder (splits/ and bundle/)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000)
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    run = Path(args.run)
    bundle = load_bundle(run)
    model, pp = bundle.model.float().eval(), bundle.spec.preprocessing
    split_file = sorted((run / "splits").glob("*.csv"))[-1]
    runs_df = read_manifest(split_file)
    sets: dict[str, pd.DataFrame] = {s: runs_df[runs_df["split"] == s].reset_index(drop=True)
                                     for s in ("train", "val", "test")}
    sets["isic2017 (dermoscopic)"] = shared_set("isic2017_dermoscopic_subset")
    sets["isic 9-class 180px (dermoscopic)"] = shared_set("isic_9class_test_180px")
    tmp = tempfile.TemporaryDirectory()
    sets["everyday non-skin photos"] = write_images(everyday_photos(), Path(tmp.name) / "everyday")
    sets["synthetic junk"] = write_images(junk_images(), Path(tmp.name) / "junk")

    feats, logits = {}, {}
    with torch.no_grad():
        for name, df in sets.items():
            feats[name] = embed(model, df, pp, device="cpu", num_workers=0)
            logits[name] = model.head(torch.from_numpy(feats[name])).squeeze(1).double().numpy()
            print(f"embedded {name}: {len(df)}")
    quality = {name: quality_refused(df, pp.resize_to) for name, df in sets.items() if name not in ("train",)}

    evaluated = [s for s in sets if s not in ("train", "val")]
    gates = {}
    for label, (method, k) in GATE_VARIANTS.items():
        gate = ood.fit_gate(feats["train"], feats["val"], method, k=k or ood.DEFAULT_K)
        scores = {s: gate.score(feats[s]) for s in sets if s != "train"}
        gates[label] = {
            "threshold": gate.threshold, "val_accepted": float(np.mean(scores["val"] <= gate.threshold)),
            "accepted": {s: float(np.mean(scores[s] <= gate.threshold)) for s in evaluated},
            "accepted_with_quality": {s: float(np.mean((scores[s] <= gate.threshold) & ~quality[s]))
                                      for s in evaluated},
            "auc_test_vs": {s: auc_vs(scores["test"], scores[s]) for s in evaluated if s != "test"},
            "refused_names": {s: [n for n, sc in zip(sets[s]["name"], scores[s]) if sc > gate.threshold]
                              for s in ("everyday non-skin photos", "synthetic junk")},
            "accepted_names": {s: [n for n, sc in zip(sets[s]["name"], scores[s]) if sc <= gate.threshold]
                               for s in ("everyday non-skin photos", "synthetic junk")},
        }

    calib = calibration_results(sets, logits, bundle.threshold, args.n_boot)
    out = {"benchmark": "trust_gate", "run": str(run), "machine": machine_info(), "threads": threads,
           "sets": {s: int(len(df)) for s, df in sets.items()},
           "quality_refused": {s: int(q.sum()) for s, q in quality.items()},
           "gate_accept_quantile": ood.ACCEPT_QUANTILE, "gates": gates, "calibration": calib}
    print_tables(out, evaluated)
    tmp.cleanup()
    return finish(out, args.json)


def calibration_results(sets, logits, raw_threshold, n_boot) -> dict:
    from sklearn.isotonic import IsotonicRegression
    val, test = sets["val"], sets["test"]
    yv, yt = val["label"].to_numpy(), test["label"].to_numpy()
    groups = groups_of(test)
    raw = 1 / (1 + np.exp(-logits["test"]))
    res = {"raw": cal.calibration_report(yt, raw, groups=groups, n_boot=n_boot)}
    for method in ("temperature", "platt", "auto"):
        c = cal.fit_calibration(logits["val"], yv, method=method, groups=groups_of(val), n_boot=0)
        res[method] = {**cal.calibration_report(yt, c.apply_logit(logits["test"]), groups=groups, n_boot=n_boot),
                       "map": {k: v for k, v in c.to_meta().items() if k != "bootstrap"},  # refits: bundle only
                       "threshold_calibrated": c.threshold(raw_threshold),
                       "same_verdicts": bool(np.array_equal(raw >= raw_threshold,
                                                            c.apply_logit(logits["test"]) >=
                                                            c.threshold(raw_threshold)))}
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(logits["val"], yv)
    res["isotonic (comparison only)"] = cal.calibration_report(yt, iso.predict(logits["test"]), groups=groups,
                                                               n_boot=n_boot)
    for entry in res.values():
        entry.pop("reliability", None) if "map" not in entry else None
    return res


def print_tables(out: dict, evaluated: list[str]) -> None:
    print(f"\nGate: threshold = {out['gate_accept_quantile']:.1%} quantile of validation scores; share ACCEPTED "
          "(gate alone / gate + quality refusals)")
    head = ["method", "val"] + evaluated
    print(" | ".join(head))
    for label, g in out["gates"].items():
        cells = [label, f"{g['val_accepted']:.3f}"] + [
            f"{g['accepted'][s]:.3f}/{g['accepted_with_quality'][s]:.3f}" for s in evaluated]
        print(" | ".join(cells))
    print("\nROC-AUC of gate score, test photos vs each set (1 = perfectly separated)")
    for label, g in out["gates"].items():
        print(label, " | ".join(f"{s}: {v:.3f}" for s, v in g["auc_test_vs"].items()))
    print("\nquality refusals per set:", out["quality_refused"])
    print("\nCalibration on the test photos (maps fitted on validation):")
    for name, r in out["calibration"].items():
        b, e = r["brier"], r["ece"]
        print(f"{name:28s} Brier {b['value']:.4f} {_ci(b)}  ECE {e['value']:.4f} {_ci(e)}")


def _ci(entry) -> str:
    ci = entry.get("ci95")
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


if __name__ == "__main__":
    raise SystemExit(main())
