"""The model's two score scales, logit and probability, and the numpy maps between them (one definition)."""
from __future__ import annotations

import numpy as np

EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] before the logit, so 0 and 1 map to finite logits


def sigmoid(z) -> float | np.ndarray:
    """Probability from a logit; a float for a scalar, an array otherwise."""
    with np.errstate(over="ignore"):  # exp overflows to inf for z < -709: 1 / inf is the right limit, 0
        out = 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))
    return float(out) if np.ndim(out) == 0 else out


def logit(p, eps: float = EPS) -> float | np.ndarray:
    """Logit from a probability clipped to [eps, 1 - eps]; a float for a scalar, an array otherwise."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    out = np.log(p) - np.log1p(-p)
    return float(out) if np.ndim(out) == 0 else out
