"""Run configs: YAML-shaped dicts become frozen dataclasses, and mistakes name the offending key."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from core.config import ConfigError, apply_override, run_config_from_dict
from tests.conftest import tiny_config

CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"


def test_shipped_recipes_parse_and_say_what_the_paper_says():
    isic = run_config_from_dict(yaml.safe_load((CONFIGS / "paper_isic.yaml").read_text()))
    s = isic.stages[0]
    assert (isic.backbone, s.epochs, s.lr, s.weight_decay, s.dropout, s.freeze_backbone, s.augment) == \
        ("convnext_tiny", 10, 1e-4, 1e-5, 0.5, False, "isic")
    transfer = run_config_from_dict(yaml.safe_load((CONFIGS / "paper_transfer.yaml").read_text()))
    one, two = transfer.stages
    assert (one.freeze_backbone, one.lr, one.weight_decay, one.epochs) == (True, 1e-4, 0.0, 2)
    assert (two.freeze_backbone, two.lr, two.weight_decay, two.dropout, two.scheduler) == \
        (False, 1e-5, 1e-5, 0.5, "plateau")
    assert transfer.init_from == "runs/paper_isic"
    demo = run_config_from_dict(yaml.safe_load((CONFIGS / "shared_demo.yaml").read_text()))
    assert demo.backbone == "mobilenetv2_100_tflite" and demo.weights.endswith(".safetensors")


def test_configs_are_frozen():
    cfg = run_config_from_dict(tiny_config("l.csv", "imgs"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3


def test_yaml_exponent_without_dot_is_read_as_a_number():
    raw = yaml.safe_load("lr: 1e-4")
    assert raw["lr"] == "1e-4"  # YAML 1.1: a string
    cfg = tiny_config("l.csv", "imgs")
    cfg["stages"][0]["lr"] = raw["lr"]
    assert run_config_from_dict(cfg).stages[0].lr == 1e-4


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(colour="red"), "unknown key"),
    (lambda c: c["stages"][0].update(lr="fast"), "expected a finite number"),
    (lambda c: c["stages"][0].update(scheduler="step"), "scheduler must be one of"),
    (lambda c: c["stages"][0].update(augment="mixup"), "augment must be one of"),
    (lambda c: c.update(backbone="vgg"), "unknown backbone"),
    (lambda c: c.update(stages=[]), "at least one stage"),
    (lambda c: c["stages"][0]["data"][0].pop("images"), "needs 'images'"),
    (lambda c: c["stages"][0].update(data=[{"manifest": "a.csv", "csv": "b.csv"}]), "exactly one"),
    (lambda c: c.update(threshold={"rule": "vibes"}), "threshold.rule"),
    # found in the run before, as tracebacks after '--check' had said ok
    (lambda c: c["stages"][0].update(dropout=2), r"dropout must be in \[0, 1\)"),
    (lambda c: c["stages"][0].update(weight_decay=-1e-5), "weight_decay >= 0"),
    (lambda c: c.update(head={"hidden": -3}), "head.hidden must be a positive number"),
    (lambda c: c.update(precision="fp8"), "precision must be one of auto, 32-true"),
    (lambda c: c.update(device="tpu"), "device must be auto, cpu, cuda, cuda:N or mps, not 'tpu'"),
    (lambda c: c.update(input_size=8), "input_size must be 16-4096 pixels"),
])
def test_mistakes_are_named(mutate, message):
    cfg = tiny_config("l.csv", "imgs")
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        run_config_from_dict(cfg)


def test_dotted_overrides_reach_nested_stage_values():
    raw = tiny_config("l.csv", "imgs")
    apply_override(raw, "stages.1.lr=3e-4")
    apply_override(raw, "threshold.target=0.95")
    apply_override(raw, "seed=5")
    cfg = run_config_from_dict(raw)
    assert cfg.stages[1].lr == 3e-4 and cfg.threshold.target == 0.95 and cfg.seed == 5
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_override(raw, "seed")


def overridden(*items: str):
    raw = tiny_config("l.csv", "imgs")
    for item in items:
        apply_override(raw, item)
    return run_config_from_dict(raw)


def test_overrides_are_coerced_to_the_declared_type():
    cfg = overridden("threshold.target=9e-1", "stages.0.lr=1e-3", "stages.1.weight_decay=0",
                     "split.val=2e-1", "seed=1e1", "stages.0.epochs=3.0", "n_boot=100",
                     "grad_checkpointing=yes", "channels_last=false", "report_test=1",
                     "name=2024", "input_size=null", "num_workers=none", "head.hidden=64")
    assert cfg.threshold.target == 0.9 and type(cfg.threshold.target) is float  # YAML alone: the text '9e-1'
    assert cfg.stages[0].lr == 1e-3 and type(cfg.stages[0].lr) is float
    assert cfg.stages[1].weight_decay == 0.0 and type(cfg.stages[1].weight_decay) is float
    assert cfg.split.val == 0.2 and cfg.seed == 10 and type(cfg.seed) is int
    assert cfg.stages[0].epochs == 3 and type(cfg.stages[0].epochs) is int and cfg.n_boot == 100
    assert cfg.grad_checkpointing is True and cfg.channels_last is False and cfg.report_test is True
    assert cfg.name == "2024" and cfg.input_size is None and cfg.num_workers is None and cfg.head.hidden == 64


@pytest.mark.parametrize("item, message", [
    ("threshold.target=abc", r"threshold\.target: expected a finite number \(float\), got 'abc'"),
    ("stages.1.lr=.nan", r"stages\[1\]\.lr: expected a finite number \(float\), got nan"),
    ("stages.0.lr=true", r"stages\[0\]\.lr: expected a finite number \(float\), got True"),
    ("stages.0.epochs=2.5", r"stages\[0\]\.epochs: expected a whole number \(int\), got 2\.5"),
    ("seed=[1, 2]", r"seed: expected a whole number \(int\), got \[1, 2\]"),
    ("grad_checkpointing=maybe", r"grad_checkpointing: expected true or false \(bool\), got 'maybe'"),
    ("grad_checkpointing=2", r"grad_checkpointing: expected true or false \(bool\), got 2"),
    ("stages.0.scheduler=no", r"stages\[0\]\.scheduler: expected text \(str\), got False \(YAML reads yes/no"),
    ("stages.0.lrr=1e-3", r"stages\[0\]: unknown key\(s\) lrr; known: augment"),
    ("colour=red", r"run: unknown key\(s\) colour"),
    ("threshold.goal=0.9", r"threshold: unknown key\(s\) goal"),
    ("stages.5.lr=1e-3", r"stages\.5 is not an index of a list of 2"),
    ("stages.first.lr=1e-3", r"stages\.first is not an index"),
    ("head.kind=transformer", r"head: head kind must be 'mlp' or 'linear'"),
])
def test_bad_overrides_are_refused_when_the_config_is_read(item, message):
    with pytest.raises(ConfigError, match=message):
        overridden(item)


def test_fit_refuses_a_mistyped_override_before_training(tmp_path, capsys):
    from train.fit import main
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config(str(tmp_path / "l.csv"), str(tmp_path / "imgs"))))
    out = tmp_path / "run"
    assert main(["--config", str(recipe), "--out", str(out), "--set", "threshold.target=ninety"]) == 2
    assert "threshold.target: expected a finite number (float), got 'ninety'" in capsys.readouterr().err
    assert not out.exists()  # nothing was started


@pytest.mark.parametrize("short", ["32", "16", "bf16", "64"])
def test_fabrics_short_precision_names_still_work(short):
    """Lightning Fabric maps '32' onto '32-true' (and YAML's `precision: 32` arrives as '32')."""
    assert run_config_from_dict(tiny_config("l.csv", "imgs", precision=short)).precision == short


def test_fit_names_a_recipe_that_is_not_a_mapping_and_a_device_this_machine_lacks(tmp_path, capsys):
    """A YAML list ended in AttributeError; device 'cuda' on a CPU-only machine in a RuntimeError traceback."""
    import torch

    from train.fit import main
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- name: tiny\n- stages: []\n")
    assert main(["--config", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "a recipe is a mapping of settings (name:, backbone:, stages: ...), not a list" in capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: 'cuda' is not missing here")
    (tmp_path / "l.csv").write_text("image,label\n")
    recipe.write_text(yaml.safe_dump(tiny_config(str(tmp_path / "l.csv"), str(tmp_path / "imgs"), device="cuda")))
    assert main(["--config", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "error: device 'cuda' was asked for but no CUDA GPU is available" in capsys.readouterr().err
    assert main(["--config", str(recipe), "--out", str(tmp_path / "run"), "--check"]) == 2
    assert "device 'cuda' was asked for" in capsys.readouterr().err


@pytest.mark.parametrize("split, message", [({"val": 0.0}, "val must be > 0"),
                                            ({"val": 0.5, "test": 0.5}, "val \\+ test < 1")])
def test_splits_that_cannot_choose_anything_are_refused(split, message):
    with pytest.raises(ConfigError, match=message):
        run_config_from_dict(tiny_config("l.csv", "imgs", split=split))


def test_report_test_needs_a_test_split():
    with pytest.raises(ConfigError, match="report_test needs"):
        run_config_from_dict(tiny_config("l.csv", "imgs", split={"val": 0.2, "test": 0.0}, report_test=True))


def test_threshold_target_defaults_follow_the_rule():
    assert run_config_from_dict(tiny_config("l.csv", "imgs", threshold={"rule": "fixed"})).threshold.target == 0.5
    assert run_config_from_dict(tiny_config("l.csv", "imgs")).threshold.target == 0.9
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        run_config_from_dict(tiny_config("l.csv", "imgs", threshold={"target": 1.5}))


def test_init_from_refuses_settings_the_parent_bundle_fixes():
    with pytest.raises(ConfigError, match="remove weights, input_size"):
        run_config_from_dict(tiny_config("l.csv", "imgs", init_from="runs/parent"))
    raw = tiny_config("l.csv", "imgs", init_from="runs/parent")
    for k in ("weights", "input_size"):
        raw.pop(k)
    assert run_config_from_dict(raw).init_from == "runs/parent"


def test_data_root_moves_relative_data_paths_and_keeps_absolute_ones(tmp_path):
    raw = yaml.safe_load((CONFIGS / "shared_demo.yaml").read_text())
    raw["data_root"] = str(tmp_path / "mydata")
    raw["stages"][0]["data"].append({"manifest": "/abs/m.csv"})
    cfg = run_config_from_dict(raw)
    first, absolute = cfg.stages[0].data
    assert first.csv == str(tmp_path / "mydata" / "pad_ufes_20_subset" / "labels.csv")
    assert first.images == str(tmp_path / "mydata" / "pad_ufes_20_subset" / "images")
    assert absolute.manifest == "/abs/m.csv"
    # the resolved config no longer has a data_root: resuming from it cannot join the root twice
    assert "data_root" not in cfg.to_dict() and run_config_from_dict(cfg.to_dict()).stages == cfg.stages


def test_missing_data_names_the_download_not_a_traceback(tmp_path):
    from core.training import run_data
    raw = yaml.safe_load((CONFIGS / "shared_demo.yaml").read_text())
    raw["data_root"] = str(tmp_path / "nowhere")
    cfg = run_config_from_dict(raw)
    with pytest.raises(ConfigError) as e:
        run_data(cfg)
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "pad_ufes_20_subset" / "labels.csv") in msg
    assert "PAD-UFES-20" in msg and "Mendeley" in msg and "--data-root" in msg


# ------------------------------------------------------------------ cross-validation
def test_cv_folds_are_read_and_zero_means_one_validation_split():
    assert run_config_from_dict(tiny_config("l.csv", "imgs")).cv.folds == 0
    assert not run_config_from_dict(tiny_config("l.csv", "imgs", cv=None)).cv.enabled
    cfg = run_config_from_dict(tiny_config("l.csv", "imgs", cv={"folds": "5"}))
    assert cfg.cv.folds == 5 and cfg.cv.enabled
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cv.folds = 3  # type: ignore[misc]


@pytest.mark.parametrize("run, message", [
    ({"cv": {"folds": 1}}, "cv.folds must be 0 .* or at least 2, not 1"),
    ({"cv": {"folds": -2}}, "cv.folds must be 0"),
    ({"cv": {"folds": 2.5}}, "cv.folds: expected a whole number"),
    ({"cv": {"k": 5}}, "cv: unknown key"),
    ({"cv": {"folds": 5}, "split": {"val": 0.15, "test": 0.0}, "report_test": True}, "report_test needs"),
    ({"cv": {"folds": 5}, "split": {"val": 0.1, "test": 1.0}}, "test must be >= 0 and < 1"),
])
def test_cv_mistakes_are_named(run, message):
    with pytest.raises(ConfigError, match=message):
        run_config_from_dict(tiny_config("l.csv", "imgs", **run))


def test_cv_does_not_use_split_val_and_allows_no_test_split():
    """With folds, each fold validates one fold run: split.val may be anything (even 0), and split.test 0 is the
    case of a user with an outside test set."""
    cfg = run_config_from_dict(tiny_config("l.csv", "imgs", cv={"folds": 4}, split={"val": 0.0, "test": 0.0}))
    assert cfg.split.test == 0 and cfg.cv.folds == 4


def test_shared_demo_cv_is_shared_demo_with_five_folds_and_its_test_patients():
    demo = run_config_from_dict(yaml.safe_load((CONFIGS / "shared_demo.yaml").read_text()))
    cv = run_config_from_dict(yaml.safe_load((CONFIGS / "shared_demo_cv.yaml").read_text()))
    assert cv.cv.folds == 5 and cv.report_test and cv.context is None
    assert (cv.split.test, cv.split.seed) == (demo.split.test, demo.split.seed)  # the same test patients
    same = lambda c: dataclasses.replace(c, name="x", cv=demo.cv)  # noqa: E731
    assert same(cv) == same(demo)  # nothing else differs


def test_folds_flag_reaches_the_config(tmp_path):
    from train.fit import build_parser, load_raw
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config("l.csv", "imgs", cv={"folds": 5})))
    raw = load_raw(build_parser().parse_args(["--config", str(recipe), "--folds", "3"]))
    assert run_config_from_dict(raw).cv.folds == 3
    raw = load_raw(build_parser().parse_args(["--config", str(recipe), "--folds", "0"]))
    assert not run_config_from_dict(raw).cv.enabled
