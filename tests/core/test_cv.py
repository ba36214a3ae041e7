"""Cross-validated training end to end on synthetic photos: the folds, the out-of-fold predictions, the threshold
and reports made from them, the ensemble bundle, stop and resume in the middle of a fold, and fold progress."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from core import cv, jobs, metrics, reports, runfolder, training
from core.bundle import load_bundle
from core.config import run_config_from_dict
from core.evaluation import predict_probs
from core.manifest import read_manifest
from core.splits import TEST_FOLD
from tests.conftest import shared_path, synthetic_set, tiny_config

K = 3


def _config(root, **run):
    return run_config_from_dict(tiny_config(root / "labels.csv", root / "images", cv={"folds": K},
                                            report_test=True, **run))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_set(tmp_path_factory.mktemp("cv"))


@pytest.fixture(scope="module")
def finished(data, one_thread):
    """An uninterrupted 3-fold run with a test split and report_test."""
    cv.fit_cv(_config(data), data / "runs" / "straight")
    return data / "runs" / "straight"


# ------------------------------------------------------------------ the run folder
@pytest.mark.slow
def test_cv_run_folder_has_the_folds_the_fold_runs_and_the_results(finished):
    for name in ("config.yaml", "status.json", "train.log", runfolder.FOLDS, runfolder.OOF, runfolder.CV_REPORT,
                 "test_report.json", "bundle/model.json", "splits/1_finetune.csv"):
        assert (finished / name).is_file(), name
    assert not (finished / runfolder.CHECKPOINT).exists() and not (finished / "val_report.json").exists()
    for k in range(K):
        fold = runfolder.fold_path(finished, k)
        assert fold == finished / "folds" / f"fold_{k}"
        assert runfolder.read_status(fold)["state"] == "finished" and runfolder.has_bundle(fold)
        assert not (fold / "test_report.json").exists()  # only the ensemble sees the test patients, once
        split = read_manifest(fold / "splits" / "1_finetune.csv")
        folds = runfolder.read_folds(finished)
        val = set(folds.loc[folds["fold"] == k, "image"])
        assert set(split.loc[split["split"] == "val", "image"]) == val  # its own fold validates it
        assert set(split.loc[split["split"] == "test", "image"]) == set(folds.loc[folds["fold"] == TEST_FOLD,
                                                                                  "image"])
    status = runfolder.read_status(finished)
    assert status["state"] == "finished" and status["cv"] == {"folds": K, "fold": None, "done": [0, 1, 2]}
    top = read_manifest(finished / "splits" / "1_finetune.csv")  # every non-test photo trained some member
    assert set(top["split"]) == {"train", "test"}
    log = runfolder.log_tail(finished, lines=400)
    assert "[fold_2] stage 1 epoch 1" in log and "mean of folds" in log and "SD of folds" in log
    assert "test (held-out patients)" in log


@pytest.mark.slow
def test_folds_never_share_a_patient_with_each_other_or_with_test(finished):
    folds = runfolder.read_folds(finished)
    assert set(folds["fold"]) == {TEST_FOLD, 0, 1, 2}
    assert folds.groupby("patient_id")["fold"].nunique().max() == 1


@pytest.mark.slow
def test_out_of_fold_predictions_cover_each_non_test_photo_once_from_the_model_that_never_trained_on_it(finished):
    oof = runfolder.read_oof(finished)
    assert list(oof.columns) == list(cv.OOF_COLUMNS)
    folds = runfolder.read_folds(finished)
    non_test = folds[folds["fold"] != TEST_FOLD]
    assert sorted(oof["image"]) == sorted(non_test["image"]) and not oof["image"].duplicated().any()
    assert dict(zip(oof["image"], oof["fold"])) == dict(zip(non_test["image"], non_test["fold"]))
    np.testing.assert_allclose(oof["prob"], 1 / (1 + np.exp(-oof["logit"])), rtol=1e-9)
    for k in range(K):  # the fold model's own validation predictions (its val_report, fp32 predict_probs path)
        val = json.loads((runfolder.fold_path(finished, k) / "val_report.json").read_text())["predictions"]
        theirs = {r["image"]: r["prob"] for r in val}
        mine = oof[oof["fold"] == k]
        assert set(mine["image"]) == set(theirs)
        np.testing.assert_allclose(mine["prob"], mine["image"].map(theirs), atol=1e-5)


@pytest.mark.slow
def test_threshold_and_calibration_are_chosen_on_the_out_of_fold_predictions(finished):
    oof = runfolder.read_oof(finished)
    b = load_bundle(finished)
    t = b.meta.threshold
    expected = metrics.choose_threshold(oof["label"], oof["prob"], rule="sensitivity", target=0.9)["threshold"]
    assert t.value == pytest.approx(expected)
    assert t.chosen_on == f"out-of-fold predictions ({K} folds)"
    assert (t.n_val, t.n_val_malignant) == (len(oof), int(oof["label"].sum()))
    assert t.val_sensitivity["value"] >= 0.9 and t.val_sensitivity["ci95"] is not None
    assert b.calibration is None or (b.calibration.n == len(oof) and b.calibration.fitted_on == "out-of-fold")


@pytest.mark.slow
def test_cv_report_has_per_fold_metrics_their_spread_and_out_of_fold_cis(finished):
    rep = reports.load_report(finished / runfolder.CV_REPORT)  # an evaluation report of the out-of-fold rows
    oof = runfolder.read_oof(finished)
    assert rep["n"] == len(oof) and rep["split"] == "out-of-fold" and rep["roc"]
    assert rep["metrics"]["roc_auc"]["ci95"] is not None and "patients" in rep["ci_method"]
    assert any("out-of-fold" in n and "not an independent estimate" in n for n in rep["notes"])
    assert any("best epoch" in n and "optimistic" in n for n in rep["notes"])
    c = rep["cv"]
    transfer = c["threshold_transfer"]  # each fold judged at the threshold the other folds chose
    assert [r["fold"] for r in transfer["per_fold"]] == list(range(K))
    for r in transfer["per_fold"]:
        rest = oof[oof["fold"] != r["fold"]]
        assert r["threshold"] == pytest.approx(metrics.choose_threshold(rest["label"], rest["prob"],
                                                                        rule="sensitivity", target=0.9)["threshold"])
    assert reports.cv_transfer_text(rep) in runfolder.log_tail(finished, lines=400)
    # the bundle carries the same estimate, so the app can show it beside the in-sample numbers
    record = load_bundle(finished).meta.provenance.threshold_on_new_patients
    assert record == {"image": transfer, "fused": None}
    # and every report of the ensemble (here the test report) carries it in its model block
    test_model = json.loads((finished / "test_report.json").read_text())["model"]
    assert test_model["threshold_on_new_patients"] == record
    assert c["folds"] == K and not c["internal_estimate_only"] and len(c["per_fold"]) == K
    aucs = [f["metrics"]["roc_auc"] for f in c["per_fold"]]
    assert c["summary"]["roc_auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert c["summary"]["roc_auc"]["sd"] == pytest.approx(np.std(aucs, ddof=1))
    for f in c["per_fold"]:
        part = oof[oof["fold"] == f["fold"]]
        assert f["n"] == len(part) and f["run"] == f"folds/fold_{f['fold']}" and len(f["best_epochs"]) == 2
        recall = metrics.point_metrics(part["label"], part["prob"], rep["threshold"])["recall"]
        assert f["metrics"]["recall"] == pytest.approx(recall)  # at the common out-of-fold threshold
    table = reports.cv_fold_table(rep)
    assert table["Fold"].tolist() == ["fold 0", "fold 1", "fold 2", "mean of folds", "SD of folds",
                                      "out-of-fold (95% CI)"]
    assert table["n"].tolist() == [str(f["n"]) for f in c["per_fold"]] + ["", "", str(rep["n"])]
    assert not table.isna().any().any()  # blank where a row has no count, never "None" on screen
    curves = reports.cv_roc_curves(rep)
    assert [c["name"] for c in curves] == ["fold 0", "fold 1", "fold 2", "out-of-fold"] and curves[-1]["oof"]
    assert reports.cv_fold_table({"metrics": {}}).empty and reports.cv_roc_curves({"metrics": {}}) == []


@pytest.mark.slow
def test_the_ensemble_bundle_is_the_fold_models_and_is_tested_once(finished):
    b = load_bundle(finished)
    assert len(b.model.members) == K
    for k, member in enumerate(b.model.members):
        own = load_file(str(runfolder.fold_path(finished, k) / "bundle" / "model.safetensors"))
        for name, tensor in member.state_dict().items():
            assert np.array_equal(tensor.numpy(), own[name].numpy()), (k, name)
    info = b.meta.ensemble.member_info
    assert [m["fold"] for m in info] == [0, 1, 2] and info[0]["run"] == "folds/fold_0"
    prov = b.meta.provenance
    assert prov.run_name == "tiny" and "3 folds" in prov.stages[-1]["split"]
    assert len(prov.stages[-1]["best_epoch_per_fold"]) == K
    member_machines = [m.meta.provenance.trained_on for m in map(load_bundle, (runfolder.fold_path(finished, k)
                                                                              for k in range(K)))]
    assert member_machines[0] and all(m == member_machines[0] for m in member_machines)
    assert prov.trained_on == member_machines[0]  # one machine trained every fold: recorded once
    test = json.loads((finished / "test_report.json").read_text())
    assert test["model"]["threshold"]["chosen_on"] == f"out-of-fold predictions ({K} folds)"
    rows = pd.DataFrame(test["predictions"])
    folds = runfolder.read_folds(finished)
    assert set(rows["image"]) == set(folds.loc[folds["fold"] == TEST_FOLD, "image"])
    probs = predict_probs(b.model, rows[["image", "label"]], num_workers=0)
    np.testing.assert_allclose(probs, rows["prob"], atol=1e-5)


@pytest.mark.slow
def test_the_dashboard_shows_per_fold_and_out_of_fold_roc_curves(finished, monkeypatch, tmp_path):
    from tests.app.conftest import dashboard_with
    at = dashboard_with("straight/cv_report.json", finished.parent, monkeypatch, tmp_path / "no_evidence")
    assert not at.exception
    assert "Cross-validation: per-fold and out-of-fold" in [s.value for s in at.subheader]
    names = [t.get("name", "") for s in at.chart_specs for t in s["data"]]
    assert sum(n.startswith("fold ") for n in names) == K and any(n.startswith("out-of-fold") for n in names)
    assert any(c.value.startswith("Threshold rule on new patients") for c in at.caption)


# ------------------------------------------------------------------ stop and resume
@pytest.mark.slow
def test_a_stop_in_the_middle_of_fold_3_resumes_to_the_uninterrupted_result(data, finished, monkeypatch,
                                                                             one_thread):
    """A stop request in the top run folder stops the fold being trained; --resume skips the finished folds,
    continues fold 3 after its last finished epoch and ends with the same fold weights and out-of-fold
    predictions as an uninterrupted run. Meanwhile status.json says which fold, stage and epoch is running."""
    run = data / "runs" / "stopped"
    cfg = _config(data)
    real, seen = training.train_epoch, []

    def watch_and_stop(*args, **kwargs):
        seen.append((runfolder.read_status(run), jobs.run_info(run).progress()))
        if len(seen) == 2 * 3 + 3:  # folds 1 and 2 done (3 epochs each); fold 3, stage 1, its epoch 1 starts
            runfolder.request_stop(run, by="test")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", watch_and_stop)
    with pytest.raises(training.Stopped, match=r"stop requested in the run folder \(stopped\)"):
        cv.fit_cv(cfg, run)
    status, progress = seen[-1]
    assert status["cv"] == {"folds": K, "fold": 2, "done": [0, 1]}
    assert (status["stage_name"], status["epoch"], status["epochs"]) == ("finetune", 1, 2)
    assert progress == "fold 3/3, stage finetune, epoch 2/2"
    assert seen[0][1] == "fold 1/3, stage head, epoch 1/1"
    info = jobs.run_info(run)
    assert info.state == "stopped" and info.resumable and info.cv["done"] == [0, 1]
    assert "fold 3/3" in jobs.runs_table([info]).loc[0, "stage"]
    assert not runfolder.stop_requested(run) and not runfolder.has_bundle(run)
    assert runfolder.read_status(runfolder.fold_path(run, 2))["state"] == "stopped"
    assert runfolder.read_metrics(runfolder.fold_path(run, 2))[["stage", "epoch"]].values.tolist() == [[0, 0], [1, 0]]

    monkeypatch.setattr(training, "train_epoch", real)
    cv.fit_cv(cfg, run, resume=True)
    log = runfolder.log_tail(run, lines=400)
    assert "folds already done: 0, 1" in log and "[fold_2] resuming: stage 1, after epoch 0" in log
    for k in range(K):
        a = load_file(str(runfolder.fold_path(run, k) / "bundle" / "model.safetensors"))
        b = load_file(str(runfolder.fold_path(finished, k) / "bundle" / "model.safetensors"))
        for name in a:
            np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), atol=1e-6, err_msg=f"fold {k} {name}")
    ours, straight = runfolder.read_oof(run), runfolder.read_oof(finished)
    assert ours["image"].tolist() == straight["image"].tolist()
    np.testing.assert_allclose(ours["prob"], straight["prob"], atol=1e-6)
    assert load_bundle(run).threshold == pytest.approx(load_bundle(finished).threshold)
    assert runfolder.read_status(run)["state"] == "finished"


# ------------------------------------------------------------------ no test split
@pytest.mark.slow
def test_without_a_test_split_the_out_of_fold_metrics_are_said_to_be_the_only_internal_estimate(data, one_thread):
    raw = tiny_config(data / "labels.csv", data / "images", cv={"folds": 2}, split={"val": 0.0, "test": 0.0})
    for stage in raw["stages"]:
        stage["epochs"] = 1
    run = data / "runs" / "no_test"
    cv.fit_cv(run_config_from_dict(raw), run)
    rep = json.loads((run / runfolder.CV_REPORT).read_text())
    assert rep["cv"]["internal_estimate_only"] and rep["n"] == 40  # every photo is out-of-fold once
    assert any("only internal estimate" in n for n in rep["notes"])
    assert "only internal estimate" in runfolder.log_tail(run, lines=100)
    assert not (run / "test_report.json").exists()
    assert (runfolder.read_folds(run)["fold"] != TEST_FOLD).all()


def _context_recipe(root: Path, folds: int) -> dict:
    """A tiny cv recipe over 60 synthetic photos whose manifest carries answers (bleeding and age track the label)
    and a leaking `biopsed` column; written once per folder."""
    from core.manifest import write_manifest
    from tests.conftest import make_images
    manifest = root / "m.csv"
    if not manifest.exists():
        df = make_images(root / "images", n=60)
        rng = np.random.default_rng(0)
        df["image"] = [str((root / "images" / p).resolve()) for p in df["image"]]
        df["bleed"] = np.where(rng.random(len(df)) < 0.15 + 0.7 * df["label"], "True", "False")
        df["age"] = (45 + 20 * df["label"] + rng.normal(0, 10, len(df))).round()
        df["biopsed"] = df["label"].map({1: "True", 0: "False"})
        write_manifest(df, manifest)
    raw = tiny_config(root, root, cv={"folds": folds}, report_test=True, context={"fields": ["age", "bleed"]})
    for stage in raw["stages"]:
        stage["data"], stage["epochs"] = [{"manifest": str(manifest)}], 1
    return raw


@pytest.mark.slow
def test_with_two_folds_the_context_stage_is_fitted_and_its_check_on_new_patients_is_said_to_be_missing(tmp_path,
                                                                                                        one_thread):
    """Two folds leave no fold to cross-fit the fusion's own context logits: the run still finishes with the stage,
    and the report and log say the fused rule was not judged on new patients, and why."""
    from core.context import context_of
    run = tmp_path / "run2"
    cv.fit_cv(run_config_from_dict(_context_recipe(tmp_path, 2)), run)
    assert context_of(load_bundle(run).meta) is not None
    rep = json.loads((run / runfolder.CV_REPORT).read_text())
    assert "context" not in rep["cv"]
    why = "the fused threshold rule was not judged on new patients: judging the fused rule on new patients needs at " \
          "least 3 folds"
    assert why in rep["notes"] and why in runfolder.log_tail(run, lines=200)


@pytest.mark.slow
def test_a_context_stage_is_fitted_on_the_out_of_fold_scores_and_travels_with_the_ensemble(tmp_path, one_thread):
    """cv + context: the fold runs train no context stage of their own; the ensemble's is fitted on every non-test
    row's out-of-fold image score (context logits cross-fitted over the same folds), its thresholds chosen there,
    and the test report puts image-only, context-only and fused side by side for the ensemble."""
    from core.context import context_of, fuse
    from core.inference import Predictor
    df = read_manifest(_context_recipe(tmp_path, K)["stages"][0]["data"][0]["manifest"])
    raw = _context_recipe(tmp_path, K)
    run = tmp_path / "run"
    cv.fit_cv(run_config_from_dict(raw), run)
    for k in range(K):
        assert context_of(load_bundle(runfolder.fold_path(run, k) / runfolder.BUNDLE).meta) is None
    bundle = load_bundle(run)
    stage = context_of(bundle.meta)
    assert len(bundle.model.members) == K and stage.fields == ("age", "bleed")
    assert stage.threshold["chosen_on"] == f"out-of-fold predictions ({K} folds) (fused output)"
    non_test = int((runfolder.read_folds(run)["fold"] != TEST_FOLD).sum())
    assert stage.threshold["n_val"] == non_test and f"{non_test} images" in stage.fitted["fusion"]
    assert f"cross-fitted over the {K} folds" in stage.fitted["fusion"]
    log = runfolder.log_tail(run, lines=200)
    assert f"fused threshold {stage.threshold['value']:.3f} chosen on the out-of-fold predictions ({K} folds)" in log
    # the fused rule judged on new patients: context model and fusion cross-fitted, thresholds from other folds
    section = json.loads((run / runfolder.CV_REPORT).read_text())["cv"]["context"]
    assert section["n"] == non_test and section["fields"] == ["age", "bleed"]
    transfer = section["threshold_transfer"]
    assert [r["fold"] for r in transfer["per_fold"]] == list(range(K)) and 0 <= transfer["sensitivity"]["value"] <= 1
    assert 0 <= section["crossfitted_roc_auc"]["value"] <= 1 and "fused threshold rule on new patients" in log
    assert reports.cv_context_text(json.loads((run / runfolder.CV_REPORT).read_text())).startswith("photo + answers")
    image_transfer = json.loads((run / runfolder.CV_REPORT).read_text())["cv"]["threshold_transfer"]
    assert bundle.meta.provenance.threshold_on_new_patients == {"image": image_transfer, "fused": transfer}
    report = json.loads((run / "test_report.json").read_text())["context"]
    assert {"image_only", "context_only", "fused", "withheld"} <= set(report)
    assert report["thresholds"]["fused"] == stage.threshold["value"]
    # the app's path: the ensemble's photo score, fused with answers by the bundle's stage
    predictor = Predictor(bundle, device="cpu")
    assert predictor.context == stage
    pred = predictor.predict_source(df["image"].iloc[0], cam_method=None)
    yes, no = (fuse(stage, pred.prob, pred.threshold, {"bleed": a, "age": 60}) for a in ("yes", "no"))
    assert yes.used == ("age", "bleed") and yes.prob > no.prob


@pytest.mark.slow
def test_with_nested_cv_the_context_stage_is_fitted_on_the_nested_ensemble_scores(tmp_path, one_thread):
    """cv.nested + context: the stage's fusion and thresholds use the nested scores the ensemble's threshold was
    chosen on (nested_oof_predictions.csv), not the single members' out-of-fold scores."""
    from core import nested
    from core.context import context_of
    raw = _context_recipe(tmp_path, K)
    raw["cv"]["nested"] = True
    run = tmp_path / "nested"
    cv.fit_cv(run_config_from_dict(raw), run)
    bundle = load_bundle(run)
    stage = context_of(bundle.meta)
    assert bundle.meta.threshold.chosen_on == nested.how(K)
    assert stage.threshold["chosen_on"] == f"{nested.how(K)} (fused output)"
    assert stage.fitted["fusion"].startswith(nested.how(K))
    scores = pd.read_csv(run / runfolder.NESTED_OOF)
    refit = cv.context_rows(scores, read_manifest(run / "splits" / "1_finetune.csv"))
    from core.context_fit import fit_context_cv
    again = fit_context_cv(refit, refit["prob"].to_numpy(), ["age", "bleed"], where=nested.how(K), n_boot=50)
    assert again.fusion == stage.fusion and again.threshold["value"] == stage.threshold["value"]
    # the bundle's threshold is the nested one, so its record on new patients is the nested rule's transfer
    cv_section = json.loads((run / runfolder.CV_REPORT).read_text())["cv"]
    assert bundle.meta.provenance.threshold_on_new_patients == {
        "image": cv_section["nested"]["threshold_transfer"], "fused": cv_section["context"]["threshold_transfer"]}
    assert cv_section["nested"]["threshold_transfer"] != cv_section["threshold_transfer"]


