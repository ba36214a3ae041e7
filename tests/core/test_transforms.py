"""Tests for core.transforms: the numpy to-tensor step equals torchvision's ToTensor + Normalize bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from core.backbones import get_spec
from core.transforms import ToNormalizedTensor, eval_transform, train_transform

STATS = [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]


def rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("mean, std", STATS)
def test_to_normalized_tensor_equals_torchvision_bit_for_bit(mean, std):
    reference = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    every_value = Image.fromarray(np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3).astype(np.uint8))
    for img in (rgb(224, 224), rgb(37, 91, seed=1), every_value):
        got = ToNormalizedTensor(mean, std)(img)
        want = reference(img)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got, want)


def test_anything_but_an_rgb_image_goes_through_torchvision():
    a = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mean, std = STATS[0]
    assert torch.equal(ToNormalizedTensor(mean, std)(a), T.Compose([T.ToTensor(), T.Normalize(mean, std)])(a))


@pytest.mark.parametrize("augment", ["smartphone", "isic", "none"])
def test_train_and_eval_transforms_give_what_the_torchvision_pipelines_gave(augment):
    pp = get_spec("mobilenetv2_100_tflite").preprocessing
    img = rgb(300, 256, seed=2)
    new = train_transform(pp, augment)
    old = T.Compose([*new.transforms[:-1], T.ToTensor(), T.Normalize(pp.mean, pp.std)])
    torch.manual_seed(5)
    a = new(img)
    torch.manual_seed(5)
    assert torch.equal(a, old(img))
    ev = eval_transform(pp)
    assert torch.equal(ev(img), T.Compose([*ev.transforms[:-1], T.ToTensor(), T.Normalize(pp.mean, pp.std)])(img))
