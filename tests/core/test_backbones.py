"""Backbone registry: every entry builds, gives (B, 1) logits, and loads weights from each source."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from core.backbones import BACKBONES, WeightsError, build_backbone, get_spec
from core.model import HeadConfig, LesionClassifier
from tests.conftest import shared_path


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_and_gives_one_logit(name):
    spec = get_spec(name)
    model = LesionClassifier(spec, HeadConfig(), weights="none").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
        feats = model.features(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1)
    assert feats.shape == (2, spec.feature_dim)
    # the Grad-CAM layer exists and produces the map that pooling consumes
    assert model.backbone.get_submodule(spec.cam_layer) is not None


def test_convnext_is_pinned_to_the_papers_imagenet_1k_weights():
    spec = get_spec("convnext_tiny")
    assert spec.timm_name == "convnext_tiny.fb_in1k"
    # timm's own default tag differs: an unpinned name would silently change the weights
    assert timm.models.get_pretrained_cfg("convnext_tiny").tag != "fb_in1k"
    assert spec.preprocessing.mean == (0.485, 0.456, 0.406)


def test_offline_mobilenet_spec_carries_its_own_padding_and_normalisation():
    spec = get_spec("mobilenetv2_100_tflite")
    assert spec.model_kwargs == {"pad_type": "same"}
    assert spec.preprocessing.mean == (0.5, 0.5, 0.5) and spec.preprocessing.std == (0.5, 0.5, 0.5)
    assert spec.freeze_bn


def test_unknown_backbone_names_the_known_ones():
    with pytest.raises(KeyError, match="convnext_tiny"):
        get_spec("vgg16")


def test_local_weights_file_is_loaded(tmp_path):
    spec = get_spec("resnet18")
    source = build_backbone(spec, "none")
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = build_backbone(spec, str(path))
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_weights_file_for_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "wrong.safetensors"
    src = build_backbone(get_spec("resnet18"), "none")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="does not fit backbone mobilenetv2_100"):
        build_backbone(get_spec("mobilenetv2_100"), str(path))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        build_backbone(get_spec("resnet18"), str(tmp_path / "nope.safetensors"))


def test_imagenet_download_offline_names_the_local_file_option(tmp_path, monkeypatch):
    # no network here or in CI: force the hub offline and an empty cache so the download really fails
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match=r"--weights /path/to/resnet18\.a1_in1k\.safetensors"):
        build_backbone(get_spec("resnet18"), "imagenet")


def test_shared_offline_mobilenet_loads_and_recognises_imagenet_classes():
    weights = shared_path("weights", "mobilenetv2_100_tflite_imagenet.safetensors")
    head = shared_path("weights", "mobilenetv2_100_tflite_imagenet_classifier1001.safetensors")
    spec = get_spec("mobilenetv2_100_tflite")
    backbone = build_backbone(spec, str(weights)).eval()
    from safetensors.torch import load_file
    clf = load_file(str(head))
    # a constant mid-grey image is not a lesion; what we check is that real weights (not random) were loaded:
    # the pooled features of the loaded model must differ from a random init and be deterministic
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        f1, f2 = backbone(x), build_backbone(spec, str(weights)).eval()(x)
        rand = build_backbone(spec, "none").eval()(x)
    assert torch.allclose(f1, f2)
    assert not torch.allclose(f1, rand)
    logits = f1 @ clf["classifier.weight"].T + clf["classifier.bias"]
    assert logits.shape == (1, 1001)
