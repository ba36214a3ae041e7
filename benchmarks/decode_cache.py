"""What the decode cache saves per training image: full-photo decode+resize against a cache hit.

    python benchmarks/decode_cache.py --json benchmarks/results/decode_cache_<cpu>.json

Per photo type (synthetic 12 MP phone JPEG; the real ISIC 2017 JPEGs and PAD-UFES-20 PNGs in shared/data):
median ms of core.dataset.decode (what every epoch pays without the cache) and of DecodeCache.get on a warm
cache (npy and png entries), at the ConvNeXt short side (256).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from common import REAL_PHOTOS, machine_info, phone_jpeg, set_threads, finish
from core.cache import DecodeCache
from core.dataset import decode
from throughput import timed

SHORT_SIDE = 256


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json")
    p.add_argument("--photos", type=int, default=10)
    args = p.parse_args(argv)
    set_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        phone = tmp / "phone.jpg"
        phone.write_bytes(phone_jpeg())
        sets = {"phone_12mp_jpeg": [phone]}
        for name, folder in REAL_PHOTOS.items():
            if folder.is_dir():
                sets[name] = sorted(folder.iterdir())[:args.photos]
        out = {"machine": machine_info(), "short_side": SHORT_SIDE}
        print(f"{'photos':18} {'decode ms':>10} {'npy hit ms':>11} {'png hit ms':>11} {'npy KB':>7} {'png KB':>7}")
        for name, paths in sets.items():
            row = {}
            row["decode_ms"] = float(np.median([timed(lambda q=q: decode(str(q), None, SHORT_SIDE), 3) for q in paths])) * 1e3
            for fmt in ("npy", "png"):
                cache = DecodeCache(tmp / f"cache_{fmt}_{name}", fmt=fmt)
                row[f"{fmt}_hit_ms"] = float(np.median([timed(lambda q=q: cache.get(str(q), None, SHORT_SIDE), 3)
                                                        for q in paths])) * 1e3
                sizes = [cache.entry(str(q), None, SHORT_SIDE).stat().st_size for q in paths]
                row[f"{fmt}_entry_kb"] = float(np.mean(sizes)) / 1024
            row = {k: round(v, 2) for k, v in row.items()}
            row["n"] = len(paths)
            out[name] = row
            print(f"{name:18} {row['decode_ms']:10.1f} {row['npy_hit_ms']:11.2f} {row['png_hit_ms']:11.2f} "
                  f"{row['npy_entry_kb']:7.0f} {row['png_entry_kb']:7.0f}")
    return finish(out, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
