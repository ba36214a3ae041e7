"""A torch Dataset over manifest rows: decode (EXIF, RGB, crop), bound the size, transform."""
from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from core.cropbox import box_problem
from core.images import ImageLoadError, decoded_size, load_image
from core.manifest import ImportReport, ManifestError, crop_of
from core.quality import MIN_SIDE, WORK_LONG_SIDE
from core.transforms import resize_short


# JPEGs are draft-decoded (DCT-domain 1/2, 1/4, 1/8) no further than DRAFT_MARGIN x the short side the model
# resizes to, then resized. With 1.4 a 12 MP 4:3 phone photo (3000 px short side) decodes at 1/8 (500 x 375),
# which takes a tenth off a single-photo prediction. Any draft moves probabilities against a full decode;
# benchmarks/draft_accuracy.py measures by how much (real photos enlarged to phone size: p95 about 0.02 for the
# 1/8 draft of margin 1.4 as for the 1/4 draft of the earlier margin 2). Drafting all the way to the target
# (margin 1) moves every 1024 px photo.
DRAFT_MARGIN = 1.4
DECODE_VERSION = 4  # bump whenever decode() returns different pixels: core.cache.DecodeCache keys include it


def decode_limits(short_side: int) -> dict:
    """load_image's draft limits for a model that resizes to short_side; training, evaluation, screening and the
    app all decode through these, so they see the same pixels. The long-side floor keeps the quality checks'
    working copy (core.quality, WORK_LONG_SIDE) a downscale, never an enlargement, of the decode."""
    return {"min_side": max(math.ceil(DRAFT_MARGIN * short_side), MIN_SIDE), "min_long": WORK_LONG_SIDE}


def decode(path: str, crop: dict | None, short_side: int, interpolation: str = "bicubic") -> Image.Image:
    """Decode one photo at no more resolution than the model needs: the short side shrunk to short_side.

    Smaller photos are left as they are; the transform's Resize then enlarges them with the same geometry."""
    img = load_image(path, crop=crop, **decode_limits(short_side))
    if min(img.size) > short_side:  # phone photos are 12 MP: shrinking once here keeps every epoch cheap
        img = resize_short(img, short_side, interpolation)
    return img


class ManifestDataset(Dataset):
    """Items are (image tensor, label as float, row position) so predictions can be gathered across ranks."""

    def __init__(self, df: pd.DataFrame, transform, short_side: int, cache=None, interpolation: str = "bicubic"):
        self.paths = df["image"].tolist()
        self.labels = df["label"].astype(float).tolist()
        self.crops = [crop_of(r) for _, r in df.iterrows()]
        self.transform, self.short_side, self.cache = transform, short_side, cache
        self.interpolation = interpolation
        # in shared memory, so persistent DataLoader workers see each epoch's value; -1 = not set
        self._augment_seed = multiprocessing.RawValue("q", -1)

    def set_augment_seed(self, seed: int) -> None:
        """Draw each item's random augmentation from (seed, item) alone: the same whichever worker runs it, and the
        same after a resume (persistent workers would otherwise carry their own RNG state on from epoch to epoch)."""
        self._augment_seed.value = int(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self.cache is not None:
            img = self.cache.get(self.paths[i], self.crops[i], self.short_side, self.interpolation)
        else:
            img = decode(self.paths[i], self.crops[i], self.short_side, self.interpolation)
        seed = self._augment_seed.value
        if seed < 0:
            return self.transform(img), torch.tensor(self.labels[i]), i
        with torch.random.fork_rng(devices=[]):  # without workers this runs in the trainer: keep its RNG untouched
            torch.manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
            return self.transform(img), torch.tensor(self.labels[i]), i


def check_images(df: pd.DataFrame) -> None:
    """Decode every image (and check its crop box) before training or scoring starts, and list all problems at
    once: a photo cut short after a sound header is named here, not when a batch reaches it mid-run."""
    problems = []
    for (_, row), size in zip(df.iterrows(), _checked_sizes(df["image"])):
        if isinstance(size, ImageLoadError):
            problems.append(str(size))
            continue
        try:
            box = crop_of(row)
        except ManifestError as e:  # a partial or non-numeric crop box
            problems.append(str(e))
            continue
        if box and (why := box_problem(box, size)):
            problems.append(f"{row['image']}: crop box {box} {why}")
    if problems:  # every one named: a user fixing them one run at a time would lose a run per photo
        raise ManifestError(f"{len(problems)} unusable image(s):\n  " + "\n  ".join(problems))


def keep_decodable(df: pd.DataFrame, report: ImportReport) -> pd.DataFrame:
    """The rows whose photo decodes whole as a supported image; every other one dropped into `report` with its
    reason, as import_folder does (an importer that only saw the file exist kept a text file named .png)."""
    sizes = _checked_sizes(df["image"])
    for e in (s for s in sizes if isinstance(s, ImageLoadError)):
        report.drop(f"not a usable image ({e.reason})", what=str(e))
    keep = [not isinstance(s, ImageLoadError) for s in sizes]
    report.kept = int(sum(keep))
    return df[keep].reset_index(drop=True)


def _checked_sizes(paths) -> list:
    """_checked_size of every path, in order, decoded in threads (PIL decodes without the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_checked_size, paths))


_SOUND: dict[tuple, tuple[int, int]] = {}  # (path, mtime, size) -> decoded size: a cross-validation checks once


def _checked_size(path) -> tuple[int, int] | ImageLoadError:
    """The photo's upright size once it decoded whole, or the ImageLoadError saying why it did not."""
    try:
        stat = os.stat(path)
        key = (str(path), stat.st_mtime_ns, stat.st_size)
    except (OSError, TypeError, ValueError):
        key = None  # missing, unreadable or not a path: decoded_size words the reason
    if key in _SOUND:
        return _SOUND[key]
    try:
        size = decoded_size(path)
    except ImageLoadError as e:
        return e
    if key is not None:
        _SOUND[key] = size
    return size
