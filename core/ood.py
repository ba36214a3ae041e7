"""Out-of-distribution gate: refuse photos whose pooled features are unlike the training photos' features.

The gate describes the training photos in the model's own feature space (the pooled backbone features the head
sees) and scores a new photo by how far it lies from them. Two descriptors are implemented:

* ``knn``: cosine distance to the k-th nearest training embedding (features L2-normalised; Sun et al. 2022,
  "Out-of-distribution detection with deep nearest neighbors"). Stores the training embeddings (float16).
* ``mahalanobis``: Mahalanobis distance to the training mean under a Ledoit-Wolf shrunk covariance. Stored exactly
  in low rank: the shrunk covariance is V diag(l) V^T + s (I - V V^T), with V the sample covariance's
  eigenvectors (at most n - 1 of them), so the D x D precision matrix is never written.

The acceptance threshold is a quantile (``ACCEPT_QUANTILE``) of the scores of in-distribution *validation*
photos, scored against the training descriptor: no out-of-distribution example is an input to ``fit_gate``, so
the threshold cannot be tuned to any test set. Which descriptor is the default was decided by measurement
(``benchmarks/trust_gate.py``; README "Trust: out-of-distribution gate ..."): see DEFAULT_METHOD.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METHODS = ("knn", "mahalanobis")
# Chosen by measurement on the shared demo (benchmarks/trust_gate.py -> benchmarks/results/trust_gate_shared_demo.json;
# README "Knowing when not to answer"). Both gates accept about 96-99% of unseen test-patient photos at the same
# validation-set threshold, but Mahalanobis refuses 91% of everyday non-skin photos and 84% of synthetic junk
# against 70% and 66% for the best kNN (k = 5), and separates them from lesion photos better (ROC-AUC 0.998 / 0.988
# vs 0.954 / 0.937). Neither refuses most dermoscopic images (Mahalanobis accepts 89-92%, kNN 72%).
DEFAULT_METHOD = "mahalanobis"
DEFAULT_K = 5
# Accept 97.5% of in-distribution validation photos: about 1 in 40 unusual but genuine photos is refused.
ACCEPT_QUANTILE = 0.975
# The kNN reference set is capped (seeded subsample) so a large training set keeps the bundle small.
MAX_REFERENCE = 4096


class GateError(ValueError):
    """Features that cannot be scored (wrong width, NaN) or a gate described inconsistently."""


@dataclass(frozen=True)
class GateResult:
    """One photo's verdict from the gate: its score, the threshold, and the reason in words when refused."""
    accepted: bool
    score: float
    threshold: float
    reason: str | None


@dataclass(frozen=True)
class OODGate:
    """A fitted gate. ``arrays`` holds the descriptor (see module docstring); everything else is JSON-able."""
    method: str
    threshold: float
    accept_quantile: float
    n_reference: int
    n_validation: int
    dim: int
    k: int | None = None
    val_score_quantiles: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise GateError(f"unknown gate method {self.method!r}; expected one of {', '.join(METHODS)}")

    # ---------------------------------------------------------------- scoring
    def score(self, feats) -> np.ndarray:
        """Distance of each row of `feats` (N, D) from the training photos: higher = less like them."""
        x = _check_features(feats, self.dim)
        if self.method == "knn":
            return _knn_scores(_normalise(x), self.arrays["reference"].astype(np.float32), self.k)
        return _mahalanobis(x, self.arrays["mean"], self.arrays["basis"], self.arrays["eigenvalues"],
                            float(self.arrays["isotropic"][0]))

    def accepts(self, feats) -> np.ndarray:
        return self.score(feats) <= self.threshold

    def check(self, feats) -> list[GateResult]:
        """Per photo: accepted or not, with a plain-language reason for a refusal."""
        return [GateResult(bool(s <= self.threshold), float(s), self.threshold,
                           None if s <= self.threshold else self.reason(float(s)))
                for s in self.score(feats)]

    def reason(self, score: float) -> str:
        what = "cosine distance to its nearest training photos" if self.method == "knn" \
            else "Mahalanobis distance from the training photos"
        return (f"it lies further from the training photos than {self.accept_quantile:.1%} of the validation photos "
                f"did: its {what} is {score:.3g}, the limit {self.threshold:.3g}")

    # ---------------------------------------------------------------- storage
    def to_meta(self) -> dict:
        """The JSON part (the arrays travel separately, e.g. in a safetensors file)."""
        return {"method": self.method, "threshold": self.threshold, "accept_quantile": self.accept_quantile,
                "n_reference": self.n_reference, "n_validation": self.n_validation, "dim": self.dim, "k": self.k,
                "val_score_quantiles": self.val_score_quantiles, "arrays": sorted(self.arrays),
                "score": "higher = further from the training photos; refused when score > threshold"}

    @classmethod
    def from_meta(cls, meta: dict, arrays: dict) -> OODGate:
        need = {"knn": ("reference",), "mahalanobis": ("mean", "basis", "eigenvalues", "isotropic")}
        method = meta.get("method")
        missing = [a for a in need.get(method, ()) if a not in arrays]
        if method not in need or missing:
            raise GateError(f"gate description incomplete: method {method!r}, missing arrays {missing}")
        return cls(method=method, threshold=float(meta["threshold"]), accept_quantile=float(meta["accept_quantile"]),
                   n_reference=int(meta["n_reference"]), n_validation=int(meta["n_validation"]),
                   dim=int(meta["dim"]), k=meta.get("k"), val_score_quantiles=meta.get("val_score_quantiles", {}),
                   arrays={k: np.asarray(v) for k, v in arrays.items()})


