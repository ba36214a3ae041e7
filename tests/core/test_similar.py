"""Tests for core.similar: nearest cases come back most similar first, with their labels and references."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.similar import SimilarCase, SimilarError, SimilarIndex, build_index, seen_in_training


def _index(tmp_path, n=30, dim=16):
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(n, dim))).astype(np.float32)
    (tmp_path / "img000.png").write_bytes(b"x")  # only the first image exists on this machine
    df = pd.DataFrame({"image": [str(tmp_path / f"img{i:03d}.png") for i in range(n)], "label": np.arange(n) % 2,
                       "split": ["train"] * (n - 5) + ["val"] * 5, "diagnosis": ["NEV", "BCC"] * (n // 2),
                       "patient_id": [f"P{i}" for i in range(n)]})
    return build_index(df, feats), feats


def test_query_returns_most_similar_first(tmp_path):
    index, feats = _index(tmp_path)
    query = feats[7] + 0.01
    cases = index.query(query, k=5)[0]
    assert len(cases) == 5 and cases[0].image.endswith("img007.png")
    sims = [c.similarity for c in cases]
    assert sims == sorted(sims, reverse=True) and sims[0] == pytest.approx(1.0, abs=1e-2)
    normed = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    expected = np.argsort(-(normed @ (query / np.linalg.norm(query))))[:5]
    assert [c.image for c in cases] == [index.records[j]["image"] for j in expected]
    assert cases[0].label == 1 and cases[0].label_name == "malignant" and cases[0].diagnosis == "BCC"


def test_the_pad_importers_diagnostic_column_is_the_cases_diagnosis(tmp_path):
    """core.sources.import_pad_ufes keeps PAD-UFES-20's own column name, `diagnostic`."""
    feats = np.eye(3, dtype=np.float32)
    df = pd.DataFrame({"image": [str(tmp_path / f"{i}.png") for i in range(3)], "label": [1, 0, 0],
                       "split": "train", "diagnostic": ["BCC", "NEV", None]})
    cases = build_index(df, feats).query(feats, k=1)
    assert [c[0].diagnosis for c in cases] == ["BCC", "NEV", None]


def test_images_are_references_and_availability_is_checked(tmp_path):
    index, feats = _index(tmp_path)
    assert index.embeddings.dtype == np.float16  # small: no photo is copied, only its features
    first, = index.query(feats[0], k=1)[0:1]
    assert first[0].available is True
    other = index.query(feats[3], k=1)[0][0]
    assert other.available is False and other.split == "train"


def test_round_trip_and_mismatch(tmp_path):
    index, feats = _index(tmp_path)
    again = SimilarIndex.from_meta(index.to_meta(), index.embeddings)
    assert [c.image for c in again.query(feats[2])[0]] == [c.image for c in index.query(feats[2])[0]]
    assert index.to_meta()["splits"] == {"train": 25, "val": 5}
    with pytest.raises(SimilarError, match="do not match"):
        index.query(np.ones(17))
    with pytest.raises(SimilarError, match="manifest rows"):
        build_index(pd.DataFrame({"image": ["a"], "label": [0]}), np.ones((2, 4)))


def test_seen_in_training_needs_a_near_copy_from_the_training_or_validation_split():
    case = lambda split, sim: SimilarCase(image=f"{split}.png", label=0, label_name="benign", split=split,  # noqa: E731
                                          similarity=sim)
    assert seen_in_training([case("train", 0.985), case("val", 0.97)]) is None
    assert seen_in_training([case("test", 0.999), case("val", 0.995)]).image == "val.png"
    assert seen_in_training([case("train", 1.0), case("val", 0.995)]).image == "train.png"
    assert seen_in_training([]) is None


def test_filled_from_adds_only_what_a_record_lacks_matched_by_file_name(tmp_path):
    feats = np.eye(3, dtype=np.float32)
    df = pd.DataFrame({"image": [str(tmp_path / f"{i}.png") for i in range(3)], "label": [1, 0, 0],
                       "split": "train", "diagnosis": ["BCC", None, None]})
    index = build_index(df, feats)
    elsewhere = pd.DataFrame({"image": ["/other/place/0.png", "/other/place/1.png"], "diagnostic": ["MEL", "NEV"],
                              "patient_id": ["P0", "P1"]})
    filled = index.filled_from(elsewhere)
    assert [r.get("diagnosis") for r in filled.records] == ["BCC", "NEV", None]  # BCC kept, not replaced by MEL
    assert [r.get("patient_id") for r in filled.records] == ["P0", "P1", None]
    assert np.array_equal(filled.embeddings, index.embeddings) and index.records[1].get("diagnosis") is None
    # a name two rows share is not guessed; the record's own path still decides
    twins = pd.DataFrame({"image": ["/a/1.png", "/b/1.png", str(tmp_path / "2.png")],
                          "diagnosis": ["SEK", "MEL", "ACK"]})
    assert [r.get("diagnosis") for r in index.filled_from(twins).records] == ["BCC", None, "ACK"]
