"""Tests for core.ood: the gate accepts in-distribution features, refuses far-away ones, and sets its threshold
from validation features alone."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from core import ood


def _cloud(n, dim=32, seed=0, shift=0.0):
    """Correlated Gaussian features (a low-rank structure plus noise, like pooled CNN features), ReLU'd."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(123).normal(size=(6, dim))
    z = rng.normal(size=(n, 6)) @ basis + 0.3 * rng.normal(size=(n, dim)) + 3.0 + shift
    return np.maximum(z, 0.0)


@pytest.mark.parametrize("method", ood.METHODS)
def test_accepts_in_distribution_and_refuses_far_away(method):
    gate = ood.fit_gate(_cloud(300, seed=0), _cloud(80, seed=1), method)
    fresh = _cloud(400, seed=2)
    assert gate.accepts(fresh).mean() >= 0.9
    rng = np.random.default_rng(5)
    sparse = np.zeros((5, 32))
    sparse[np.arange(5), np.arange(5)] = 5.0
    far = [sparse,                                                        # a few channels fire, the rest silent
           rng.uniform(0, 20, size=(20, 32)),                            # unstructured
           np.maximum(rng.normal(size=(20, 6)) @ rng.normal(size=(6, 32)) * 3 + 3, 0)]  # another structure
    for x in far:
        assert not gate.accepts(x).any()
    refused = gate.check(far[1][:1])[0]
    assert not refused.accepted and refused.score > refused.threshold
    # plain words first, the numbers after: "further from the training photos than 97.5% of the validation photos"
    assert refused.reason.startswith("it lies further from the training photos than 97.5% of the validation photos")
    assert refused.reason.endswith(f"is {refused.score:.3g}, the limit {refused.threshold:.3g}")  # no nested ()


@pytest.mark.parametrize("method", ood.METHODS)
def test_threshold_is_a_quantile_of_validation_scores_only(method):
    train, val = _cloud(200, seed=0), _cloud(60, seed=1)
    gate = ood.fit_gate(train, val, method, accept_quantile=0.9)
    scores = gate.score(val)
    assert gate.threshold == pytest.approx(np.quantile(scores, 0.9, method="higher"))
    assert 0.88 <= np.mean(scores <= gate.threshold) <= 0.95
    # nothing but training and validation features goes in: no argument could carry out-of-distribution data
    assert list(inspect.signature(ood.fit_gate).parameters)[:2] == ["train_feats", "val_feats"]
    # the threshold follows the validation set: a validation set with some odd photos in it raises it
    odd = val.copy()
    odd[:10] = np.random.default_rng(9).uniform(0, 20, size=(10, 32))
    wider = ood.fit_gate(train, odd, method, accept_quantile=0.9)
    assert wider.threshold > gate.threshold
    assert gate.n_validation == 60 and gate.to_meta()["n_validation"] == 60


def test_mahalanobis_low_rank_storage_equals_ledoit_wolf():
    from sklearn.covariance import LedoitWolf
    train, probe = _cloud(40, dim=64, seed=0), _cloud(10, dim=64, seed=3)  # n < d: the covariance is singular
    gate = ood.fit_gate(train, _cloud(20, dim=64, seed=1), "mahalanobis")
    lw = LedoitWolf().fit(train.astype(np.float64))
    expected = np.sqrt(lw.mahalanobis(probe.astype(np.float64)))
    np.testing.assert_allclose(gate.score(probe), expected, rtol=1e-3)
    assert gate.arrays["basis"].shape[1] < 64  # low rank: the 64x64 precision matrix is never stored


def test_knn_score_is_cosine_distance_to_kth_neighbour():
    train = np.eye(4)[[0, 0, 1, 2]] + 0.0
    gate = ood.fit_gate(np.tile(train, (3, 1)), np.tile(train, (3, 1)), "knn", k=2)
    # a query along axis 3 is orthogonal to every reference: distance 1; along axis 0: 0
    np.testing.assert_allclose(gate.score(np.array([[0, 0, 0, 1.0], [2.0, 0, 0, 0]])), [1.0, 0.0], atol=1e-3)


@pytest.mark.parametrize("method", ood.METHODS)
def test_round_trip_through_meta_and_arrays(method):
    gate = ood.fit_gate(_cloud(100), _cloud(30, seed=1), method)
    again = ood.OODGate.from_meta(gate.to_meta(), gate.arrays)
    x = _cloud(10, seed=4)
    np.testing.assert_allclose(again.score(x), gate.score(x), rtol=1e-6)
    assert again.threshold == gate.threshold and again.method == method


def test_bad_inputs_are_named():
    gate = ood.fit_gate(_cloud(50), _cloud(20, seed=1), "knn")
    with pytest.raises(ood.GateError, match="33 dimensions but the gate was fitted on 32"):
        gate.score(np.ones((2, 33)))
    with pytest.raises(ood.GateError, match="NaN"):
        gate.score(np.full((1, 32), np.nan))
    with pytest.raises(ood.GateError, match="at least 10 validation"):
        ood.fit_gate(_cloud(50), _cloud(5), "knn")
    with pytest.raises(ood.GateError, match="unknown gate method"):
        ood.fit_gate(_cloud(50), _cloud(20), "isolation_forest")
    with pytest.raises(ood.GateError, match="missing arrays"):
        ood.OODGate.from_meta(gate.to_meta(), {})


def test_knn_reference_is_capped_and_stored_small(monkeypatch):
    monkeypatch.setattr(ood, "MAX_REFERENCE", 64)
    gate = ood.fit_gate(_cloud(200), _cloud(20, seed=1), "knn")
    assert gate.arrays["reference"].shape == (64, 32) and gate.arrays["reference"].dtype == np.float16
    assert gate.n_reference == 64
