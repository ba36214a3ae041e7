"""The lesion classifier: a pooled-feature backbone plus a one-logit head, and the freezing rules of each stage."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from core.backbones import BackboneSpec, build_backbone

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class HeadConfig:
    """'mlp': the paper's Linear(feat,256)-ReLU-Dropout-Linear(256,1); 'linear': its EfficientNet Dropout-Linear."""
    kind: str = "mlp"
    hidden: int = 256
    dropout: float = 0.5

    def __post_init__(self):
        if self.kind not in ("mlp", "linear"):
            raise ValueError(f"head kind must be 'mlp' or 'linear', not {self.kind!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_head(in_features: int, cfg: HeadConfig) -> nn.Sequential:
    if cfg.kind == "linear":
        return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(in_features, 1))
    return nn.Sequential(nn.Linear(in_features, cfg.hidden), nn.ReLU(inplace=True),
                         nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, 1))


class LesionClassifier(nn.Module):
    """backbone (pooled features) -> head -> one malignancy logit per image, shape (B, 1)."""

    def __init__(self, spec: BackboneSpec, head: HeadConfig, weights: str = "none"):
        super().__init__()
        self.spec, self.head_cfg = spec, head
        self.backbone = build_backbone(spec, weights)
        self.head = build_head(self.backbone.num_features, head)
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (what the head sees; used by KNN and PCA)."""
        return self.backbone(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before pooling (the Grad-CAM layer's output)."""
        return self.backbone.forward_features(x)

    def logit_from_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """Pooling (and any post-pool norm) plus the head, from a feature map."""
        return self.head(self.backbone.forward_head(fmap, pre_logits=True))

    def set_dropout(self, p: float) -> None:
        for m in self.head.modules():
            if isinstance(m, nn.Dropout):
                m.p = p

    def freeze_backbone(self, frozen: bool) -> None:
        """Stage 1 freezes every backbone parameter; stage 2 unfreezes them (BN stays frozen if the spec says so)."""
        self.backbone_frozen = frozen
        for p in self.backbone.parameters():
            p.requires_grad = not frozen
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.backbone_frozen:
            self.backbone.eval()  # a frozen backbone must not update BN statistics either
        elif mode and self.spec.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, _BN_TYPES):
                    m.eval()  # running stats stay fixed; affine parameters may still learn
        return self

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]
