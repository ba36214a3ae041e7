"""Tests for the domain-overlap analysis: pixel thumbnails, domains, PCA, domain-classifier AUC, figure."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core import pca
from core.manifest import write_manifest


def make_images(folder: Path, n: int, mean: tuple, seed: int, spread: float = 40.0) -> list[str]:
    """n noisy 16x16 photos around an RGB mean (a stand-in for a camera/domain's colour statistics)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        tint = np.asarray(mean) + rng.normal(0, spread / 2, 3)  # per-image lighting
        px = np.clip(tint + rng.normal(0, spread, (16, 16, 3)), 0, 255).astype(np.uint8)
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(px).save(paths[-1])
    return paths


def frame(paths_by_domain: dict[str, list[str]]) -> pd.DataFrame:
    rows = [{"image": p, "label": i % 2, "domain": d} for d, ps in paths_by_domain.items() for i, p in enumerate(ps)]
    return pd.DataFrame(rows)


def test_pixel_vector_uses_crop_and_centre_square(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = (255, 0, 0)
    img[:, 20:] = (0, 0, 255)
    Image.fromarray(img).save(tmp_path / "a.png")
    v = pca.pixel_vector(str(tmp_path / "a.png"), {"left": 0, "top": 0, "width": 20, "height": 20}, size=8)
    assert v.shape == (8 * 8 * 3,) and v.min() >= 0 and v.max() <= 1
    np.testing.assert_allclose(v.reshape(8, 8, 3).mean(axis=(0, 1)), [1, 0, 0], atol=0.02)
    whole = pca.pixel_vector(str(tmp_path / "a.png"), None, size=8).reshape(8, 8, 3)
    assert whole[:, 0, 0].mean() > 0.9 and whole[:, -1, 2].mean() > 0.9  # centre square keeps both halves


def test_domain_from_column_or_file_stem(tmp_path):
    a = make_images(tmp_path / "a", 3, (100, 100, 100), 0)
    write_manifest(pd.DataFrame({"image": a, "label": [0, 1, 0], "domain": ["x", None, "x"]}), tmp_path / "m1.csv")
    write_manifest(pd.DataFrame({"image": a, "label": [0, 1, 0]}), tmp_path / "isic.csv")
    df = pca.load_manifests([tmp_path / "m1.csv", tmp_path / "isic.csv"])
    assert df["domain"].tolist() == ["x", "m1", "x", "isic", "isic", "isic"]


def test_subsample_caps_each_domain():
    df = pd.DataFrame({"image": [str(i) for i in range(10)], "label": 0, "domain": ["a"] * 7 + ["b"] * 3})
    out = pca.subsample(df, 4, seed=0)
    assert out["domain"].value_counts().to_dict() == {"a": 4, "b": 3}
    assert out.equals(pca.subsample(df, 4, seed=0))
    assert len(pca.subsample(df, None)) == 10


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("dom")
    return {"red": make_images(root / "red", 60, (200, 80, 70), 1),
            "red_too": make_images(root / "red2", 60, (200, 80, 70), 2),
            "blue": make_images(root / "blue", 60, (70, 90, 200), 3)}


@pytest.mark.slow
def test_overlap_auc_separates_different_and_not_same_distributions(domains):
    df = frame(domains)
    X = pca.pixel_features(df, size=8)
    coords, evr = pca.pca_2d(X)
    assert coords.shape == (180, 2) and len(evr) == 10 and evr[0] >= evr[1]
    by_pair = {(r["domain_a"], r["domain_b"]): r for r in pca.overlap(X, coords, df)}
    assert set(by_pair) == {("blue", "red"), ("blue", "red_too"), ("red", "red_too")}
    assert by_pair[("blue", "red")]["auc"] > 0.95 and by_pair[("blue", "red")]["auc_2pc"] > 0.95
    same = by_pair[("red", "red_too")]
    assert abs(same["auc"] - 0.5) < 0.15 and abs(same["auc_2pc"] - 0.5) < 0.15
    assert same["silhouette_2pc"] < by_pair[("blue", "red")]["silhouette_2pc"]
    assert same["n_a"] == 60 and same["folds"] == 5 and same["grouped_by"] == "image"


def test_patients_never_straddle_folds(domains):
    df = frame({"red": domains["red"], "blue": domains["blue"]})
    df["patient_id"] = [f"p{i // 3}" for i in range(len(df))]
    groups = pca.patient_groups(df)
    assert len(set(groups)) == 40
    r = pca.overlap(pca.pixel_features(df, size=8), np.zeros((120, 2)) + np.arange(120)[:, None], df)[0]
    assert r["grouped_by"] == "patient_id" and r["folds"] == 5


def test_too_few_images_gives_no_auc():
    X = np.random.default_rng(0).normal(size=(3, 4))
    assert pca.domain_auc(X, np.array([0, 0, 1]), np.array(["a", "b", "c"])) == (None, 0)


def test_figure_has_both_spaces_and_colourings(domains):
    df = frame({"red": domains["red"][:5], "blue": domains["blue"][:5]})
    coords = np.random.default_rng(0).normal(size=(10, 2))
    frames = {"pixels": pca.scatter_frame(df, coords), "embeddings": pca.scatter_frame(df, coords)}
    assert list(frames["pixels"].columns) == ["image", "domain", "label", "pc1", "pc2"]
    fig = pca.figure(frames, {"pixels": [0.3, 0.2], "embeddings": [0.4, 0.1]})
    assert len(fig.data) == 8  # (2 domains + 2 labels) x 2 spaces
    assert sum(t.showlegend for t in fig.data) == 4
