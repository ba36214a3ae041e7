"""core.evaluation.build_report: its per-photo rows are strict JSON (a missing value is null, never NaN)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from core.evaluation import build_report


def test_missing_subgroup_values_are_null_in_the_rows_and_the_report_is_strict_json():
    df = pd.DataFrame({"image": [f"p{i}.jpg" for i in range(8)], "label": [0, 1] * 4,
                       "patient_id": [f"P{i // 2}" for i in range(8)],
                       "fitzpatrick": [2.0, np.nan, 3.0, np.nan, 2.0, 3.0, np.nan, 2.0]})
    probs = np.linspace(0.1, 0.9, 8)
    report = build_report(df, probs, 0.5, n_boot=50, seed=0)
    rows = report["predictions"]
    assert [r["fitzpatrick"] for r in rows] == [2.0, None, 3.0, None, 2.0, 3.0, None, 2.0]
    assert [r["label"] for r in rows] == [0, 1] * 4 and [r["pred"] for r in rows] == [0, 0, 0, 0, 1, 1, 1, 1]
    back = json.loads(json.dumps(report, allow_nan=False, default=float))  # raises on a NaN anywhere
    assert back["predictions"][1]["fitzpatrick"] is None and back["predictions"][0]["prob"] == probs[0]


def test_fitzpatrick_subgroups_are_named_by_type_whatever_the_column_was_read_as():
    """A column with blanks reads back from CSV as floats (2.0); the dashboard must show type 2, not 2.0."""
    df = pd.DataFrame({"image": [f"p{i}.jpg" for i in range(8)], "label": [0, 1] * 4,
                       "fitzpatrick": [2.0, np.nan, 3.0, np.nan, 2.0, "III", np.nan, 2]})
    report = build_report(df, np.linspace(0.1, 0.9, 8), 0.5, n_boot=20, seed=0)
    assert list(report["subgroups"]["fitzpatrick"]) == ["2", "3", "unknown"]
    assert report["subgroups"]["fitzpatrick"]["2"]["n"] == 3 and report["subgroups"]["fitzpatrick"]["3"]["n"] == 2
