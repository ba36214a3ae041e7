"""Caches of decoded, cropped and downsized training photos (on disk, and in memory), so only the first epoch decodes.

A 12-megapixel phone JPEG takes ~40 ms to decode even at 1/8 scale (the entropy-coded data must all be read);
the cached 256-pixel result loads in about a millisecond. Entries are keyed by a hash of everything that
determines the pixels: the absolute path, the file's size and mtime_ns, the crop box, the short side, the
cache format version, the decoder's version (core.dataset.DECODE_VERSION, if defined) and its draft limits, so
an edited or replaced photo, a new crop or another input size makes a new entry and never serves stale pixels.
Writes go to a temporary file renamed into place (os.replace is atomic), so several DataLoader workers - or
several DDP ranks on one node - can fill the same cache concurrently; at worst two of them decode the same photo
once each.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image
from torch.utils.data import get_worker_info

import core.dataset
from core.dataset import decode
from core.fileio import atomic_write
from core.images import CropBox

FORMAT_VERSION = 1
FORMATS = ("npy", "png")
MEMORY_CACHE_MB = 1024  # MemoryCache's default bound per loader: ~4,000 photos at a 256 px short side


class DecodeCache:
    """`get(path, crop, short_side)` returns the same RGB image as `core.dataset.decode`, decoding at most once.

    fmt 'npy' (default) stores raw uint8 arrays (fastest to load, ~260 KB per 256x341 image); 'png' stores
    lossless PNGs (about half the disk, ~2 ms more per load)."""

    def __init__(self, root: str | os.PathLike, fmt: str = "npy"):
        if fmt not in FORMATS:
            raise ValueError(f"cache format must be one of {FORMATS}, not {fmt!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fmt = fmt
        self.hits = 0    # per process (each DataLoader worker counts its own)
        self.misses = 0

    def key(self, path: str | os.PathLike, crop: CropBox | Mapping | None, short_side: int,
            interpolation: str = "bicubic") -> str:
        path = os.path.abspath(path)
        st = os.stat(path)
        payload = json.dumps([FORMAT_VERSION, _decode_version(), core.dataset.decode_limits(int(short_side)),
                              self.fmt, path, st.st_size, st.st_mtime_ns, _crop_tuple(crop), int(short_side),
                              interpolation])
        return hashlib.sha256(payload.encode()).hexdigest()

    def entry(self, path, crop, short_side, interpolation: str = "bicubic") -> Path:
        k = self.key(path, crop, short_side, interpolation)
        return self.root / k[:2] / f"{k}.{self.fmt}"

    def get(self, path: str | os.PathLike, crop: CropBox | Mapping | None, short_side: int,
            interpolation: str = "bicubic") -> Image.Image:
        try:
            target = self.entry(path, crop, short_side, interpolation)
        except OSError:  # missing/unreadable file: let the decoder report it in its own words
            return decode(str(path), crop, short_side, interpolation)
        if target.exists():
            try:
                img = self._read(target)
                self.hits += 1
                return img
            except (OSError, ValueError, EOFError):  # damaged entry (e.g. disk filled up): decode it again
                pass
        img = decode(str(path), crop, short_side, interpolation)
        self.misses += 1
        self._write(target, img)
        return img

    def _read(self, target: Path) -> Image.Image:
        if self.fmt == "npy":
            a = np.load(target, allow_pickle=False)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(f"{target}: not an RGB uint8 array")
            return Image.fromarray(a, "RGB")
        with Image.open(target) as im:
            im.load()
            return im.convert("RGB")

    def _write(self, target: Path, img: Image.Image) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                if self.fmt == "npy":
                    np.save(f, np.asarray(img.convert("RGB"), dtype=np.uint8), allow_pickle=False)
                else:
                    img.convert("RGB").save(f, "PNG", compress_level=1)
        try:
            atomic_write(target, write)
        except OSError:  # a full or read-only cache must not stop training: the image is still returned
            pass

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob(f"*/*.{self.fmt}"))


class MemoryCache:
    """`get(path, crop, short_side)` as DecodeCache, keeping each decoded photo in this process's memory.

    Training makes one per stage: every epoch after the first reads the photos from memory instead of decoding them
    again (the shared demo's PNGs: ~8 ms each to decode and resize, nothing from memory). `inner` (a DecodeCache) is
    asked on a miss, else core.dataset.decode. Bounded: at most `max_mb` of pixels, split evenly between a loader's
    worker processes (each holds what it loaded); photos beyond the bound are decoded every epoch, as without the
    cache, so a large dataset costs no more memory than `max_mb`. Entries are keyed by path, crop, size and filter,
    not by the file's contents: the cache lives for one stage of one run. Never pickled with its photos (a spawned
    worker starts empty)."""

    def __init__(self, inner: DecodeCache | None = None, max_mb: float = MEMORY_CACHE_MB):
        self.inner = inner
        self.max_bytes = int(max_mb * 2 ** 20)
        self._images: dict = {}
        self._bytes = 0
        self.hits = 0    # per process, like DecodeCache's
        self.misses = 0

    def get(self, path: str | os.PathLike, crop: CropBox | Mapping | None, short_side: int,
            interpolation: str = "bicubic") -> Image.Image:
        box = _crop_tuple(crop)
        key = (os.fspath(path), tuple(box) if box else None, int(short_side), interpolation)
        img = self._images.get(key)
        if img is not None:
            self.hits += 1
            return img
        if self.inner is not None:
            img = self.inner.get(path, crop, short_side, interpolation)
        else:
            img = decode(str(path), crop, short_side, interpolation)
        self.misses += 1
        size = img.width * img.height * len(img.getbands())
        if self._bytes + size <= self.budget():
            self._images[key] = img  # transforms return new images and never change this one
            self._bytes += size
        return img

    def budget(self) -> int:
        """Bytes this process may keep: the bound divided among the loader's workers."""
        info = get_worker_info()
        return self.max_bytes // (info.num_workers if info is not None else 1)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._images)

    def __getstate__(self):
        return {**self.__dict__, "_images": {}, "_bytes": 0}


def _decode_version():
    """core.dataset.DECODE_VERSION when defined: bump it whenever decode() would return different pixels (e.g. a new
    resize filter), and every entry made by the old decoder stops matching. The draft limits are in the key
    themselves, so retuning them (or the quality sizes they follow) needs no bump."""
    return getattr(core.dataset, "DECODE_VERSION", 1)


def _crop_tuple(crop: CropBox | Mapping | None):
    if crop is None:
        return None
    box = crop if isinstance(crop, CropBox) else CropBox.from_mapping(crop)
    return [box.left, box.top, box.width, box.height]
