"""The logit/probability maps: inverse of each other, finite at 0 and 1, scalars stay scalars."""
from __future__ import annotations

import numpy as np
import pytest

from core import scores
from core.context import image_logit


def test_logit_and_sigmoid_invert_each_other_and_match_the_textbook_formulas():
    p = np.array([1e-5, 0.01, 0.3, 0.5, 0.77, 0.999])
    z = scores.logit(p)
    np.testing.assert_allclose(z, np.log(p / (1 - p)), rtol=1e-12)
    np.testing.assert_allclose(scores.sigmoid(z), p, rtol=1e-12)
    assert scores.sigmoid(0.0) == 0.5 and isinstance(scores.sigmoid(0.0), float)
    assert isinstance(scores.logit(0.25), float) and scores.logit(0.25) == pytest.approx(np.log(1 / 3))


def test_certain_probabilities_map_to_finite_logits_at_the_clip():
    z = scores.logit(np.array([0.0, 1.0]))
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z, [np.log(scores.EPS / (1 - scores.EPS)), -np.log(scores.EPS / (1 - scores.EPS))])
    assert scores.sigmoid(np.array([-800.0, 800.0])).tolist() == [0.0, 1.0]  # no NaN from overflow


def test_the_context_fusion_reads_image_scores_with_the_clip_its_stages_were_fitted_with():
    assert image_logit(1e-9) == pytest.approx(np.log(1e-6 / (1 - 1e-6)))  # not the default 1e-7 clip
    assert image_logit(0.3) == pytest.approx(scores.logit(0.3))
