"""benchmarks/lighting.py: the per-factor summary counts verdict changes among photos assessed before and after."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import lighting  # noqa: E402


def test_changes_are_counted_among_photos_assessed_both_times_and_by_direction():
    cols = ["factor", "luma", "before", "after", "prob_change", "too_dark"]
    df = pd.DataFrame([(0.5, 60.0, "flagged", "not flagged", -0.2, False),
                       (0.5, 70.0, "not flagged", "not flagged", 0.0, False),
                       (0.5, 30.0, "flagged", "not assessed", 0.1, True),
                       (0.25, 20.0, "not flagged", "flagged", 0.3, True)], columns=cols)
    half, quarter = lighting.summary(df)
    assert (half["factor"], half["n"], half["assessed_both"]) == (0.5, 3, 2)  # the refused photo is not a change
    assert half["verdict_changed"] == 0.5 and (half["flagged_to_not"], half["not_to_flagged"]) == (1, 0)
    assert half["refused"] == round(1 / 3, 3) and half["warned_too_dark"] == round(1 / 3, 3)
    assert half["median_luma"] == 60.0
    assert quarter["verdict_changed"] == 1.0 and quarter["not_to_flagged"] == 1
