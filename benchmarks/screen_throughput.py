"""Screening throughput end to end (`train.screen.screen`): images/s and how busy the cores are, per engine and
number of decoding workers.

    python benchmarks/screen_throughput.py --json benchmarks/results/screen_throughput_<cpu>.json
    python benchmarks/screen_throughput.py --backbones convnext_tiny --photos phone --n 48 --workers 1 2

Photos: `phone` = synthetic 12 MP JPEGs (4000x3000, q92: the decode is expensive, 1/8 draft), `pad` = the
PAD-UFES-20 phone photos in ../shared (300-1024 px: the decode is cheap, the model dominates). CPU use is the
process's and its DataLoader workers' CPU time over wall time x cores (psutil): 100% = every core busy for the
whole run. Random weights; the engine's load-time choice is recorded. Shared machine: the load is recorded too.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil

from common import REAL_PHOTOS, finish, machine_info, make_bundle, phone_jpeg, random_model, set_threads
from core.inference import Predictor
from train.screen import screen


def photo_paths(kind: str, n: int, folder: Path) -> list[str]:
    if kind == "phone":
        data = [phone_jpeg(seed=i) for i in range(4)]  # 4 distinct photos, repeated: the decode cost is the same
        paths = []
        for i in range(n):
            p = folder / f"phone_{i:03d}.jpg"
            p.write_bytes(data[i % len(data)])
            paths.append(str(p))
        return paths
    pad = REAL_PHOTOS["pad_ufes_20"]
    if not pad.is_dir():
        raise SystemExit(f"{pad} not found: use --photos phone")
    files = sorted(p for p in pad.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return [str(files[i % len(files)]) for i in range(n)]


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of this process and of its children that have finished (the DataLoader workers, once joined)."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def run_once(predictor: Predictor, df: pd.DataFrame, batch: int, workers: int) -> dict:
    proc = psutil.Process()
    c0, t0 = cpu_seconds(proc), time.perf_counter()
    table = screen(predictor, df, batch_size=batch, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(proc) - c0
    cores = len(psutil.Process().cpu_affinity() or []) or psutil.cpu_count()
    assert (table["status"] == "scored").all(), table["status"].value_counts()
    return {"images_per_s": round(len(df) / wall, 1), "seconds": round(wall, 2),
            "cpu_busy": round(cpu / (wall * cores), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json")
    p.add_argument("--backbones", nargs="+", default=["convnext_tiny", "mobilenetv2_100"])
    p.add_argument("--photos", nargs="+", default=["phone", "pad"], choices=["phone", "pad"])
    p.add_argument("--n", type=int, default=64, help="photos per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to compare")
    p.add_argument("--engines", nargs="+", default=["pytorch", "onnxruntime"])
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    out = {"machine": machine_info(), "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    out["settings"]["threads"] = threads
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones:
            model = random_model(name)
            preds = {e: Predictor(make_bundle(model), device="cpu", engine=e) for e in args.engines}
            out[name] = {"engine_records": {e: pr.engine for e, pr in preds.items()}}
            for kind in args.photos:
                df = pd.DataFrame({"image": photo_paths(kind, args.n, Path(tmp))})
                res = {}
                for e, pr in preds.items():
                    screen(pr, df.head(args.batch_size), batch_size=args.batch_size, workers=0, progress=False)
                    for w in args.workers:
                        r = run_once(pr, df, args.batch_size, w)
                        res[f"{e}_workers{w}"] = r
                        print(f"{name:18} {kind:6} {e:12} workers {w}: {r['images_per_s']:6.1f} img/s, "
                              f"cores busy {r['cpu_busy']:.0%}", flush=True)
                out[name][kind] = res
    return finish(out, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