# ------------------------------------------------------------------ the shared data
def test_shared_demo_cv_recipes_hold_out_the_test_patients_of_shared_demo():
    import yaml

    from core.splits import assign_folds, assign_splits
    from core.training import stage_rows
    configs = Path(__file__).resolve().parents[2] / "train" / "configs"
    data_root = str(shared_path("data"))
    demo, cvc = (run_config_from_dict({**yaml.safe_load((configs / f"{name}.yaml").read_text()),
                                       "data_root": data_root}) for name in ("shared_demo", "shared_demo_cv"))
    _, union = stage_rows(demo)
    single, _ = assign_splits(union, demo.split)
    folds, _ = assign_folds(stage_rows(cvc)[1], cvc.cv.folds, cvc.split)
    assert set(single.loc[single["split"] == "test", "image"]) == set(folds.loc[folds["fold"] == TEST_FOLD, "image"])
    # the context recipe reads the same photos through the PAD importer (other row order): the same folds
    ctx = run_config_from_dict({**yaml.safe_load((configs / "shared_demo_cv_context.yaml").read_text()),
                                "data_root": data_root})
    ctx_folds, _ = assign_folds(stage_rows(ctx)[1], ctx.cv.folds, ctx.split)
    assert ctx.context is not None and dict(zip(ctx_folds["image"], ctx_folds["fold"])) == dict(
        zip(folds["image"], folds["fold"]))


