"""The paper's KNN baseline: L2 nearest neighbours on frozen features, majority vote, k chosen on validation.

The "probability" of malignancy is the fraction of malignant neighbours among the k nearest training
images; the majority vote is ``fraction >= 0.5`` (with an even k a 50/50 tie counts as malignant: a missed
cancer costs more than a referral). k is chosen by validation ROC-AUC; equal AUCs go to the smaller k.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.neighbors import NearestNeighbors

from core import metrics

K_GRID = tuple(range(1, 26, 2))  # odd k: no vote ties between two classes
THRESHOLD = 0.5                  # majority vote
_TIE = 1e-12


@dataclass
class KNN:
    """Training features and labels, optionally standardised with the training statistics."""
    X: np.ndarray
    y: np.ndarray
    standardize: bool = False
    mean: np.ndarray = field(init=False)
    scale: np.ndarray = field(init=False)

    def __post_init__(self):
        self.X = np.asarray(self.X, dtype=np.float64)
        self.y = np.asarray(self.y, dtype=int)
        if self.standardize:
            self.mean = self.X.mean(axis=0)
            sd = self.X.std(axis=0)
            self.scale = np.where(sd > 1e-12, sd, 1.0)  # constant features: leave them, don't divide by 0
        else:
            self.mean, self.scale = np.zeros(self.X.shape[1]), np.ones(self.X.shape[1])
        self._nn = NearestNeighbors(metric="euclidean", algorithm="brute").fit(self._prep(self.X))

    def _prep(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.mean) / self.scale

    def neighbour_labels(self, X: np.ndarray, k_max: int) -> np.ndarray:
        """(n, k_max) training labels of each row's nearest neighbours, closest first."""
        k_max = min(k_max, len(self.y))
        _, idx = self._nn.kneighbors(self._prep(X), n_neighbors=k_max)
        return self.y[idx]

    def malignant_fraction(self, X: np.ndarray, k: int) -> np.ndarray:
        return self.neighbour_labels(X, k)[:, :k].mean(axis=1)


def fractions_by_k(labels: np.ndarray, ks) -> dict[int, np.ndarray]:
    """The malignant fraction for every k from one (n, k_max) neighbour-label matrix."""
    return {k: labels[:, :k].mean(axis=1) for k in ks}


def choose_k(model: KNN, X_val: np.ndarray, y_val: np.ndarray, ks=K_GRID) -> tuple[int, list[dict]]:
    """The k with the best validation ROC-AUC (ties: smaller k) and the whole validation curve."""
    ks = sorted(k for k in set(ks) if 1 <= k <= len(model.y))
    if not ks:
        raise ValueError(f"no usable k: the training set has only {len(model.y)} images")
    fractions = fractions_by_k(model.neighbour_labels(X_val, max(ks)), ks)
    curve = []
    for k in ks:
        pm = metrics.point_metrics(y_val, fractions[k], THRESHOLD)
        curve.append({"k": k, **{m: pm[m] for m in ("roc_auc", "accuracy", "recall", "specificity")}})
    scored = [c for c in curve if c["roc_auc"] is not None]
    if not scored:
        raise ValueError("validation ROC-AUC is undefined (one class only): cannot choose k")
    best = max(c["roc_auc"] for c in scored)
    k = min(c["k"] for c in scored if c["roc_auc"] >= best - _TIE)
    return k, curve
