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


# Recorded with the registry's settings for the TF-converted MobileNetV2 in ../shared/weights (pad_type='same',
# mean = std = 0.5, bilinear resize to 256, centre crop 224) on scikit-learn's two bundled sample photos: the
# top-5 ImageNet-1k classes (classifier index - 1) with their logits. timm's default symmetric padding shifts
# every stride-2 convolution by a pixel and ImageNet's mean/std feed the network other numbers; either keeps
# the top-1 here but changes the top-5 and moves logits by 1-5 (test_wrong_padding_or_normalisation_...).
KNOWN_TOP5 = {
    "china.jpg": [(698, 10.2186),   # palace
                  (442, 9.0854),    # bell cote
                  (663, 9.0074),    # monastery
                  (975, 8.6439),    # lakeside
                  (483, 7.6493)],   # castle
    "flower.jpg": [(599, 12.4401),  # honeycomb
                   (309, 8.2966),   # bee
                   (985, 7.0392),   # daisy
                   (994, 6.9298),   # stinkhorn
                   (996, 6.6750)],  # hen-of-the-woods
}
LOGIT_TOLERANCE = 0.05  # fp32 kernels and resize code may differ a little between machines and versions


@pytest.fixture(scope="module")
def offline_mobilenet():
    """(weights path, ImageNet head, the two sample photos)."""
    import os

    import sklearn.datasets
    from PIL import Image
    from safetensors.torch import load_file
    weights = shared_path("weights", "mobilenetv2_100_tflite_imagenet.safetensors")
    head = load_file(str(shared_path("weights", "mobilenetv2_100_tflite_imagenet_classifier1001.safetensors")))
    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    photos = {n: Image.open(os.path.join(folder, n)).convert("RGB") for n in KNOWN_TOP5}
    return str(weights), head, photos


def imagenet_top5(offline_mobilenet, spec) -> dict:
    """Top-5 (ImageNet-1k index, logit) per sample photo through the registry's backbone and eval transform."""
    from core.transforms import eval_transform
    weights, head, photos = offline_mobilenet
    backbone = build_backbone(spec, weights).eval()
    x = torch.stack([eval_transform(spec.preprocessing)(im) for im in photos.values()])
    with torch.no_grad():
        logits = backbone(x) @ head["classifier.weight"].T + head["classifier.bias"]
    top = torch.topk(logits, 5)
    return {name: [(int(i) - 1, float(v)) for v, i in zip(vals, idx)]  # index 0 is "background"
            for name, vals, idx in zip(photos, top.values, top.indices)}


def matches_recorded(got: dict) -> bool:
    return all([i for i, _ in got[n]] == [i for i, _ in KNOWN_TOP5[n]] and
               all(abs(v - w) <= LOGIT_TOLERANCE for (_, v), (_, w) in zip(got[n], KNOWN_TOP5[n]))
               for n in KNOWN_TOP5)


def test_shared_offline_mobilenet_gives_the_recorded_imagenet_answers(offline_mobilenet):
    got = imagenet_top5(offline_mobilenet, get_spec("mobilenetv2_100_tflite"))
    info = timm.data.ImageNetInfo()
    assert info.index_to_description(got["china.jpg"][0][0]) == "palace"
    assert info.index_to_description(got["flower.jpg"][0][0]) == "honeycomb"
    assert matches_recorded(got), got


@pytest.mark.parametrize("wrong", ["symmetric padding", "imagenet mean/std"])
def test_wrong_padding_or_normalisation_gives_another_answer(offline_mobilenet, wrong):
    from dataclasses import replace
    spec = get_spec("mobilenetv2_100_tflite")
    if wrong == "symmetric padding":
        spec = replace(spec, model_kwargs={"pad_type": ""})
    else:
        spec = replace(spec, preprocessing=replace(spec.preprocessing, mean=(0.485, 0.456, 0.406),
                                                   std=(0.229, 0.224, 0.225)))
    got = imagenet_top5(offline_mobilenet, spec)
    assert not matches_recorded(got)
    assert got["china.jpg"][0][0] == 698  # the top-1 alone would not have noticed