# ------------------------------------------------------------------ the threshold rule on new patients (pure)
def _oof(scores_by_fold: dict[int, tuple[list, list]]) -> pd.DataFrame:
    rows = [{"image": f"f{k}_{i}", "label": lab, "patient_id": f"p{k}_{i // 2}", "fold": k, "prob": p}
            for k, (probs, labels) in scores_by_fold.items() for i, (p, lab) in enumerate(zip(probs, labels))]
    return pd.DataFrame(rows)


def test_threshold_transfer_judges_each_fold_at_the_threshold_the_other_folds_chose():
    rng = np.random.default_rng(0)
    labels = [1] * 40 + [0] * 60
    scores = {k: (np.clip(np.r_[rng.normal(0.7, 0.15, 40), rng.normal(0.3, 0.15, 60)], 0, 1), labels)
              for k in range(3)}
    low = scores[0][0].copy()
    low[:40] -= 0.25  # fold 0's model scores its malignant photos lower: a threshold from the others misses more
    scores[0] = (np.clip(low, 0, 1), labels)
    oof = _oof(scores)
    t = cv.threshold_transfer(oof, "sensitivity", 0.9, n_boot=200, seed=0)
    fold0 = t["per_fold"][0]
    own = metrics.choose_threshold(labels, scores[0][0], rule="sensitivity", target=0.9)
    assert own["achieved"]["sensitivity"] >= 0.9 > fold0["sensitivity"]  # in-sample it would look fine
    rest = oof[oof["fold"] != 0]
    expected = metrics.choose_threshold(rest["label"], rest["prob"], rule="sensitivity", target=0.9)["threshold"]
    assert fold0["threshold"] == pytest.approx(expected)
    assert fold0["sensitivity"] == pytest.approx(np.mean(scores[0][0][:40] >= expected))
    flagged = sum(int(np.sum(scores[r["fold"]][0][:40] >= r["threshold"])) for r in t["per_fold"])
    assert t["sensitivity"]["value"] == pytest.approx(flagged / 120)  # pooled over the three folds' decisions
    lo, hi = t["sensitivity"]["ci95"]
    assert lo <= t["sensitivity"]["value"] <= hi and t["specificity"]["ci95"] is not None
    line = cv.transfer_line(t)
    assert f"{t['sensitivity']['value']:.3f}" in line and "per fold" in line