@dataclass(frozen=True)
class EnsembleGate:
    """The members' own gates for an ensemble, each scoring its member's part of the side-by-side features.

    A member's ratio is its distance over its own threshold (> 1: that member refuses). The ensemble's score is
    the lower median of the ratios, the ceil(K/2)-th smallest: the photo is refused when more than half of the
    members refuse it. Each member's threshold was set on photos that member never trained on (its validation
    fold), which no single gate over all the members could have."""
    gates: tuple
    method: str = "ensemble"
    threshold: float = 1.0

    @property
    def dim(self) -> int:
        return sum(g.dim for g in self.gates)

    @property
    def accept_quantile(self) -> float:
        return min(g.accept_quantile for g in self.gates)

    @property
    def n_reference(self) -> int:
        return sum(g.n_reference for g in self.gates)

    @property
    def n_validation(self) -> int:
        return sum(g.n_validation for g in self.gates)

    @property
    def k(self):
        return None

    @property
    def arrays(self) -> dict:
        return {f"{i}.{name}": a for i, g in enumerate(self.gates) for name, a in g.arrays.items()}

    def ratios(self, feats) -> np.ndarray:
        """(N, K): each member's distance over its threshold."""
        x = _check_features(feats, self.dim)
        cuts = np.cumsum([0] + [g.dim for g in self.gates])
        return np.stack([g.score(x[:, a:b]) / g.threshold for g, a, b in zip(self.gates, cuts[:-1], cuts[1:])], 1)

    def score(self, feats) -> np.ndarray:
        return _lower_median(self.ratios(feats))

    def accepts(self, feats) -> np.ndarray:
        return self.score(feats) <= self.threshold

    def check(self, feats) -> list[GateResult]:
        ratios = self.ratios(feats)
        return [GateResult(bool(s <= self.threshold), float(s), self.threshold,
                           None if s <= self.threshold else self.reason(float(s), int((row > 1).sum())))
                for s, row in zip(_lower_median(ratios), ratios)]

    def reason(self, score: float, refusing: int | None = None) -> str:
        who = f"{refusing} of the {len(self.gates)}" if refusing is not None else "most of the"
        return (f"{who} models find it further from their training photos than {self.accept_quantile:.1%} of "
                f"their validation photos were: in the median, {score:.3g} times each model's limit")

    def to_meta(self) -> dict:
        return {"method": self.method, "threshold": self.threshold, "accept_quantile": self.accept_quantile,
                "n_reference": self.n_reference, "n_validation": self.n_validation, "dim": self.dim,
                "members": [g.to_meta() for g in self.gates],
                "score": "lower median over members of distance / member threshold; refused when score > 1 "
                         "(more than half of the members refuse)"}

    @classmethod
    def from_meta(cls, meta: dict, arrays: dict) -> EnsembleGate:
        members = meta.get("members") or []
        if not members:
            raise GateError("ensemble gate description lists no members")
        gates = []
        for i, m in enumerate(members):
            part = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.split(".", 1)[0] == str(i)}
            gates.append(OODGate.from_meta(m, part))
        return cls(tuple(gates))


