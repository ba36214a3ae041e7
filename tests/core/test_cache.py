"""Tests for core.cache: DecodeCache (decode once, invalidate on change, per-crop entries, exact pixels, workers) and
MemoryCache (decode once per stage, bounded, per worker, training numbers unchanged)."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import core.cache as cache_mod
from core.cache import DecodeCache, MemoryCache
from core.dataset import ManifestDataset, decode


def photo(path, size=(480, 360), seed=0, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    Image.fromarray(a).resize(size, Image.BICUBIC).save(path, fmt)
    return str(path)


@pytest.fixture
def counted(monkeypatch):
    calls = []

    def counting_decode(path, crop, short_side, interpolation="bicubic"):
        calls.append((path, crop, short_side))
        return decode(path, crop, short_side, interpolation)

    monkeypatch.setattr(cache_mod, "decode", counting_decode)
    return calls


def test_second_get_does_not_decode_again(tmp_path, counted):
    src = photo(tmp_path / "a.jpg")
    cache = DecodeCache(tmp_path / "cache")
    first = cache.get(src, None, 64)
    second = cache.get(src, None, 64)
    assert len(counted) == 1 and (cache.hits, cache.misses) == (1, 1)
    # a new cache object on the same folder (the next epoch's worker) reads the entry too
    third = DecodeCache(tmp_path / "cache").get(src, None, 64)
    assert len(counted) == 1
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert np.array_equal(np.asarray(first), np.asarray(third))


def test_rewritten_file_invalidates_the_entry(tmp_path, counted):
    src = photo(tmp_path / "a.jpg", seed=0)
    cache = DecodeCache(tmp_path / "cache")
    old = np.asarray(cache.get(src, None, 64))
    st = os.stat(src)
    photo(tmp_path / "a.jpg", seed=1)  # same name and size in pixels, new content
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    new = np.asarray(cache.get(src, None, 64))
    assert len(counted) == 2
    assert not np.array_equal(old, new)
    assert np.array_equal(new, np.asarray(decode(src, None, 64)))


def test_touch_alone_makes_a_new_entry(tmp_path, counted):
    src = photo(tmp_path / "a.jpg")
    cache = DecodeCache(tmp_path / "cache")
    cache.get(src, None, 64)
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    cache.get(src, None, 64)
    assert len(counted) == 2 and len(cache) == 2


def test_different_crop_or_size_gives_different_entries(tmp_path, counted):
    src = photo(tmp_path / "a.jpg")
    cache = DecodeCache(tmp_path / "cache")
    a = cache.get(src, {"left": 0, "top": 0, "width": 200, "height": 200}, 64)
    b = cache.get(src, {"left": 100, "top": 50, "width": 300, "height": 200}, 64)
    c = cache.get(src, {"left": 0, "top": 0, "width": 200, "height": 200}, 96)
    assert len(counted) == 3 and len(cache) == 3
    assert a.size == (64, 64) and b.size == (96, 64) and c.size == (96, 96)
    assert cache.entry(src, {"left": 0, "top": 0, "width": 200, "height": 200}, 64) != \
        cache.entry(src, {"left": 100, "top": 50, "width": 300, "height": 200}, 64)


@pytest.mark.parametrize("fmt", ["npy", "png"])
@pytest.mark.parametrize("crop", [None, {"left": 40, "top": 30, "width": 300, "height": 250}])
def test_cached_image_equals_fresh_decode(tmp_path, fmt, crop):
    src = photo(tmp_path / "a.jpg", size=(1200, 900))
    cache = DecodeCache(tmp_path / "cache", fmt=fmt)
    fresh = decode(src, crop, 100)
    cache.get(src, crop, 100)
    cached = cache.get(src, crop, 100)
    assert cache.hits == 1
    assert cached.mode == "RGB" and cached.size == fresh.size
    assert np.array_equal(np.asarray(cached), np.asarray(fresh))


def test_damaged_entry_is_decoded_again(tmp_path, counted):
    src = photo(tmp_path / "a.jpg")
    cache = DecodeCache(tmp_path / "cache")
    good = np.asarray(cache.get(src, None, 64))
    cache.entry(src, None, 64).write_bytes(b"\x93NUMPY truncated")
    again = np.asarray(cache.get(src, None, 64))
    assert len(counted) == 2 and np.array_equal(good, again)
    assert np.array_equal(np.asarray(cache.get(src, None, 64)), good) and len(counted) == 2


def test_no_temporary_files_are_left_behind(tmp_path):
    cache = DecodeCache(tmp_path / "cache")
    for i in range(3):
        cache.get(photo(tmp_path / f"{i}.png", seed=i, fmt="PNG"), None, 48)
    files = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(files) == 3 and not any(name.startswith(".tmp-") for name in files)


def test_a_new_decoder_version_makes_new_entries(tmp_path, counted, monkeypatch):
    import core.dataset
    src = photo(tmp_path / "a.jpg")
    cache = DecodeCache(tmp_path / "cache")
    cache.get(src, None, 64)
    monkeypatch.setattr(core.dataset, "DECODE_VERSION", 99, raising=False)
    cache.get(src, None, 64)
    assert len(counted) == 2 and len(cache) == 2


def test_new_draft_limits_make_new_entries(tmp_path, counted, monkeypatch):
    import core.dataset
    src = photo(tmp_path / "a.jpg")
    cache = DecodeCache(tmp_path / "cache")
    cache.get(src, None, 64)
    real = core.dataset.decode_limits
    monkeypatch.setattr(core.dataset, "decode_limits", lambda n: {**real(n), "min_long": 999})
    cache.get(src, None, 64)
    assert len(counted) == 2 and len(cache) == 2


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="npy"):
        DecodeCache(tmp_path, fmt="jpeg")


def test_dataset_with_cache_in_two_workers_matches_uncached(tmp_path):
    paths = [photo(tmp_path / f"{i}.jpg", seed=i) for i in range(6)]
    df = pd.DataFrame({"image": paths, "label": [0, 1] * 3})
    tf = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1)  # noqa: E731
    cache = DecodeCache(tmp_path / "cache")
    for _ in range(2):  # epoch 1 fills the cache from two worker processes, epoch 2 reads it
        cached = DataLoader(ManifestDataset(df, tf, 64, cache=cache), batch_size=3, num_workers=2)
        got = torch.cat([x for x, _, _ in cached])
    plain = torch.cat([x for x, _, _ in DataLoader(ManifestDataset(df, tf, 64), batch_size=3)])
    assert torch.equal(got, plain)
    assert len(cache) == 6


# ------------------------------------------------------------------ MemoryCache (training's default)
def test_memory_cache_decodes_each_photo_once_and_returns_the_same_pixels(tmp_path, counted):
    src = photo(tmp_path / "a.jpg")
    cache = MemoryCache()
    first = cache.get(src, None, 64)
    again = cache.get(src, None, 64)
    cropped = cache.get(src, {"left": 0, "top": 0, "width": 200, "height": 200}, 64)
    assert len(counted) == 2 and (cache.hits, cache.misses) == (1, 2) and len(cache) == 2
    assert np.array_equal(np.asarray(again), np.asarray(decode(src, None, 64)))
    assert first.size == (85, 64) and cropped.size == (64, 64)
    assert cache.nbytes == 85 * 64 * 3 + 64 * 64 * 3


def test_memory_cache_keeps_no_more_than_its_bound_and_still_serves_the_rest(tmp_path, counted):
    paths = [photo(tmp_path / f"{i}.jpg", seed=i) for i in range(3)]
    cache = MemoryCache(max_mb=2 * 85 * 64 * 3 / 2 ** 20)  # room for two 85x64 photos
    for _ in range(2):
        got = [np.asarray(cache.get(p, None, 64)) for p in paths]
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert len(counted) == 4  # the third photo is decoded in both passes, the first two once
    assert all(np.array_equal(g, np.asarray(decode(p, None, 64))) for g, p in zip(got, paths))


def test_memory_cache_over_a_disk_cache_asks_the_disk_only_on_its_own_miss(tmp_path, counted):
    src = photo(tmp_path / "a.jpg")
    disk = DecodeCache(tmp_path / "cache")
    DecodeCache(tmp_path / "cache").get(src, None, 64)  # an earlier run filled the disk cache
    cache = MemoryCache(disk)
    for _ in range(3):
        cache.get(src, None, 64)
    assert (disk.hits, disk.misses) == (1, 0) and (cache.hits, cache.misses) == (2, 1) and len(counted) == 1


def test_memory_cache_is_pickled_without_its_photos(tmp_path):
    import pickle
    cache = MemoryCache(max_mb=10)
    cache.get(photo(tmp_path / "a.jpg"), None, 64)
    copy = pickle.loads(pickle.dumps(cache))
    assert len(cache) == 1 and len(copy) == 0 and copy.nbytes == 0 and copy.max_bytes == cache.max_bytes


class _Budgets(torch.utils.data.Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.cache.budget()


def test_memory_cache_bound_is_shared_between_a_loaders_workers():
    cache = MemoryCache(max_mb=8)
    assert cache.budget() == 8 * 2 ** 20
    budgets = [int(b) for b in DataLoader(_Budgets(cache), batch_size=None, num_workers=2)]
    assert budgets == [4 * 2 ** 20] * 4


def test_dataset_with_memory_cache_in_persistent_workers_matches_uncached_every_epoch(tmp_path):
    paths = [photo(tmp_path / f"{i}.jpg", seed=i) for i in range(6)]
    df = pd.DataFrame({"image": paths, "label": [0, 1] * 3})
    tf = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1)  # noqa: E731
    plain = torch.cat([x for x, _, _ in DataLoader(ManifestDataset(df, tf, 64), batch_size=3)])
    loader = DataLoader(ManifestDataset(df, tf, 64, cache=MemoryCache()), batch_size=3, num_workers=2,
                        persistent_workers=True)
    for _ in range(2):  # epoch 1 fills each worker's memory, epoch 2 reads it
        assert torch.equal(torch.cat([x for x, _, _ in loader]), plain)


@pytest.mark.slow
def test_training_decodes_each_photo_once_per_stage_and_trains_exactly_as_without_the_cache(image_set, tmp_path,
                                                                                            monkeypatch):
    import collections

    import core.training
    from core.config import run_config_from_dict
    from core.runfolder import read_metrics
    from tests.conftest import tiny_config
    labels, images = image_set
    cfg = run_config_from_dict(tiny_config(labels, images))  # stages of 1 and 2 epochs, no workers
    decodes = collections.Counter()

    def counting_decode(path, crop, short_side, interpolation="bicubic"):
        decodes[os.path.basename(path)] += 1
        return decode(path, crop, short_side, interpolation)

    monkeypatch.setattr(cache_mod, "decode", counting_decode)
    core.training.fit(cfg, tmp_path / "cached")
    split = pd.read_csv(tmp_path / "cached" / "splits" / "1_finetune.csv")
    names = {part: {os.path.basename(p) for p in split.loc[split["split"] == part, "image"]} for part in ("train", "val")}
    # validation photos are read in all 3 epochs and decoded once per stage; a training photo at most once per stage
    # (drop_last may leave it out of a stage's epochs)
    assert {decodes[n] for n in names["val"]} == {len(cfg.stages)}
    assert set(decodes) <= names["train"] | names["val"] and max(decodes.values()) == len(cfg.stages)

    monkeypatch.setattr(core.training, "MemoryCache", lambda inner=None: inner)  # as before the cache
    core.training.fit(cfg, tmp_path / "plain")
    cached, plain = read_metrics(tmp_path / "cached"), read_metrics(tmp_path / "plain")
    cols = ["train_loss", "val_loss", "val_roc_auc"]
    assert cached[cols].equals(plain[cols])
    probs = [pd.DataFrame(json.loads((tmp_path / r / "val_report.json").read_text())["predictions"])["prob"]
             for r in ("cached", "plain")]
    assert probs[0].equals(probs[1])
