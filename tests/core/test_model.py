"""The classifier head and the freezing rules of each training stage."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from core.backbones import get_spec
from core.model import HeadConfig, LesionClassifier


def _model(name="mobilenetv2_100", **head):
    return LesionClassifier(get_spec(name), HeadConfig(**head), weights="none")


def _step(model, lr=1e-2):
    opt = torch.optim.Adam(model.trainable_parameters(), lr=lr)
    model.train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0.0, 1.0, 0.0, 1.0])
    loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_paper_head_is_linear_relu_dropout_linear():
    head = _model(dropout=0.5).head
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert head[0].in_features == 1280 and head[0].out_features == 256
    assert head[2].p == 0.5 and head[3].out_features == 1


def test_efficientnet_variant_head_is_dropout_linear():
    head = _model(kind="linear", dropout=0.2).head
    assert [type(m) for m in head] == [nn.Dropout, nn.Linear]
    assert head[0].p == 0.2 and head[1].out_features == 1


def test_bad_head_config_is_rejected():
    with pytest.raises(ValueError, match="head kind"):
        HeadConfig(kind="transformer")
    with pytest.raises(ValueError, match="dropout"):
        HeadConfig(dropout=1.0)


def test_frozen_stage_changes_only_the_head():
    model = _model()
    model.freeze_backbone(True)
    before = _snapshot(model.backbone)
    head_before = _snapshot(model.head)
    _step(model)
    after = _snapshot(model.backbone)
    for k in before:  # weights and BN running statistics alike
        assert torch.equal(before[k], after[k]), f"frozen backbone changed: {k}"
    assert any(not torch.equal(head_before[k], v) for k, v in _snapshot(model.head).items())
    assert all(not p.requires_grad for p in model.backbone.parameters())


@pytest.mark.slow
def test_unfrozen_stage_trains_the_backbone():
    model = _model()
    model.freeze_backbone(True)
    model.freeze_backbone(False)
    before = _snapshot(model.backbone)
    _step(model)
    changed = [k for k, v in _snapshot(model.backbone).items() if not torch.equal(before[k], v)]
    assert any(k.endswith("weight") for k in changed)


@pytest.mark.slow
def test_folded_batchnorm_specs_keep_bn_statistics_fixed_while_training():
    model = _model("mobilenetv2_100_tflite")
    bn_stats = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running_" in k}
    _step(model)
    assert model.backbone.bn1.training is False  # BN kept in eval mode inside a training model
    for k, v in model.backbone.state_dict().items():
        if "running_" in k:
            assert torch.equal(bn_stats[k], v), k
    # while an ordinary spec updates its statistics
    plain = _model("mobilenetv2_100")
    stats = plain.backbone.bn1.running_mean.clone()
    _step(plain)
    assert not torch.equal(stats, plain.backbone.bn1.running_mean)


def test_set_dropout_changes_the_head_only():
    model = _model(dropout=0.5)
    model.set_dropout(0.1)
    assert model.head[2].p == 0.1
