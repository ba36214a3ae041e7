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
    (lambda c: c["stages"][0].update(lr="fast"), "expected a number"),
    (lambda c: c["stages"][0].update(scheduler="step"), "scheduler must be one of"),
    (lambda c: c["stages"][0].update(augment="mixup"), "augment must be one of"),
    (lambda c: c.update(backbone="vgg"), "unknown backbone"),
    (lambda c: c.update(stages=[]), "at least one stage"),
    (lambda c: c["stages"][0]["data"][0].pop("images"), "needs 'images'"),
    (lambda c: c["stages"][0].update(data=[{"manifest": "a.csv", "csv": "b.csv"}]), "exactly one"),
    (lambda c: c.update(threshold={"rule": "vibes"}), "threshold.rule"),
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