def _lower_median(ratios: np.ndarray) -> np.ndarray:
    """Per row, the ceil(K/2)-th smallest of K ratios: above 1 exactly when more than half of them are."""
    return np.sort(ratios, axis=1)[:, (ratios.shape[1] - 1) // 2]


def gate_from_meta(meta: dict, arrays: dict):
    """An OODGate, or an EnsembleGate when the description says so."""
    return (EnsembleGate if meta.get("method") == "ensemble" else OODGate).from_meta(meta, arrays)


# -------------------------------------------------------------------- fitting
def describe(train_feats, method: str = DEFAULT_METHOD, *, k: int = DEFAULT_K, seed: int = 0) -> dict:
    """The descriptor arrays of the training photos for `method`."""
    x = _check_features(train_feats, None)
    if method == "knn":
        if len(x) < k:
            raise GateError(f"k = {k} nearest neighbours need at least {k} training photos, got {len(x)}")
        if len(x) > MAX_REFERENCE:
            x = x[np.sort(np.random.default_rng(seed).choice(len(x), MAX_REFERENCE, replace=False))]
        return {"reference": _normalise(x).astype(np.float16)}
    if method == "mahalanobis":
        return _shrunk_gaussian(x)
    raise GateError(f"unknown gate method {method!r}; expected one of {', '.join(METHODS)}")


def fit_gate(train_feats, val_feats, method: str = DEFAULT_METHOD, *, k: int = DEFAULT_K,
             accept_quantile: float = ACCEPT_QUANTILE, seed: int = 0) -> OODGate:
    """Describe the training photos, then set the threshold so `accept_quantile` of the validation photos pass.

    Validation photos are in-distribution photos the descriptor has not seen (a training photo's own kNN distance
    would count itself), so their scores are what a new, genuine photo would get."""
    if not 0.5 <= accept_quantile < 1.0:
        raise GateError(f"accept_quantile must be in [0.5, 1), got {accept_quantile}")
    train = _check_features(train_feats, None)
    val = _check_features(val_feats, train.shape[1])
    if len(val) < 10:
        raise GateError(f"need at least 10 validation photos to set the gate's threshold, got {len(val)}")
    arrays = describe(train, method, k=k, seed=seed)
    probe = OODGate(method, np.inf, accept_quantile, int(len(arrays.get("reference", train))), len(val),
                    train.shape[1], k if method == "knn" else None, {}, arrays)
    scores = probe.score(val)
    threshold = float(np.quantile(scores, accept_quantile, method="higher"))  # an observed validation score
    quantiles = {q: float(np.quantile(scores, float(q))) for q in ("0.5", "0.9", "0.975", "1.0")}
    return OODGate(method, threshold, accept_quantile, probe.n_reference, len(val), train.shape[1], probe.k,
                   quantiles, arrays)


# -------------------------------------------------------------------- maths
def _check_features(feats, dim: int | None) -> np.ndarray:
    x = np.asarray(feats, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise GateError(f"features must be a non-empty (N, D) array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise GateError(f"features have {x.shape[1]} dimensions but the gate was fitted on {dim}")
    if not np.isfinite(x).all():
        raise GateError("features contain NaN or infinite values")
    return x


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _knn_scores(xn: np.ndarray, ref: np.ndarray, k: int) -> np.ndarray:
    """1 - cosine similarity to the k-th most similar reference row."""
    sims = xn @ ref.T
    kth = np.partition(-sims, k - 1, axis=1)[:, k - 1]
    return (1.0 + kth).astype(np.float64)


def _shrunk_gaussian(x: np.ndarray) -> dict:
    from sklearn.covariance import LedoitWolf
    lw = LedoitWolf(assume_centered=False).fit(x.astype(np.float64))
    d = x.shape[1]
    # LedoitWolf's covariance = (1 - a) S + a (tr S / d) I: same eigenvectors as S, eigenvalues shrunk to a floor.
    centred = x - lw.location_
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    keep = sv > sv[0] * 1e-6 if len(sv) else np.zeros(0, bool)
    basis = vt[keep].T  # (D, r)
    cov = lw.covariance_
    eig = np.einsum("dr,de,er->r", basis, cov, basis)  # exact: basis columns are eigenvectors of cov
    r = basis.shape[1]
    iso = float((np.trace(cov) - eig.sum()) / (d - r)) if d > r else float(eig.min())
    return {"mean": lw.location_.astype(np.float32), "basis": basis.astype(np.float32),
            "eigenvalues": eig.astype(np.float32), "isotropic": np.array([iso], np.float32)}


def _mahalanobis(x, mean, basis, eig, iso) -> np.ndarray:
    d = x.astype(np.float64) - mean.astype(np.float64)
    proj = d @ basis.astype(np.float64)
    inside = (proj ** 2 / eig.astype(np.float64)).sum(axis=1)
    outside = np.maximum((d ** 2).sum(axis=1) - (proj ** 2).sum(axis=1), 0.0) / iso
    return np.sqrt(inside + outside)
