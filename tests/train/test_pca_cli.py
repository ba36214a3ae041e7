"""End-to-end tests of `python -m train.pca` on tiny synthetic domains with a random-weight backbone."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.manifest import write_manifest
from train import pca as cli

FAST = ["--backbone", "mobilenetv2_100", "--weights", "none", "--input-size", "32", "--pixel-size", "8",
        "--device", "cpu", "--workers", "0"]
SUMMARY_KEYS = {"manifests", "n", "n_per_domain", "n_malignant_per_domain", "max_per_domain", "seed", "pixel_size",
                "pixel_method", "model", "overlap_method", "spaces", "timings", "created"}
PAIR_KEYS = {"domain_a", "domain_b", "n_a", "n_b", "auc", "auc_2pc", "silhouette_2pc", "folds", "grouped_by"}


def make_manifest(folder: Path, n: int, mean, seed: int, **extra) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        px = np.clip(np.asarray(mean) + rng.normal(0, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
        paths.append(folder / f"{i}.jpg")
        Image.fromarray(px).save(paths[-1])
    df = pd.DataFrame({"image": [str(p) for p in paths], "label": np.arange(n) % 2, **extra})
    return write_manifest(df, folder.with_suffix(".csv"))


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("pca")
    phone = make_manifest(root / "phone", 16, (190, 120, 100), 0, patient_id=[f"p{i // 2}" for i in range(16)])
    derm = make_manifest(root / "derm", 14, (90, 70, 160), 1, domain="dermoscopy")
    return phone, derm


@pytest.mark.slow
def test_writes_csvs_figure_and_summary_then_reuses_cache(tmp_path, manifests, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--manifest", str(manifests[0]), "--manifest", str(manifests[1]), "--out", str(out),
            "--cache", str(cache), *FAST]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["n_per_domain"] == {"dermoscopy": 14, "phone": 16}  # domain column, else the file stem
    assert summary["timings"]["embeddings_computed"] == 30 and summary["timings"]["embeddings_from_cache"] == 0
    for space, dim in (("pixels", 8 * 8 * 3), ("embeddings", 1280)):
        s = summary["spaces"][space]
        assert s["dim"] == dim and len(s["explained_variance_ratio"]) == 10
        (pair,) = s["overlap"]
        assert set(pair) == PAIR_KEYS and pair["grouped_by"] == "patient_id"
        csv = pd.read_csv(out / f"{space}_pca.csv")
        assert list(csv.columns) == ["image", "domain", "label", "pc1", "pc2"] and len(csv) == 30
    assert summary["spaces"]["pixels"]["overlap"][0]["auc"] > 0.9  # very different colours
    assert len(pd.read_csv(out / "overlap.csv")) == 2
    assert (out / "pca.html").stat().st_size > 10_000
    assert "dermoscopy vs phone" in capsys.readouterr().out

    assert cli.main(argv + ["--max-per-domain", "10"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["n"] == 20 and again["timings"]["embeddings_from_cache"] == 20
    assert again["timings"]["embeddings_computed"] == 0


def test_bad_inputs_exit_2(tmp_path, manifests, capsys):
    assert cli.main(["--manifest", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "manifest not found" in capsys.readouterr().err
    argv = ["--manifest", str(manifests[0]), "--out", str(tmp_path / "o"), "--backbone", "mobilenetv2_100",
            "--weights", str(tmp_path / "missing.safetensors")]
    assert cli.main(argv) == 2
    assert "weights file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a model source is required
        cli.main(["--manifest", str(manifests[0]), "--out", str(tmp_path / "o")])


def run_twice(argv, tmp_path) -> tuple[dict, dict]:
    summaries = []
    for name in ("first", "second"):
        assert cli.main(argv + ["--out", str(tmp_path / name)]) == 0
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    return summaries[0]["timings"], summaries[1]["timings"]


@pytest.mark.slow
def test_embeddings_are_cached_per_user_by_default(tmp_path, manifests, monkeypatch, capsys):
    user = tmp_path / "user_cache"
    monkeypatch.setenv("SKINSCREEN_CACHE", str(user))
    argv = ["--manifest", str(manifests[0]), "--manifest", str(manifests[1]), *FAST]
    first, second = run_twice(argv, tmp_path)  # no --cache given
    assert first["embeddings_computed"] == 30 and first["embeddings_from_cache"] == 0
    assert second["embeddings_computed"] == 0 and second["embeddings_from_cache"] == 30
    assert first["embedding_cache"] == second["embedding_cache"] == str(user / "embeddings")
    assert len(list((user / "embeddings").rglob("*.npy"))) == 30
    assert f"cache {user / 'embeddings'}" in capsys.readouterr().out


@pytest.mark.slow
def test_no_cache_computes_everything_and_writes_nothing(tmp_path, manifests, monkeypatch):
    user = tmp_path / "user_cache"
    monkeypatch.setenv("SKINSCREEN_CACHE", str(user))
    argv = ["--manifest", str(manifests[0]), "--manifest", str(manifests[1]), "--no-cache", *FAST]
    first, second = run_twice(argv, tmp_path)
    assert first["embeddings_computed"] == second["embeddings_computed"] == 30
    assert second["embeddings_from_cache"] == 0 and second["embedding_cache"] is None
    assert not user.exists()
    with pytest.raises(SystemExit):  # one or the other
        cli.main(argv + ["--cache", str(tmp_path / "c"), "--out", str(tmp_path / "x")])


@pytest.mark.slow
def test_an_unwritable_cache_is_reported_and_skipped(tmp_path, manifests, monkeypatch, capsys):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("SKINSCREEN_CACHE", str(blocked))
    argv = ["--manifest", str(manifests[0]), "--manifest", str(manifests[1]), "--out", str(tmp_path / "o"), *FAST]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["timings"]["embedding_cache"] is None and summary["timings"]["embeddings_computed"] == 30
    assert f"embedding cache {blocked / 'embeddings'} is not writable" in capsys.readouterr().err


def test_the_built_in_demo_is_a_run_by_its_short_name(tmp_path, manifests):
    """Its error said 'give a run folder, a bundle folder or demo', yet 'demo' was not accepted here."""
    argv = ["--manifest", str(manifests[0]), "--out", str(tmp_path / "o"), "--run", "demo", "--pixel-size", "8",
            "--device", "cpu", "--workers", "0", "--no-cache"]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["model"]["source"] == "run" and summary["model"]["run"].endswith("bundle")
