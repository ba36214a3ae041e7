"""Tests for the KNN baseline: neighbour votes, standardisation with train statistics, choosing k on validation."""
from __future__ import annotations

import numpy as np
import pytest

from core import knn
from core.metrics import point_metrics


def blobs(n: int, shift: float, seed: int, dim: int = 8):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    return rng.normal(size=(n, dim)) + shift * y[:, None], y


def test_separable_data_gives_high_auc():
    Xtr, ytr = blobs(80, 3.0, 0)
    Xva, yva = blobs(40, 3.0, 1)
    Xte, yte = blobs(40, 3.0, 2)
    model = knn.KNN(Xtr, ytr)
    k, curve = knn.choose_k(model, Xva, yva)
    assert [c["k"] for c in curve] == list(knn.K_GRID)
    probs = model.malignant_fraction(Xte, k)
    assert point_metrics(yte, probs, knn.THRESHOLD)["roc_auc"] > 0.95


def test_neighbours_are_closest_first_and_vote_is_a_fraction():
    X = np.array([[0.0], [1.0], [2.0], [10.0]])
    model = knn.KNN(X, np.array([1, 0, 1, 0]))
    assert model.neighbour_labels(np.array([[0.1]]), 3).tolist() == [[1, 0, 1]]
    np.testing.assert_allclose(model.malignant_fraction(np.array([[0.1], [9.0]]), 3), [2 / 3, 1 / 3])
    assert model.neighbour_labels(np.array([[0.1]]), 10).shape == (1, 4)  # k capped at the training size


def test_standardize_uses_train_statistics_only():
    # Feature 2 has a huge scale and is pure noise; feature 1 carries the label.
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    X = np.c_[y + rng.normal(0, 0.1, 60), rng.normal(0, 1000, 60)]
    raw, std = knn.KNN(X, y), knn.KNN(X, y, standardize=True)
    np.testing.assert_allclose(std.mean, X.mean(axis=0))
    Xq = np.c_[np.array([0.0, 1.0] * 10), rng.normal(0, 1000, 20)]
    yq = np.array([0, 1] * 10)
    auc = lambda m: point_metrics(yq, m.malignant_fraction(Xq, 5), 0.5)["roc_auc"]  # noqa: E731
    assert auc(std) > 0.95 > auc(raw)
    const = knn.KNN(np.c_[X, np.ones(60)], y, standardize=True)  # a constant feature must not divide by zero
    assert np.isfinite(const.malignant_fraction(np.c_[Xq, np.ones(20)], 3)).all()


def test_ties_go_to_the_smaller_k_and_large_k_is_skipped():
    Xtr, ytr = blobs(12, 20.0, 0)
    Xva, yva = blobs(10, 20.0, 1)
    k, curve = knn.choose_k(knn.KNN(Xtr, ytr), Xva, yva, ks=(5, 3, 1, 25))
    assert all(c["roc_auc"] == 1.0 for c in curve)
    assert k == 1 and [c["k"] for c in curve] == [1, 3, 5]


def test_choose_k_is_deterministic_and_takes_the_best_val_auc():
    Xtr, ytr = blobs(60, 1.0, 0)
    Xva, yva = blobs(40, 1.0, 1)
    model = knn.KNN(Xtr, ytr)
    k1, curve1 = knn.choose_k(model, Xva, yva)
    k2, curve2 = knn.choose_k(knn.KNN(Xtr, ytr), Xva, yva)
    assert (k1, curve1) == (k2, curve2)
    best = max(c["roc_auc"] for c in curve1)
    assert k1 == min(c["k"] for c in curve1 if c["roc_auc"] == best)


def test_one_class_validation_is_an_error():
    Xtr, ytr = blobs(20, 1.0, 0)
    with pytest.raises(ValueError, match="one class"):
        knn.choose_k(knn.KNN(Xtr, ytr), Xtr[:4], np.zeros(4, int))