def test_threshold_transfer_edge_cases_one_class_complement_and_a_fold_without_malignant_photos():
    one_class = _oof({0: ([0.2, 0.8], [0, 1]), 1: ([0.1, 0.3], [0, 0]), 2: ([0.4, 0.2], [0, 0])})
    assert cv.threshold_transfer(one_class, "sensitivity", 0.9, n_boot=0) is None  # folds 1+2 hold no malignant
    assert "not estimated" in cv.transfer_line(None)
    no_pos = _oof({0: ([0.2, 0.9, 0.7], [0, 1, 1]), 1: ([0.1, 0.8, 0.6], [0, 1, 1]), 2: ([0.3, 0.4], [0, 0])})
    t = cv.threshold_transfer(no_pos, "sensitivity", 0.9, n_boot=0)
    assert t["per_fold"][2]["sensitivity"] is None and t["per_fold"][2]["specificity"] is not None
    # fold 0 at 0.6 (folds 1+2's lowest malignant score) catches 0.9 and 0.7; fold 1 at 0.7 misses its 0.6
    assert [r["threshold"] for r in t["per_fold"][:2]] == pytest.approx([0.6, 0.7])
    assert t["sensitivity"]["value"] == pytest.approx(3 / 4)
    assert reports.cv_transfer_text({"cv": {"folds": 3}}) is None  # a report from before the measurement


