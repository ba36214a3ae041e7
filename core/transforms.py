"""Per-stage augmentation (the paper's ISIC and smartphone recipes) and the evaluation transform."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from core.backbones import Preprocessing

AUGMENTATIONS = ("isic", "smartphone", "none")
_INTERP = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
           "nearest": T.InterpolationMode.NEAREST}


PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
# A photo whose short side is at least this many times the target is first shrunk by an integer box reduction
# (PIL's reducing_gap): much faster on big PNG/HEIC photos and near-identical (JPEGs are reduced in the decoder).
REDUCING_GAP = 3.0


def resize_short(img: Image.Image, target: int, interpolation: str) -> Image.Image:
    """Short side to `target` with torchvision Resize(int)'s geometry (long side truncated) and the weights' filter.

    Training, evaluation, screening and the app all resize through here, so the threshold chosen on validation
    is applied to the same pixels everywhere."""
    w, h = img.size
    short, long_ = (w, h) if w <= h else (h, w)
    new_long = int(target * long_ / short)
    size = (target, new_long) if w <= h else (new_long, target)
    if size == (w, h):
        return img
    gap = REDUCING_GAP if short >= REDUCING_GAP * target else None
    return img.resize(size, PIL_FILTERS[interpolation], reducing_gap=gap)


class ToNormalizedTensor:
    """T.ToTensor() then T.Normalize(mean, std) on an RGB PIL image, bit for bit, in numpy.

    torch runs these small element-wise steps on its OpenMP team; in the training process (no DataLoader workers,
    or evaluation with num_workers=0) on a busy machine each step then waits for a descheduled thread: the pair
    averaged 14 ms per 224 px image against 1 ms in numpy (median 0.4 ms for both), measured under load on 2 cores.
    The same operations in the same float32 order give identical numbers (tested). Anything but an RGB PIL image
    goes through torchvision itself."""

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self._torchvision = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, pic):
        if not isinstance(pic, Image.Image) or pic.mode != "RGB":
            return self._torchvision(pic)
        x = np.asarray(pic, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
        x /= np.float32(255)  # ToTensor divides (not multiplies by 1/255): the same rounding
        x -= self.mean
        x /= self.std
        return torch.from_numpy(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.ravel().tolist()}, std={self.std.ravel().tolist()})"


def _tail(pp: Preprocessing) -> list:
    return [ToNormalizedTensor(pp.mean, pp.std)]


def eval_transform(pp: Preprocessing) -> T.Compose:
    """Resize the short side to input/crop_pct, centre-crop, normalise with the weights' statistics."""
    interp = _INTERP[pp.interpolation]
    return T.Compose([T.Resize(pp.resize_to, interpolation=interp), T.CenterCrop(pp.input_size), *_tail(pp)])


def train_transform(pp: Preprocessing, augment: str) -> T.Compose:
    """'isic': random resized crop + flip + colour jitter; 'smartphone': random crop + flip, no jitter
    (the paper found jitter hurt on phone photos); 'none': the evaluation transform."""
    interp = _INTERP[pp.interpolation]
    if augment == "isic":
        return T.Compose([T.RandomResizedCrop(pp.input_size, scale=(0.6, 1.0), interpolation=interp),
                          T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2, 0.2, 0.02), *_tail(pp)])
    if augment == "smartphone":
        return T.Compose([T.Resize(pp.resize_to, interpolation=interp), T.RandomCrop(pp.input_size),
                          T.RandomHorizontalFlip(), *_tail(pp)])
    if augment == "none":
        return eval_transform(pp)
    raise ValueError(f"augment must be one of {AUGMENTATIONS}, not {augment!r}")
