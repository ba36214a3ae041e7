"""Tests for the embedding cache: reuse, per-image invalidation, model identity, crops, atomic files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from PIL import Image

from core.backbones import Preprocessing, get_spec
from core.embeddings import EmbeddingCache, embed, load_embedder, model_identity

PP = Preprocessing(input_size=16, crop_pct=1.0, interpolation="bilinear")


class Counting(nn.Module):
    """A tiny pooled-feature network that counts how many images it has embedded."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3)
        self.rows = 0

    def forward(self, x):
        self.rows += len(x)
        return self.conv(x).mean(dim=(2, 3))


def make_image(path: Path, seed: int, size=(24, 20)) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def df(tmp_path):
    images = [make_image(tmp_path / f"i{i}.png", i) for i in range(5)]
    return pd.DataFrame({"image": images, "label": [0, 1, 0, 1, 0]})


def test_second_call_computes_nothing(tmp_path, df):
    net, cache = Counting(), EmbeddingCache(tmp_path / "cache")
    first = embed(net, df, PP, cache, identity="m1", batch_size=2)
    assert first.shape == (5, 4) and net.rows == 5 and cache.misses == 5
    again = embed(net, df, PP, cache, identity="m1")
    assert net.rows == 5 and cache.hits == 5
    np.testing.assert_allclose(again, first, rtol=1e-6, atol=1e-7)  # batch of 1 vs 5: float summation order
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # atomic writes leave no temporaries


def test_changed_image_recomputes_only_that_image(tmp_path, df):
    net, cache = Counting(), EmbeddingCache(tmp_path / "cache")
    before = embed(net, df, PP, cache, identity="m1")
    make_image(Path(df["image"][2]), seed=99)
    after = embed(net, df, PP, cache, identity="m1")
    assert net.rows == 6
    assert not np.allclose(after[2], before[2])
    np.testing.assert_allclose(np.delete(after, 2, 0), np.delete(before, 2, 0), rtol=1e-6)


def test_other_model_identity_misses(tmp_path, df):
    net, cache = Counting(), EmbeddingCache(tmp_path / "cache")
    embed(net, df, PP, cache, identity="m1")
    embed(net, df, PP, cache, identity="m2")
    assert net.rows == 10


def test_crop_and_preprocessing_changes_miss(tmp_path, df):
    net, cache = Counting(), EmbeddingCache(tmp_path / "cache")
    embed(net, df, PP, cache, identity="m1")
    cropped = df.assign(crop_left=[0, 0, 0, 0, 2], crop_top=0, crop_width=[24] * 4 + [10], crop_height=20)
    cropped.loc[0:3, ["crop_left", "crop_top", "crop_width", "crop_height"]] = np.nan
    embed(net, cropped, PP, cache, identity="m1")
    assert net.rows == 6  # only the one row with a crop box
    embed(net, df, Preprocessing(input_size=20, crop_pct=1.0, interpolation="bilinear"), cache, identity="m1")
    assert net.rows == 11


def test_no_identity_or_no_cache_computes_everything(tmp_path, df):
    net, cache = Counting(), EmbeddingCache(tmp_path / "cache")
    embed(net, df, PP, cache, identity=None)
    embed(net, df, PP, cache, identity=None)
    embed(net, df, PP, None, identity="m1")
    assert net.rows == 15 and not (tmp_path / "cache").exists()


def test_damaged_cache_file_is_recomputed(tmp_path, df):
    net, cache = Counting(), EmbeddingCache(tmp_path / "cache")
    first = embed(net, df, PP, cache, identity="m1")
    victim = sorted((tmp_path / "cache").rglob("*.npy"))[0]
    victim.write_bytes(b"garbage")
    again = embed(net, df, PP, cache, identity="m1")
    assert net.rows == 6
    np.testing.assert_allclose(again, first, rtol=1e-6, atol=1e-7)  # batch of 1 vs 5: float summation order


def test_model_identity_rules(tmp_path):
    spec = get_spec("mobilenetv2_100")
    assert model_identity(spec=spec, weights="none", seed=None) is None  # unseeded random: not cacheable
    assert model_identity(spec=spec, weights="none", seed=0) == model_identity(spec=spec, weights="none", seed=0)
    assert model_identity(spec=spec, weights="none", seed=0) != model_identity(spec=spec, weights="none", seed=1)
    assert model_identity(spec=spec, weights="imagenet") != model_identity(spec=get_spec("resnet18"),
                                                                           weights="imagenet")
    f = tmp_path / "w.bin"
    f.write_bytes(b"one")
    a = model_identity(spec=spec, weights=str(f))
    f.write_bytes(b"two")
    assert model_identity(spec=spec, weights=str(f)) != a


def test_seeded_backbone_is_reproducible_and_bundle_identity(tmp_path, df):
    from core.bundle import save_bundle
    from core.model import HeadConfig, LesionClassifier
    a = load_embedder(backbone="mobilenetv2_100", weights="none", seed=3, input_size=32)
    b = load_embedder(backbone="mobilenetv2_100", weights="none", seed=3, input_size=32)
    assert a.identity == b.identity and a.preprocessing.input_size == 32
    ea, eb = embed(a.module, df[:2], a.preprocessing), embed(b.module, df[:2], b.preprocessing)
    np.testing.assert_allclose(ea, eb, rtol=1e-5, atol=1e-6)
    assert load_embedder(backbone="mobilenetv2_100", weights="none", seed=None).identity is None

    model = LesionClassifier(get_spec("mobilenetv2_100"), HeadConfig(), "none")
    folder = save_bundle(model, tmp_path / "run" / "bundle", threshold={"value": 0.5}, provenance={"run_name": "r"})
    run = load_embedder(run=tmp_path / "run", input_size=32)
    assert run.identity == model_identity(bundle=folder) and run.description["run_name"] == "r"
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_bundle(model, folder, threshold={"value": 0.5}, provenance={"run_name": "r"})
    assert model_identity(bundle=folder) != run.identity
    assert embed(model, df[:2], run.preprocessing).shape == (2, 1280)  # a classifier embeds with its backbone
