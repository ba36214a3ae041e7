"""Nested cross-validation: the pair runs' splits, the nested out-of-fold scores (each photo scored by the K-1 pair
models that never trained on it), the ensemble threshold and calibration fitted on them, and resuming a finished
cross-validation into a nested one (and stopping in the middle of a pair run)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from core import cv, jobs, metrics, nested, reports, runfolder, training
from core.bundle import load_bundle, read_meta
from core.config import ConfigError, run_config_from_dict
from core.manifest import read_manifest
from core.splits import TEST_FOLD, pair_split
from tests.conftest import synthetic_set, tiny_config

K = 3


def _config(root, nested_on=True):
    return run_config_from_dict(tiny_config(root / "labels.csv", root / "images", report_test=True,
                                            cv={"folds": K, "nested": nested_on}))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_set(tmp_path_factory.mktemp("nested"))


@pytest.fixture(scope="module")
def finished(data, one_thread):
    """An uninterrupted nested 3-fold run (3 fold runs, 3 pair runs) with a test split."""
    run = data / "runs" / "straight"
    cv.fit_cv(_config(data), run)
    return run


# ------------------------------------------------------------------ pure parts
def _folds():
    fold = [0, 0, 1, 1, 2, 2, TEST_FOLD]
    return pd.DataFrame({"image": [f"i{n}" for n in range(7)], "label": [0, 1, 0, 1, 0, 1, 1],
                         "patient_id": [f"p{n}" for n in range(7)], "fold": fold,
                         "split": ["test" if f == TEST_FOLD else "train" for f in fold]})


def test_pair_split_validates_on_both_left_out_folds_and_keeps_the_test_rows():
    split = pair_split(_folds(), 0, 2)
    assert split == {"i0": "val", "i1": "val", "i2": "train", "i3": "train", "i4": "val", "i5": "val",
                     "i6": "test"}
    assert nested.pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_nested_scores_combine_the_pair_models_that_left_out_the_photos_fold():
    folds = _folds()
    rng = np.random.default_rng(0)
    rows = []
    for k, j in nested.pairs(K):
        for image, f in zip(folds["image"], folds["fold"]):
            if f in (k, j):
                rows.append({"image": image, "label": int(folds.set_index("image").loc[image, "label"]),
                             "patient_id": "p", "pair": f"{k}_{j}", "logit": float(rng.normal(0, 2))})
    scores = pd.DataFrame(rows)
    out = nested.nested_oof(scores, folds, "mean_prob").set_index("image")
    assert sorted(out.index) == [f"i{n}" for n in range(6)] and (out["members"] == K - 1).all()
    mine = scores[scores["image"] == "i2"]  # fold 1: pairs 0_1 and 1_2
    assert set(mine["pair"]) == {"0_1", "1_2"}
    mean_prob = np.mean(1 / (1 + np.exp(-mine["logit"].to_numpy())))
    assert out.loc["i2", "prob"] == pytest.approx(mean_prob)  # the ensemble's own rule: the mean probability
    assert out.loc["i2", "logit"] == pytest.approx(np.log(mean_prob / (1 - mean_prob)))
    by_logit = nested.nested_oof(scores, folds, "mean_logit").set_index("image")
    assert by_logit.loc["i2", "logit"] == pytest.approx(mine["logit"].mean())
    wrong = scores.copy()
    wrong.loc[(wrong["image"] == "i0") & (wrong["pair"] == "0_1"), "pair"] = "1_2"  # a model that trained on i0
    with pytest.raises(RuntimeError, match=r"i0 \(fold 0\) was scored by pair models \['0_2', '1_2'\]"):
        nested.nested_oof(wrong, folds, "mean_prob")
    with pytest.raises(RuntimeError, match="cover 5 of 6 non-test photos"):
        nested.nested_oof(scores[scores["image"] != "i5"], folds, "mean_prob")


def test_nested_needs_three_folds_and_a_yes_or_no():
    raw = lambda cvd: tiny_config("l.csv", "i", cv=cvd)  # noqa: E731
    with pytest.raises(ConfigError, match="cv.nested needs at least 3 folds, not 2"):
        run_config_from_dict(raw({"folds": 2, "nested": True}))
    with pytest.raises(ConfigError, match="cv.nested"):
        run_config_from_dict(raw({"folds": 5, "nested": "sometimes"}))
    assert run_config_from_dict(raw({"folds": 5, "nested": "true"})).cv.nested  # --set cv.nested=true
    assert not run_config_from_dict(raw({"folds": 5})).cv.nested


def test_the_command_line_and_the_train_page_request_switch_nested(tmp_path):
    from train.fit import build_parser, load_raw
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ncv: {folds: 5}\nstages: []\n")
    assert load_raw(build_parser().parse_args(["--config", str(recipe), "--nested"]))["cv"] == {"folds": 5,
                                                                                              "nested": True}
    assert "nested" not in load_raw(build_parser().parse_args(["--config", str(recipe)]))["cv"]
    req = jobs.TrainRequest(recipe=str(recipe), name="r1", nested=True)
    assert "--nested" in jobs.training_command(req, tmp_path / "r1")
    assert "--no-nested" in jobs.training_command(jobs.TrainRequest(recipe=str(recipe), name="r1", nested=False),
                                                  tmp_path / "r1")
    assert jobs.recipe_summary(recipe)["nested"] is False
    with pytest.raises(jobs.LaunchError, match="nested cross-validation needs at least 3 folds, not 2"):
        jobs.start_training(jobs.TrainRequest(recipe=str(recipe), name="r2", nested=True, folds=2), tmp_path)


def test_progress_names_the_pair_run_and_counts_the_pair_runs_done():
    info = jobs.RunInfo(name="r", path=None, state="running", stage_name="head", epoch=0, epochs=2,
                        cv={"folds": 3, "fold": None, "done": [0, 1, 2], "pairs": 3, "pair": [0, 2],
                            "pairs_done": [[0, 1]]})
    assert info.progress() == "pair run 2/3 (folds 0 and 2 left out), stage head, epoch 1/2"
    idle = jobs.RunInfo(name="r", path=None, state="stopped",
                        cv={"folds": 3, "fold": None, "done": [0, 1, 2], "pairs": 3, "pair": None,
                            "pairs_done": [[0, 1]]})
    assert idle.progress() == "3 of 3 folds and 1 of 3 pair runs done"
    assert idle.cv_progress() == (pytest.approx(4 / 6), "3 of 3 folds and 1 of 3 pair runs done")
    single_cv = jobs.RunInfo(name="r", path=None, state="stopped", cv={"folds": 5, "fold": None, "done": [0, 1]})
    assert single_cv.cv_progress() == (pytest.approx(2 / 5), "2 of 5 folds done")
    assert jobs.RunInfo(name="r", path=None, state="finished").cv_progress() is None


# ------------------------------------------------------------------ a nested run end to end
@pytest.mark.slow
def test_each_pair_run_leaves_out_its_two_folds_and_never_sees_test(finished):
    folds = runfolder.read_folds(finished)
    for k, j in nested.pairs(K):
        run = runfolder.pair_path(finished, k, j)
        assert run == finished / "nested" / f"pair_{k}_{j}"
        assert runfolder.read_status(run)["state"] == "finished" and not (run / "test_report.json").exists()
        split = read_manifest(run / "splits" / "1_finetune.csv")
        of = dict(zip(folds["image"], folds["fold"]))
        assert {of[i] for i in split.loc[split["split"] == "val", "image"]} == {k, j}
        assert {of[i] for i in split.loc[split["split"] == "train", "image"]} == set(range(K)) - {k, j}
        assert {of[i] for i in split.loc[split["split"] == "test", "image"]} == {TEST_FOLD}
    status = runfolder.read_status(finished)
    assert status["cv"]["pairs_done"] == [list(p) for p in nested.pairs(K)] and status["cv"]["pair"] is None


@pytest.mark.slow
def test_nested_scores_are_the_pair_models_own_predictions_combined(finished):
    scores = runfolder.read_nested_oof(finished)
    folds = runfolder.read_folds(finished)
    assert list(scores.columns) == list(nested.NESTED_COLUMNS) and (scores["members"] == K - 1).all()
    assert sorted(scores["image"]) == sorted(folds.loc[folds["fold"] != TEST_FOLD, "image"])
    own = {}
    for k, j in nested.pairs(K):  # each pair model's validation report (its own fp32 predictions)
        val = json.loads((runfolder.pair_path(finished, k, j) / "val_report.json").read_text())["predictions"]
        for r in val:
            own.setdefault(r["image"], []).append(r["prob"])
    for row in scores.itertuples():
        assert len(own[row.image]) == K - 1
        assert row.prob == pytest.approx(np.mean(own[row.image]), abs=1e-5)


@pytest.mark.slow
def test_the_ensemble_threshold_and_calibration_are_fitted_on_the_nested_scores(finished):
    scores = runfolder.read_nested_oof(finished)
    oof = runfolder.read_oof(finished)
    b = load_bundle(finished)
    expected = metrics.choose_threshold(scores["label"], scores["prob"], rule="sensitivity", target=0.9)
    assert b.meta.threshold.value == pytest.approx(expected["threshold"])
    single = metrics.choose_threshold(oof["label"], oof["prob"], rule="sensitivity", target=0.9)["threshold"]
    assert b.meta.threshold.value != pytest.approx(single)  # not the single models' out-of-fold threshold
    assert b.meta.threshold.chosen_on.startswith("out-of-fold predictions of 2-model ensembles (nested")
    assert b.meta.threshold.population == "out-of-fold"
    assert b.meta.threshold.val_sensitivity["value"] == pytest.approx(expected["achieved"]["sensitivity"])
    if b.calibration is not None:
        assert b.calibration.fitted_on == "nested out-of-fold" and b.calibration.n == len(scores)
    rep = json.loads((finished / runfolder.CV_REPORT).read_text())
    n = rep["cv"]["nested"]
    assert rep["cv"]["threshold"]["value"] == pytest.approx(b.meta.threshold.value)
    assert rep["cv"]["member_threshold"]["value"] == pytest.approx(single) == pytest.approx(rep["threshold"])
    assert (n["pairs"], n["members_per_photo"], n["n"]) == (3, 2, len(scores))
    auc = metrics.point_metrics(scores["label"], scores["prob"], b.meta.threshold.value)["roc_auc"]
    assert n["metrics"]["roc_auc"]["value"] == pytest.approx(auc) and n["metrics"]["roc_auc"]["ci95"]
    for r in n["threshold_transfer"]["per_fold"]:  # cross-fitted on the nested scores
        rest = scores[scores["fold"] != r["fold"]]
        assert r["threshold"] == pytest.approx(metrics.choose_threshold(rest["label"], rest["prob"],
                                                                        rule="sensitivity", target=0.9)["threshold"])
    assert any(note.startswith("nested:") for note in rep["notes"])
    spent = {kind: sum(read_meta(path(finished, *args) / "bundle").provenance.train_seconds for args in runs)
             for kind, path, runs in (("folds", runfolder.fold_path, [(k,) for k in range(K)]),
                                      ("pairs", runfolder.pair_path, nested.pairs(K)))}
    assert n["train_seconds"] == pytest.approx(spent["pairs"]) and spent["pairs"] > 0
    assert b.meta.provenance.train_seconds == pytest.approx(spent["folds"] + spent["pairs"])  # pairs count too
    text = reports.cv_nested_text(rep)
    assert text.splitlines()[0] in runfolder.log_tail(finished, lines=500)
    assert "ensemble threshold on new patients" in text and reports.cv_nested_text({"cv": {"folds": 3}}) is None
    curves = reports.cv_roc_curves(rep)
    assert curves[-1]["name"] == "nested out-of-fold (2-model ensembles)" and curves[-1]["auc"] == pytest.approx(auc)
    test = json.loads((finished / "test_report.json").read_text())
    assert test["threshold"] == pytest.approx(b.meta.threshold.value)  # the test split meets the nested threshold


@pytest.mark.slow
def test_a_finished_cross_validation_resumed_with_nested_stopped_in_a_pair_run_ends_like_a_straight_run(
        data, finished, monkeypatch, one_thread):
    """The fold runs are kept (not retrained), the pair runs are added; a stop in the middle of the second pair run
    resumes after its last finished epoch; the nested scores and the bundle equal the uninterrupted run's."""
    run = data / "runs" / "upgraded"
    cv.fit_cv(_config(data, nested_on=False), run)
    assert runfolder.read_nested_oof(run) is None and "nested" not in json.loads((run / "cv_report.json").read_text())["cv"]
    fold_weights = (runfolder.fold_path(run, 0) / "bundle" / "model.safetensors").read_bytes()
    real, seen = training.train_epoch, []

    def watch_and_stop(*args, **kwargs):
        seen.append(jobs.run_info(run).progress())
        if len(seen) == 3 + 2:  # pair 1 done (3 epochs); pair 2's head epoch done, its finetune epoch 1 starts
            runfolder.request_stop(run, by="test")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", watch_and_stop)
    with pytest.raises(training.Stopped):
        cv.fit_cv(_config(data), run, resume=True)
    assert seen[0] == "pair run 1/3 (folds 0 and 1 left out), stage head, epoch 1/1"
    assert seen[-1] == "pair run 2/3 (folds 0 and 2 left out), stage finetune, epoch 1/2"
    assert runfolder.read_config(run)["cv"]["nested"] is True  # the switch is recorded at once
    monkeypatch.setattr(training, "train_epoch", real)
    cv.fit_cv(_config(data), run, resume=True)
    log = runfolder.log_tail(run, lines=600)
    assert "resumed with cv.nested on (it was off)" in log and "nested: 3 pair runs, 1 already done" in log
    assert "[pair_0_2] resuming" in log
    assert (runfolder.fold_path(run, 0) / "bundle" / "model.safetensors").read_bytes() == fold_weights
    ours, straight = runfolder.read_nested_oof(run), runfolder.read_nested_oof(finished)
    assert ours["image"].tolist() == straight["image"].tolist()
    np.testing.assert_allclose(ours["prob"], straight["prob"], atol=1e-6)
    assert load_bundle(run).threshold == pytest.approx(load_bundle(finished).threshold)
    shutil.rmtree(run)



@pytest.mark.slow
def test_the_dashboard_shows_the_nested_scores_caption_and_their_roc_curve(finished, monkeypatch, tmp_path):
    from tests.app.conftest import dashboard_with
    at = dashboard_with("straight/cv_report.json", finished.parent, monkeypatch, tmp_path / "no_evidence")
    assert not at.exception
    assert any(c.value.startswith("Nested out-of-fold (2-model ensembles, 3 pair models") and
               ". Ensemble threshold on new patients" in c.value for c in at.caption)
    nested_traces = [t for s in at.chart_specs for t in s["data"] if t.get("name", "").startswith("nested out-of-fold")]
    assert len(nested_traces) == 1 and nested_traces[0]["line"]["dash"] == "dash"
