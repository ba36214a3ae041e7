"""Tests for train.compare (and core.evaluation.compare_scores): two models on the same photos, paired."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core import metrics, runfolder
from core.evaluation import compare_scores, scored_rows
from train import compare


def _rows(probs, labels=None):
    labels = labels if labels is not None else [1, 0] * (len(probs) // 2)
    return pd.DataFrame({"image": [f"im{i}.png" for i in range(len(probs))], "label": labels,
                         "patient_id": [f"p{i // 2}" for i in range(len(probs))], "prob": probs})


@pytest.fixture
def two_sources(tmp_path):
    rng = np.random.default_rng(1)
    y = np.array([1, 0] * 40)
    weak, strong = np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.2, 80), 0, 1), \
        np.clip(0.5 + 0.6 * (y - 0.5) + rng.normal(0, 0.2, 80), 0, 1)
    run = tmp_path / "cv_run"  # a cross-validated run folder: its out-of-fold predictions
    run.mkdir()
    _rows(weak, y).assign(fold=0, logit=0.0).to_csv(run / runfolder.OOF, index=False)
    report = tmp_path / "test_report.json"  # an evaluation report: its per-photo rows, in another order
    report.write_text(json.dumps({"metrics": {}, "predictions": _rows(strong, y).iloc[::-1].to_dict("records")}))
    return run, report, y, weak, strong


def test_compare_reads_a_cv_run_and_a_report_and_matches_photos_by_name(two_sources, tmp_path, capsys):
    run, report, y, weak, strong = two_sources
    out = tmp_path / "cmp.json"
    assert compare.main([str(run), str(report), "--n-boot", "300", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["roc_auc"]["a"] == pytest.approx(metrics.point_metrics(y, weak, 0.5)["roc_auc"])
    assert result["roc_auc"]["b"] == pytest.approx(metrics.point_metrics(y, strong, 0.5)["roc_auc"])
    assert result["roc_auc"]["difference"]["ci95"][0] > 0 and result["n_groups"] == 40
    printed = capsys.readouterr().out
    assert "80 photos (40 malignant, 40 patients)" in printed and "b - a +" in printed


def test_compare_refuses_other_photos_other_labels_and_sources_without_predictions(two_sources, tmp_path, capsys):
    run, report, y, weak, strong = two_sources
    with pytest.raises(ValueError, match="not the same photos .*1 only in the first"):
        compare_scores(_rows(weak, y), _rows(strong, y).iloc[1:])
    doubled = pd.concat([_rows(strong, y), _rows(strong, y).iloc[:1]], ignore_index=True)
    with pytest.raises(ValueError, match="second score set lists 1 photos more than once, e.g. im0.png"):
        compare_scores(_rows(weak, y), doubled)
    flipped = _rows(strong, y)
    flipped.loc[3, "label"] = 1 - flipped.loc[3, "label"]
    with pytest.raises(ValueError, match="1 photos have different labels in the two score sets, e.g. im3.png"):
        compare_scores(_rows(weak, y), flipped)
    with pytest.raises(FileNotFoundError, match="not a cross-validated run"):
        scored_rows(tmp_path / "..")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"metrics": {}}))
    assert compare.main([str(empty), str(report)]) == 2
    assert "no per-photo predictions" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "nowhere.json"), str(report)]) == 2


def test_a_report_that_keeps_file_names_only_is_matched_to_a_run_by_file_name(two_sources):
    """The built-in demo ships its reports with file names only; a run's report names the same photos by path."""
    _, _, y, weak, strong = two_sources
    with_paths = _rows(strong, y).assign(image=lambda r: "/data/pad/images/" + r["image"])
    result = compare_scores(_rows(weak, y), with_paths, n_boot=200)
    same = compare_scores(_rows(weak, y), _rows(strong, y), n_boot=200)
    assert result["roc_auc"] == same["roc_auc"] and result["n"] == 80
    assert result["matched_by"].startswith("file name") and same["matched_by"] == "image path"
    # two folders holding a photo of the same name: file names cannot tell them apart, so no match is made
    clash = with_paths.copy()
    clash.loc[1, "image"] = "/other/" + clash.loc[0, "image"].rsplit("/", 1)[1]
    with pytest.raises(ValueError, match="not the same photos"):
        compare_scores(_rows(weak, y), clash)


def test_a_missing_source_and_an_unwritable_json_are_named_before_the_bootstrap(two_sources, tmp_path, capsys):
    """A typo'd path said 'not an evaluation report'; --json into a missing folder failed after all the work."""
    run, report, *_ = two_sources
    assert compare.main([str(tmp_path / "nope.json"), str(report)]) == 2
    assert f"{tmp_path / 'nope.json'}: not found" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert compare.main([str(run), str(report), "--json", str(tmp_path / "a_file" / "c.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert compare.main([str(run), str(report), "--json", str(report)]) == 2  # the report it reads
    assert "is an input of this command" in capsys.readouterr().err and json.loads(report.read_text())["metrics"] == {}