def test_machines_lists_each_distinct_training_machine_once_in_first_seen_order():
    bf16 = {"device": "cpu", "precision": "bf16-mixed", "cpu_capability": "AVX512", "cpu_native_bf16": True}
    fp32 = {**bf16, "precision": "32-true", "cpu_capability": "AVX2", "cpu_native_bf16": False}
    assert cv.machines([[bf16], None, [bf16, fp32], [fp32]]) == [bf16, fp32]
    assert cv.machines([None, None]) == []  # members older than the record: nothing claimed


def test_context_rows_pair_each_non_test_photos_answers_with_the_score_the_threshold_was_chosen_on():
    """The scores (out-of-fold or nested, in their own order) meet the last stage's answers by image; the stage's
    test rows and its own fold/score columns never come through."""
    stage = pd.DataFrame({"image": ["a", "b", "c", "t"], "label": [1, 0, 1, 0], "patient_id": ["p", "q", "r", "s"],
                          "split": ["train", "train", "train", "test"], "bleed": ["yes", "no", None, "yes"],
                          "prob": [9.0] * 4})
    nested_scores = pd.DataFrame({"image": ["c", "a", "b"], "label": [1, 1, 0], "patient_id": ["r", "p", "q"],
                                  "fold": [2, 0, 1], "prob": [0.7, 0.2, 0.4], "logit": [0.0] * 3, "members": [2] * 3})
    rows = cv.context_rows(nested_scores, stage)
    assert rows["image"].tolist() == ["c", "a", "b"] and rows["prob"].tolist() == [0.7, 0.2, 0.4]
    assert rows["fold"].tolist() == [2, 0, 1] and rows["bleed"].fillna("-").tolist() == ["-", "yes", "no"]
    assert "t" not in set(rows["image"]) and rows["label"].tolist() == [1, 1, 0]
