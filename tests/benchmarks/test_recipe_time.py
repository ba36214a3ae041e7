"""benchmarks/recipe_time.py: a fresh run timed in a child process, and the numbers read back from its folder."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import recipe_time  # noqa: E402

from core import runfolder  # noqa: E402
from core.bundle import read_meta  # noqa: E402
from tests.conftest import synthetic_set, tiny_config  # noqa: E402


@pytest.mark.slow
def test_a_nested_cross_validation_is_timed_and_its_folds_and_metrics_are_read_back(tmp_path, capsys):
    data = synthetic_set(tmp_path / "data")
    labels, images = data / "labels.csv", data / "images"
    cfg = tmp_path / "cv.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(labels, images, cv={"folds": 3}, report_test=True)))
    out, js = tmp_path / "run", tmp_path / "timing.json"
    assert recipe_time.main(["--config", str(cfg), "--nested", "--out", str(out), "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["run"]["exit_code"] == 0 and r["run"]["wall_s"] > 0
    assert r["run"]["peak_rss_tree_sum_bytes"] >= r["run"]["peak_rss_largest_process_bytes"] > 100 * 2**20
    n, cv = r["numbers"], json.loads((out / runfolder.CV_REPORT).read_text())
    assert n["trained_on"] == read_meta(out).provenance.trained_on and n["trained_on"][0]["device"] == "cpu"
    assert [f["fold"] for f in n["folds"]] == [0, 1, 2]
    assert [f["train_seconds"] for f in n["folds"]] == [
        read_meta(runfolder.fold_path(out, k)).provenance.train_seconds for k in range(3)]
    assert n["out_of_fold"]["roc_auc"] == cv["metrics"]["roc_auc"] and n["out_of_fold"]["n"] == cv["n"]
    nested = cv["cv"]["nested"]  # the bundle's threshold comes with the transfer of the scores it was chosen on
    assert n["threshold"] == cv["cv"]["threshold"]["value"] == nested["threshold"]["value"]
    assert n["threshold_transfer"]["sensitivity"] == nested["threshold_transfer"]["sensitivity"]
    assert n["member_threshold"] == cv["cv"]["member_threshold"]["value"]
    assert n["member_threshold_transfer"]["sensitivity"] == cv["cv"]["threshold_transfer"]["sensitivity"]
    assert n["nested"]["roc_auc"] == nested["metrics"]["roc_auc"] and n["nested"]["pairs"] == 3
    assert n["nested"]["pair_train_seconds"] == pytest.approx(sum(
        read_meta(runfolder.pair_path(out, k, j)).provenance.train_seconds for k, j in ((0, 1), (0, 2), (1, 2))))
    test = json.loads((out / runfolder.TEST_REPORT).read_text())
    assert n["test"]["roc_auc"] == test["metrics"]["roc_auc"]
    printed = capsys.readouterr().out
    assert "fold 2:" in printed and "threshold_transfer" not in printed and "on new patients" in printed
    # a timing is of a run from scratch: an existing folder is refused, and nothing is written
    assert recipe_time.main(["--config", str(cfg), "--out", str(out), "--json", str(tmp_path / "again.json")]) == 2
    assert "from scratch" in capsys.readouterr().err and not (tmp_path / "again.json").exists()


def test_a_failed_run_writes_no_timing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstages: []\n")
    assert recipe_time.main(["--config", str(bad), "--out", str(tmp_path / "run"),
                             "--json", str(tmp_path / "t.json")]) == 1
    assert "train.fit exited" in capsys.readouterr().err and not (tmp_path / "t.json").exists()
