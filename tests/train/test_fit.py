"""End-to-end: a two-stage run on synthetic images, its bundle, stop and resume, and evaluation."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from core import jobs, runfolder, training
from core.bundle import load_bundle
from core.config import run_config_from_dict
from core.manifest import file_sha256
from core.evaluation import predict_probs
from core.manifest import ManifestError, read_manifest
from tests.conftest import tiny_config
from train import evaluate as evaluate_cli
from train import fit as fit_cli

pytestmark = pytest.mark.slow  # every test trains a run or uses the module's trained run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from tests.conftest import make_images
    root = tmp_path_factory.mktemp("fit")
    df = make_images(root / "images")
    df.to_csv(root / "labels.csv", index=False)
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(root / "labels.csv", root / "images", report_test=True)))
    assert fit_cli.main(["--config", str(cfg_path), "--out", str(root / "run")]) == 0
    return root


def test_run_folder_has_everything_it_promises(finished_run):
    run = finished_run / "run"
    for name in ("config.yaml", "metrics.csv", "train.log", "status.json", "val_report.json",
                 "test_report.json", "bundle/model.json", "bundle/model.safetensors",
                 "splits/0_head.csv", "splits/1_finetune.csv"):
        assert (run / name).is_file(), name
    history = pd.read_csv(run / "metrics.csv")
    assert history[["stage", "epoch"]].values.tolist() == [[0, 0], [1, 0], [1, 1]]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    from core.device import fabric_precision  # 'auto' is logged as what it resolved to on this CPU
    assert f"device cpu x 1, precision {fabric_precision('auto', 'cpu')} (auto)" in (run / "train.log").read_text()


def test_bundle_reloads_to_identical_probabilities(finished_run):
    run = finished_run / "run"
    val = json.loads((run / "val_report.json").read_text())
    bundle = load_bundle(run)
    split = read_manifest(run / "splits" / "1_finetune.csv")
    val_df = split[split["split"] == "val"].reset_index(drop=True)
    probs = predict_probs(bundle.model, val_df, num_workers=0)
    trained = np.array([r["prob"] for r in val["predictions"]])
    np.testing.assert_allclose(probs, trained, atol=1e-6)


def test_threshold_and_provenance_are_stored(finished_run):
    meta = load_bundle(finished_run / "run").meta
    thr = meta.threshold
    assert thr.rule == "sensitivity" and thr.target == 0.9
    assert set(thr.val_sensitivity) == {"value", "ci95"}
    prov = meta.provenance
    assert prov.split_counts["test"]["images"] > 0
    assert prov.data[0][0]["sha256"] and prov.seed == 0
    assert [s["recipe"]["freeze_backbone"] for s in prov.stages] == [True, False]
    assert prov.validation_metrics["roc_auc"].keys() == {"value", "ci95"}
    assert meta.format_version == 2 and len(meta.weights_sha256) == 64
    from core.device import fabric_precision  # the machine it trained on, with 'auto' resolved
    (machine,) = prov.trained_on
    assert machine["device"] == "cpu" and machine["processes"] == 1 and machine["precision_setting"] == "auto"
    assert machine["precision"] == fabric_precision("auto", "cpu") != "auto"
    assert machine["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256")
    assert meta.summary()["trained_on"] == prov.trained_on  # carried by every report and prediction


def test_run_folder_can_move_without_breaking_its_splits(finished_run, tmp_path):
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(finished_run / "run" / "splits", moved / "splits")
    split = read_manifest(moved / "splits" / "1_finetune.csv")
    assert all(Path(p).is_file() for p in split["image"])


def test_splits_keep_patients_apart_and_match_between_stages(finished_run):
    run = finished_run / "run"
    a, b = read_manifest(run / "splits" / "0_head.csv"), read_manifest(run / "splits" / "1_finetune.csv")
    assert a.groupby("patient_id")["split"].nunique().max() == 1
    assert a["split"].tolist() == b["split"].tolist()


def test_evaluate_cli_writes_report_with_cis(finished_run, tmp_path, capsys):
    run = finished_run / "run"
    out = tmp_path / "report.json"
    rc = evaluate_cli.main(["--run", str(run), "--manifest", str(run / "splits" / "1_finetune.csv"),
                            "--split", "test", "--out", str(out), "--n-boot", "50"])
    assert rc == 0
    report = json.loads(out.read_text())
    auc = report["metrics"]["roc_auc"]
    assert set(auc) == {"value", "ci95"}
    assert report["split"] == "test" and report["model"]["backbone"] == "mobilenetv2_100"
    assert report["model"]["weights_sha256"] == file_sha256(run / "bundle" / "model.safetensors")
    assert len(report["predictions"]) == report["n"]
    printed = capsys.readouterr().out
    assert "ROC-AUC" in printed and report["model"]["weights_sha256"][:12] in printed
    assert report["seen_by_model"] == {"train": 0, "val": 0}
    # the test split here equals the one the run itself reported
    assert report["n"] == json.loads((run / "test_report.json").read_text())["n"]


def test_evaluate_one_class_subset_says_auc_is_undefined(finished_run, tmp_path, capsys):
    run = finished_run / "run"
    m = read_manifest(run / "splits" / "1_finetune.csv")
    only_benign = tmp_path / "benign.csv"
    m[m["label"] == 0].drop(columns=["split"]).to_csv(only_benign, index=False)
    out = tmp_path / "r.json"
    assert evaluate_cli.main(["--run", str(run), "--manifest", str(only_benign), "--out", str(out),
                              "--n-boot", "20"]) == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["roc_auc"]["value"] is None
    assert any("one class" in n for n in report["notes"])


def test_evaluating_on_training_images_is_flagged(finished_run, tmp_path, capsys):
    run = finished_run / "run"
    out = tmp_path / "all.json"
    assert evaluate_cli.main(["--run", str(run), "--manifest", str(run / "splits" / "1_finetune.csv"),
                              "--split", "all", "--out", str(out), "--n-boot", "20"]) == 0
    report = json.loads(out.read_text())
    split = read_manifest(run / "splits" / "1_finetune.csv")
    assert report["seen_by_model"] == {"train": int((split["split"] == "train").sum()),
                                       "val": int((split["split"] == "val").sum())}
    assert any("optimistic" in n for n in report["notes"])
    assert "optimistic" in capsys.readouterr().err


def test_evaluate_cli_errors(finished_run, tmp_path, capsys):
    run = finished_run / "run"
    assert evaluate_cli.main(["--run", str(tmp_path), "--manifest", str(run / "splits" / "0_head.csv")]) == 2
    assert "no model.json" in capsys.readouterr().err
    bare = tmp_path / "bare.csv"
    read_manifest(run / "splits" / "0_head.csv").drop(columns=["split"]).to_csv(bare, index=False)
    assert evaluate_cli.main(["--run", str(run), "--manifest", str(bare), "--split", "test"]) == 2
    assert "no split column" in capsys.readouterr().err


def test_stopped_run_resumes_from_its_last_epoch(image_set, tmp_path, monkeypatch):
    """A stop request in the run folder (the app's portable Stop) stops the run at the next step boundary; --resume
    continues from the last finished epoch and draws what an uninterrupted run draws."""
    labels, images = image_set
    cfg = run_config_from_dict(tiny_config(labels, images, num_workers=1))  # workers draw the augmentations
    run = tmp_path / "run"
    real = training.train_epoch
    calls = []

    def stop_requested_in_second_stage(*args, **kwargs):
        calls.append(args[-1])
        if len(calls) == 3:  # stage 0 epoch 0, stage 1 epoch 0 done; asked to stop in stage 1 epoch 1
            runfolder.request_stop(run, by="test")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", stop_requested_in_second_stage)
    with pytest.raises(training.Stopped, match="stop requested in the run folder"):
        training.fit(cfg, run)
    assert json.loads((run / "status.json").read_text())["state"] == "stopped"
    assert not (run / "bundle").exists() and not runfolder.stop_requested(run)  # the request was consumed
    assert runfolder.read_metrics(run)[["stage", "epoch"]].values.tolist() == [[0, 0], [1, 0]]  # epoch 1 unfinished
    monkeypatch.setattr(training, "train_epoch", real)
    runfolder.request_stop(run)  # a request older than the resuming process (e.g. left by a killed run) ...
    old = time.time() - 3600
    os.utime(run / runfolder.STOP, (old, old))
    here = training.hardware_record
    from core.device import fabric_precision
    mine = here("cpu", fabric_precision("auto", "cpu"), "auto")
    bf16 = mine["cpu_native_bf16"]  # the other machine is of the other CPU class, whichever this one is
    other = {**mine, "cpu_capability": "AVX2" if bf16 else "AVX512", "cpu_native_bf16": not bf16,
             "precision": "32-true" if bf16 else "bf16-mixed"}
    monkeypatch.setattr(training, "hardware_record", lambda *a, **k: other)  # resumed on another machine
    training.fit(cfg, run, resume=True)  # ... is dropped, not acted on
    monkeypatch.setattr(training, "hardware_record", here)
    assert load_bundle(run).meta.provenance.trained_on == [mine, other]  # both machines, in order
    history = pd.read_csv(run / "metrics.csv")
    assert history[["stage", "epoch"]].values.tolist() == [[0, 0], [1, 0], [1, 1]]
    assert load_bundle(run).threshold is not None
    # The resumed epoch drew the same shuffle, augmentations and dropout masks as an uninterrupted run's
    training.fit(cfg, tmp_path / "straight")
    straight = pd.read_csv(tmp_path / "straight" / "metrics.csv")
    cols = ["train_loss", "val_loss", "val_roc_auc"]
    np.testing.assert_allclose(history[cols].to_numpy(float), straight[cols].to_numpy(float), rtol=1e-6)


def test_a_stop_request_is_seen_at_the_next_training_step(image_set, tmp_path, monkeypatch):
    """check_stop runs after every step: a request made during an epoch stops it after one more step, not at the
    epoch's end."""
    labels, images = image_set
    cfg = run_config_from_dict(tiny_config(labels, images))
    run = tmp_path / "run"
    real_check, steps = training.check_stop, []

    def counting_check(fabric):
        steps.append(1)
        if len(steps) == 2:  # after data import (1), after the first training step (2)
            runfolder.request_stop(run)
        real_check(fabric)
    monkeypatch.setattr(training, "check_stop", counting_check)
    with pytest.raises(training.Stopped):
        training.fit(cfg, run)
    assert len(steps) == 2 and runfolder.read_metrics(run).empty  # no epoch finished
    assert runfolder.read_status(run)["state"] == "stopped"
    # nothing was saved: the log and the Train page must not offer a resume
    assert "nothing was saved to resume from" in (run / runfolder.LOG).read_text()
    assert not jobs.run_info(run).resumable


def test_fit_cli_refuses_to_overwrite_a_run_without_resume(finished_run, capsys):
    rc = fit_cli.main(["--config", str(finished_run / "cfg.yaml"), "--out", str(finished_run / "run")])
    assert rc == 2 and "--resume" in capsys.readouterr().err


def test_corrupt_image_is_reported_before_training(image_set, tmp_path):
    labels, images = image_set
    (images / "img005.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (images / "img006.png").write_bytes(b"")
    cfg = run_config_from_dict(tiny_config(labels, images))
    with pytest.raises(ManifestError, match=r"(?s)2 unusable image\(s\).*img005\.png.*img006\.png"):
        training.fit(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_stages_share_one_split_so_held_out_patients_are_never_trained_on(tmp_path):
    """Stage 0 trains on A + B, the last stage on B alone: B's val/test patients must be held out in stage 0 too."""
    from tests.conftest import make_images
    a, b = make_images(tmp_path / "a", n=24, seed=1), make_images(tmp_path / "b", n=32, seed=2)
    a["patient_id"] = "A" + a["patient_id"]  # two datasets, distinct patients
    a.to_csv(tmp_path / "a.csv", index=False)
    b.to_csv(tmp_path / "b.csv", index=False)
    raw = tiny_config(tmp_path / "b.csv", tmp_path / "b")
    raw["stages"][0]["data"] = [{"csv": str(tmp_path / "a.csv"), "images": str(tmp_path / "a")},
                                {"csv": str(tmp_path / "b.csv"), "images": str(tmp_path / "b")}]
    cfg = run_config_from_dict(raw)
    (first, _), (last, _) = training.run_data(cfg)[0]
    trained_first = set(first.loc[first["split"] == "train", "image"])
    held_out_last = set(last.loc[last["split"] != "train", "image"])
    assert held_out_last and not held_out_last & trained_first
    assert first.groupby("patient_id")["split"].nunique().max() == 1


def test_resume_keeps_the_config_the_run_started_with(image_set, tmp_path):
    labels, images = image_set
    cfg = run_config_from_dict(tiny_config(labels, images))
    training.fit(cfg, tmp_path / "run")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    other = run_config_from_dict(tiny_config(labels, images, seed=99))
    training.fit(other, tmp_path / "run", resume=True)  # nothing left to train: finishes again
    assert (tmp_path / "run" / "config.yaml").read_text() == saved


def test_init_from_on_the_command_line_replaces_the_recipes_starting_model(finished_run, tmp_path):
    """Transfer from a finished run: the recipe's own weights/input_size give way to the parent bundle's."""
    out = tmp_path / "child"
    assert fit_cli.main(["--config", str(finished_run / "cfg.yaml"), "--out", str(out), "--epochs", "1",
                         "--init-from", str(finished_run / "run")]) == 0
    meta = load_bundle(out).meta
    assert meta.provenance.parent.run_name == "tiny"
    assert meta.provenance.parent_weights_sha256 == load_bundle(finished_run / "run").meta.weights_sha256
    assert meta.preprocessing["input_size"] == 64  # from the parent bundle
    # the Train page's Resume runs `--resume --out RUN` alone: a transfer run's saved config must read back
    assert fit_cli.main(["--resume", "--out", str(out), "--check"]) == 0



def test_context_stage_is_fitted_on_the_runs_own_patients_and_reported(tmp_path, capsys):
    """A run whose manifest carries answers (bleeding tracks the label) and a leaking `biopsed` column: the
    bundle gets a context stage without it, the test report puts image-only, context-only and fused side by
    side, and train.evaluate does the same from the manifest's columns."""
    from core.context import context_of
    from core.manifest import write_manifest
    from tests.conftest import make_images
    df = make_images(tmp_path / "images", n=48)
    rng = np.random.default_rng(0)
    df["image"] = [str((tmp_path / "images" / p).resolve()) for p in df["image"]]
    df["bleed"] = np.where(rng.random(len(df)) < 0.2 + 0.6 * df["label"], "True", "False")
    df["age"] = (45 + 20 * df["label"] + rng.normal(0, 10, len(df))).round()
    df["site"] = rng.choice(["FACE", "BACK"], len(df))
    df["biopsed"] = df["label"].map({1: "True", 0: "False"})
    manifest = write_manifest(df, tmp_path / "m.csv")
    cfg = tiny_config(tmp_path, tmp_path, report_test=True, context={"fields": ["age", "site", "bleed"]})
    for stage in cfg["stages"]:
        stage["data"] = [{"manifest": str(manifest)}]
    bundle = training.fit(run_config_from_dict(cfg), tmp_path / "run")
    stage = context_of(load_bundle(bundle).meta)
    assert stage.fields == ("age", "site", "bleed") and "biopsed" not in json.dumps(stage.to_dict())
    assert stage.threshold["chosen_on"] == "validation split (fused output)"
    assert "validation split" in stage.fitted["fusion"] and "training split" in stage.fitted["context_model"]
    report = json.loads((tmp_path / "run" / "test_report.json").read_text())["context"]
    assert {"image_only", "context_only", "fused", "withheld", "weights_per_field"} <= set(report)
    assert set(report["withheld"]) == {"age", "site", "bleed", "all answers"}
    assert "context stage: fields age, site, bleed" in (tmp_path / "run" / "train.log").read_text()
    capsys.readouterr()
    assert evaluate_cli.main(["--run", str(tmp_path / "run"), "--manifest",
                              str(tmp_path / "run" / "splits" / "1_finetune.csv"), "--split", "test",
                              "--n-boot", "20", "--out", str(tmp_path / "r.json"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "context only" in out and "fused, bleed withheld" in out
    assert json.loads((tmp_path / "r.json").read_text())["context"]["fused"]["n"] == report["fused"]["n"]


@pytest.mark.parametrize("age, why", [("", "no usable context field"), ("150", "context field age: 150")])
def test_a_context_stage_that_cannot_be_fitted_leaves_the_bundle_without_it_and_says_why(tmp_path, age, why):
    """Context asked for, but no answer is usable (all blank, or out of range): the trained run is kept, without
    the stage, and train.log and the validation report say why."""
    from core.context import context_of
    from core.manifest import write_manifest
    from tests.conftest import make_images
    df = make_images(tmp_path / "images", n=40)
    df["image"] = [str((tmp_path / "images" / p).resolve()) for p in df["image"]]
    df["age"] = age
    df["bleed"] = ""
    manifest = write_manifest(df, tmp_path / "m.csv")
    cfg = tiny_config(tmp_path, tmp_path, context={"fields": ["age", "bleed"]})
    for stage in cfg["stages"]:
        stage["data"] = [{"manifest": str(manifest)}]
        stage["epochs"] = 1
    bundle = training.fit(run_config_from_dict(cfg), tmp_path / "run")
    assert context_of(load_bundle(bundle).meta) is None
    log = (tmp_path / "run" / "train.log").read_text()
    assert "context stage not fitted, the bundle has none (image model only)" in log and why in log
    notes = json.loads((tmp_path / "run" / runfolder.VAL_REPORT).read_text())["notes"]
    assert any("context stage not fitted" in n for n in notes)
    assert runfolder.read_status(tmp_path / "run")["state"] == "finished"


def test_folds_on_the_command_line_train_a_cross_validation_that_resumes_only_as_one(finished_run, tmp_path, capsys):
    """--folds K turns a recipe into K fold runs and one ensemble bundle; the folder then refuses a fresh start and
    a resume that changes --folds, and a plain --resume (its own config) finishes again without retraining."""
    out = tmp_path / "cv"
    cfg = str(finished_run / "cfg.yaml")
    assert fit_cli.main(["--config", cfg, "--out", str(out), "--folds", "2", "--epochs", "1"]) == 0
    assert [len(load_bundle(out).model.members), runfolder.read_status(out)["cv"]["done"]] == [2, [0, 1]]
    assert yaml.safe_load((out / "config.yaml").read_text())["cv"] == {"folds": 2, "nested": False}
    assert fit_cli.main(["--config", cfg, "--out", str(out), "--folds", "2"]) == 2
    assert "already holds a run; use --resume" in capsys.readouterr().err
    assert fit_cli.main(["--resume", "--out", str(out), "--folds", "0"]) == 2
    assert "holds a cross-validation run" in capsys.readouterr().err
    assert fit_cli.main(["--resume", "--out", str(finished_run / "run"), "--folds", "3"]) == 2
    assert "holds a single-split run" in capsys.readouterr().err
    weights = file_sha256(out / "folds" / "fold_1" / "bundle" / "model.safetensors")
    assert fit_cli.main(["--resume", "--out", str(out)]) == 0
    assert "folds already done: 0, 1" in runfolder.log_tail(out, lines=400)
    assert file_sha256(out / "folds" / "fold_1" / "bundle" / "model.safetensors") == weights


def test_refresh_reports_re_measures_a_runs_reports_without_choosing_anything_again(finished_run, tmp_path):
    """train.build_demo --refresh-reports: intervals computed by an older version are recomputed; the point values,
    threshold and per-photo rows stay those of the run (nothing is chosen again)."""
    import shutil

    from train import build_demo
    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)
    before = {name: json.loads((run / name).read_text()) for name in ("val_report.json", "test_report.json")}
    for name, report in before.items():  # as an older version might have written them
        old = json.loads(json.dumps(report))
        for entry in old["metrics"].values():
            entry["ci95"] = [entry["value"]] * 2 if entry["value"] is not None else None
        old["notes"] = old["notes"] + ["a note of the training run"]
        (run / name).write_text(json.dumps(old))
    build_demo.refresh_reports(run)
    for name, report in before.items():
        after = json.loads((run / name).read_text())
        assert after["metrics"] == report["metrics"] and after["predictions"] == report["predictions"]
        assert after["threshold"] == report["threshold"] and after["model"] == report["model"]
        assert ("a note of the training run" in after["notes"]) == (name == "val_report.json")
    assert "reports re-measured" in (run / "train.log").read_text()


def test_a_photo_cut_short_after_a_sound_header_is_named_before_training_and_a_run_it_breaks_resumes(
        image_set, tmp_path, capsys, monkeypatch):
    """The pre-check decodes every photo, so one cut short after a sound header is named before any epoch. One
    damaged after the check (here: the check skipped) stops the run with its name and no traceback, and with a
    good copy back in place --resume finishes."""
    labels, images = image_set
    photo = images / "img007.png"
    good = photo.read_bytes()
    photo.write_bytes(good[: len(good) * 2 // 3])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(labels, images, report_test=True)))  # every split's photos decoded
    assert fit_cli.main(["--config", str(cfg), "--out", str(tmp_path / "early")]) == 2
    err = capsys.readouterr().err
    assert "1 unusable image(s)" in err and "img007.png: truncated or corrupt image data" in err
    assert not (tmp_path / "early" / "checkpoint.pt").exists()
    monkeypatch.setattr("core.training.check_images", lambda df: None)
    assert fit_cli.main(["--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "img007.png" in err and "Traceback" not in err and "continue with --resume" in err
    photo.write_bytes(good)
    assert fit_cli.main(["--config", str(cfg), "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert load_bundle(tmp_path / "run").meta.provenance.run_name


def test_a_recipe_that_is_not_valid_yaml_is_named(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("name: x\nstages: [unclosed\n")
    assert fit_cli.main(["--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'bad.yaml'}: not valid YAML" in capsys.readouterr().err


def test_refresh_similar_fills_the_shipped_bundles_diagnoses_and_keeps_its_weights(finished_run, tmp_path):
    """train.build_demo --refresh-similar: similar cases gain the diagnosis the run's split files hold (PAD's own
    column name, 'diagnostic'); the weights keep their hash and the embeddings their values."""
    import shutil

    import numpy as np

    from train import build_demo
    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)
    for split_file in (run / "splits").glob("*.csv"):
        df = read_manifest(split_file)
        df.assign(diagnostic=np.where(df["label"] == 1, "BCC", "NEV")).to_csv(split_file, index=False)
    bundle = tmp_path / "demo" / "bundle"
    shutil.copytree(run / "bundle", bundle)
    before = load_bundle(bundle)
    assert not any(r.get("diagnosis") for r in before.similar.records)
    assert build_demo.refresh_similar(run, bundle) == len(before.similar.records)
    after = load_bundle(bundle)
    assert after.meta.weights_sha256 == before.meta.weights_sha256
    assert np.array_equal(after.similar.embeddings, before.similar.embeddings)
    assert [r["diagnosis"] for r in after.similar.records] == ["BCC" if r["label"] else "NEV"
                                                               for r in before.similar.records]


def test_refresh_calibration_gives_an_older_bundle_its_refits_only_when_the_map_comes_out_the_same(finished_run,
                                                                                                    tmp_path):
    """train.build_demo --refresh-calibration: a bundle saved before the refits were stored gains them (the same
    ones training now stores); a run whose refitted map is not the stored one writes nothing."""
    import shutil

    import pytest

    from train import build_demo
    run = finished_run / "run"
    bundle = tmp_path / "demo" / "bundle"
    shutil.copytree(run / "bundle", bundle)
    trained = load_bundle(bundle)
    assert trained.calibration is not None and len(trained.calibration.boot) > 0  # training stores them now
    meta = json.loads((bundle / "model.json").read_text())
    del meta["calibration"]["bootstrap"]  # as an older version wrote it
    (bundle / "model.json").write_text(json.dumps(meta))
    assert load_bundle(bundle).calibration.interval(0.5) is None
    assert build_demo.refresh_calibration(run, bundle) == len(trained.calibration.boot)
    after = load_bundle(bundle)
    assert after.meta.weights_sha256 == trained.meta.weights_sha256
    assert (after.calibration.slope, after.calibration.intercept) == (trained.calibration.slope,
                                                                     trained.calibration.intercept)  # kept as stored
    for p in (0.1, 0.5, 0.9):  # the refits from logits measured again (training may have run them in bf16)
        assert after.calibration.interval(p) == pytest.approx(trained.calibration.interval(p), abs=0.01)
    meta["calibration"]["slope"] += 0.5  # not the map this run's validation photos give
    (bundle / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="not the stored one"):
        build_demo.refresh_calibration(run, bundle)
    assert json.loads((bundle / "model.json").read_text()) == meta  # nothing written


def test_a_resume_with_another_config_is_refused_naming_what_differs(finished_run, tmp_path, capsys):
    """--resume --config other.yaml trained on with the new learning rate while config.yaml kept the old one: the
    model came from both and its records contradicted each other. Device and precision may change."""
    run = str(finished_run / "run")
    other = yaml.safe_load((finished_run / "cfg.yaml").read_text())
    other["stages"][1]["lr"] = 0.05
    other["seed"] = 7
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    assert fit_cli.main(["--resume", "--out", run, "--config", str(tmp_path / "other.yaml"), "--check"]) == 2
    err = capsys.readouterr().err
    assert "was started with another config (seed, stages.1.lr differ)" in err and f"--resume --out {run}" in err
    assert fit_cli.main(["--resume", "--out", run, "--set", "stages.0.epochs=5", "--check"]) == 2
    assert "(stages.0.epochs differ)" in capsys.readouterr().err
    assert fit_cli.main(["--resume", "--out", run, "--config", str(finished_run / "cfg.yaml"), "--check"]) == 0
    assert fit_cli.main(["--resume", "--out", run, "--device", "cpu", "--precision", "32-true", "--check"]) == 0
    import shutil  # a run saved before a config key existed (cv came later): the key's default is no change
    shutil.copytree(run, tmp_path / "older")
    saved = yaml.safe_load((tmp_path / "older" / "config.yaml").read_text())
    saved.pop("cv")
    (tmp_path / "older" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert fit_cli.main(["--resume", "--out", str(tmp_path / "older"), "--check"]) == 0, capsys.readouterr().err


def test_changed_settings_walks_stages_and_leaves_the_machine_aside():
    from core.config import changed_settings
    started = {"seed": 0, "device": "cuda", "stages": [{"lr": 1e-4, "data": [{"csv": "a.csv"}]}],
               "head": {"hidden": 256}}
    assert changed_settings(started, started) == []
    now = {"seed": 0, "device": "cpu", "stages": ({"lr": 1e-5, "data": ({"csv": "b.csv"},)},), "head": {}}
    assert changed_settings(started, now) == ["head.hidden", "stages.0.data.0.csv", "stages.0.lr"]
    assert changed_settings(started, {**started, "stages": []}) == ["stages"]  # a stage more or less
    # --resume --nested adds the pair runs to a finished cross-validation (README): allowed, folds are not
    cv = {"cv": {"folds": 3, "nested": False}}
    assert changed_settings(cv, {"cv": {"folds": 3, "nested": True}}) == []
    assert changed_settings(cv, {"cv": {"folds": 5, "nested": False}}) == ["cv.folds"]


def test_a_resume_without_a_checkpoint_says_it_starts_again(image_set, tmp_path):
    """A run killed before its first checkpoint (or whose checkpoint was removed) trained from epoch 0 again
    without a word in its log."""
    labels, images = image_set
    cfg = run_config_from_dict(tiny_config(labels, images, report_test=False))
    training.fit(cfg, tmp_path / "run")
    (tmp_path / "run" / runfolder.CHECKPOINT).unlink()
    training.fit(cfg, tmp_path / "run", resume=True)
    log = runfolder.log_tail(tmp_path / "run", lines=400)
    assert f"resume: no checkpoint.pt in {tmp_path / 'run'}, so the run starts again from its first epoch" in log
    assert "resuming: stage" not in log
