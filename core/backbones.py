"""A registry of backbone specs (timm model, weights tag, feature size, Grad-CAM layer, preprocessing) and their builder."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import timm
import torch.nn as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be obtained or do not fit the backbone."""


INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # what core.transforms can resize with


@dataclass(frozen=True)
class Preprocessing:
    """How images are turned into tensors for a backbone; it travels with the weights into every bundle."""
    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):  # a hand-edited bundle fails here, by name, not mid-screening with NaN features
        numbers = lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(  # noqa: E731
            isinstance(x, (int, float)) and math.isfinite(x) for x in v)
        if not isinstance(self.input_size, int) or not 16 <= self.input_size <= 4096:
            raise ValueError(f"input_size must be a whole number of pixels, 16-4096, not {self.input_size!r}")
        if not isinstance(self.crop_pct, (int, float)) or not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], not {self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {self.interpolation!r}")
        if not numbers(self.mean) or not numbers(self.std) or min(self.std) <= 0:
            raise ValueError(f"mean and std must be 3 numbers each, std > 0, not {self.mean!r} and {self.std!r}")

    @property
    def resize_to(self) -> int:
        """Short side before the centre crop (timm's convention: input_size / crop_pct)."""
        return int(round(self.input_size / self.crop_pct))

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})  # TypeError/KeyError when malformed


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build a backbone and use it honestly."""
    name: str
    timm_name: str            # architecture.pretrained_tag: the tag is pinned so 'imagenet' means one thing
    feature_dim: int
    cam_layer: str            # module path of the last feature map before pooling (Grad-CAM target)
    preprocessing: Preprocessing | None = None   # None: timm's pretrained config for timm_name
    model_kwargs: dict = field(default_factory=dict)
    freeze_bn: bool = False   # keep BatchNorm in eval mode while fine-tuning (folded-BN weights)
    note: str = ""

    @property
    def architecture(self) -> str:
        return self.timm_name.split(".")[0]

    @property
    def downloadable(self) -> bool:
        """Whether 'imagenet' can fetch weights: only a pinned pretrained tag names one set of weights."""
        return "." in self.timm_name

    def no_download_reason(self) -> str:
        return (f"backbone {self.name!r} has no downloadable ImageNet weights ({self.note}); "
                "pass a local weights file with --weights /path/to/file.safetensors")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneSpec":
        pp = d.get("preprocessing")
        return cls(**{**d, "preprocessing": Preprocessing.from_dict(pp) if pp else None})

    def resolved(self) -> "BackboneSpec":
        """This spec with its preprocessing filled in from timm's pretrained config (what bundles store)."""
        if self.preprocessing is not None:
            return self
        cfg = timm.models.get_pretrained_cfg(self.timm_name).to_dict()
        pp = Preprocessing(input_size=cfg["input_size"][-1], crop_pct=cfg["crop_pct"],
                           interpolation=cfg["interpolation"], mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
        return replace(self, preprocessing=pp)


_TF_INCEPTION = Preprocessing(input_size=224, crop_pct=0.875, interpolation="bilinear",
                              mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

BACKBONES: dict[str, BackboneSpec] = {s.name: s for s in (
    # The paper's backbone. timm's default convnext_tiny tag is in12k_ft_in1k; the paper used ImageNet-1k.
    BackboneSpec("convnext_tiny", "convnext_tiny.fb_in1k", 768, "stages.3"),
    BackboneSpec("resnet18", "resnet18.a1_in1k", 512, "layer4"),
    BackboneSpec("resnet50", "resnet50.a1_in1k", 2048, "layer4"),
    BackboneSpec("efficientnet_b0", "efficientnet_b0.ra_in1k", 1280, "bn2"),
    BackboneSpec("mobilenetv2_100", "mobilenetv2_100.ra_in1k", 1280, "bn2"),
    # The offline MobileNetV2 in ../shared/weights: converted from TF-slim TFLite, so it needs TF 'SAME'
    # padding, inception normalisation, and frozen BatchNorm (BN is folded into identity placeholders).
    BackboneSpec("mobilenetv2_100_tflite", "mobilenetv2_100", 1280, "bn2", _TF_INCEPTION,
                 model_kwargs={"pad_type": "same"}, freeze_bn=True,
                 note="TF-slim MobileNetV2 converted from TFLite; load from a local file"),
)}


def get_spec(name: str) -> BackboneSpec:
    """The registered spec for a backbone name, with its preprocessing resolved."""
    try:
        return BACKBONES[name].resolved()
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


def build_backbone(spec: BackboneSpec, weights: str = "none") -> nn.Module:
    """Build the pooled-feature backbone; weights is 'none', 'imagenet' (timm download) or a local file path."""
    kwargs = dict(num_classes=0, **spec.model_kwargs)
    if weights == "none":
        return timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    if weights == "imagenet":
        return _download(spec, kwargs)
    return _from_file(spec, Path(weights), kwargs)


def _download(spec: BackboneSpec, kwargs: dict) -> nn.Module:
    if not spec.downloadable:
        raise WeightsError(spec.no_download_reason())
    try:
        return timm.create_model(spec.timm_name, pretrained=True, **kwargs)
    except Exception as e:  # network, hub and cache errors all surface differently; the remedy is the same
        raise WeightsError(
            f"could not download ImageNet weights for {spec.name} ({spec.timm_name}): {type(e).__name__}: {e}. "
            f"Offline sites: download the weights file elsewhere and pass it with "
            f"--weights /path/to/{spec.timm_name}.safetensors (or weights: <path> in the config)") from e


def _from_file(spec: BackboneSpec, path: Path, kwargs: dict) -> nn.Module:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (use 'imagenet', 'none' or a file path)")
    pp = spec.resolved().preprocessing
    overlay = dict(file=str(path), mean=pp.mean, std=pp.std, interpolation=pp.interpolation, crop_pct=pp.crop_pct)
    if not _has_classifier(path):
        overlay["num_classes"] = 0  # backbone-only file: nothing to strip
    try:
        return timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, KeyError, ValueError) as e:
        raise WeightsError(f"{path} does not fit backbone {spec.name} ({spec.architecture}): {str(e)[:300]}") from e


def _has_classifier(path: Path) -> bool:
    """Whether a weights file carries an ImageNet classifier (keys are read from the header, no tensors)."""
    if path.suffix != ".safetensors":
        return True
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith(("classifier.", "head.fc.", "fc.")) for k in f.keys())

