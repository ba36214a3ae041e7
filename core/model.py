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


COMBINE_RULES = ("mean_prob", "mean_logit")


def combine_logits(member_logits: torch.Tensor, rule: str = "mean_prob") -> torch.Tensor:
    """One logit (B, 1) from member logits (B, K): the logit of the members' mean probability, or their mean logit.

    mean_prob is computed in log space (logsumexp of log-sigmoids), so a member at +-40 neither overflows nor
    rounds the mean probability to exactly 0 or 1; with one member both rules return its logit unchanged."""
    if rule == "mean_logit":
        return member_logits.mean(dim=1, keepdim=True)
    if rule != "mean_prob":
        raise ValueError(f"combine rule must be one of {COMBINE_RULES}, not {rule!r}")
    log_k = torch.log(torch.tensor(float(member_logits.shape[1]), dtype=member_logits.dtype,
                                   device=member_logits.device))
    log_p = torch.logsumexp(nn.functional.logsigmoid(member_logits), dim=1, keepdim=True) - log_k
    log_q = torch.logsumexp(nn.functional.logsigmoid(-member_logits), dim=1, keepdim=True) - log_k
    return log_p - log_q


class EnsembleClassifier(nn.Module):
    """K LesionClassifiers of one architecture (e.g. the K fold models of a cross-validated run) read as one model.

    model(x) is the combined logit (B, 1); features(x) (and backbone(x)) the members' pooled features side by side
    (B, K*D), and head(features) the combined logit from them, so code written for a LesionClassifier's
    backbone -> head split (embeddings, trust, export) works unchanged. The members' own parts stay reachable
    for what must be done per member (Grad-CAM, the out-of-distribution gate)."""

    def __init__(self, members: list[LesionClassifier], combine: str = "mean_prob"):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        first = members[0]
        for i, m in enumerate(members[1:], 1):
            if m.spec.to_dict() != first.spec.to_dict() or m.head_cfg != first.head_cfg:
                raise ValueError(f"ensemble member {i} is a {m.spec.name} ({m.head_cfg.kind} head), member 0 a "
                                 f"{first.spec.name} ({first.head_cfg.kind} head): members must share one architecture")
        if combine not in COMBINE_RULES:
            raise ValueError(f"combine rule must be one of {COMBINE_RULES}, not {combine!r}")
        self.members = nn.ModuleList(members)
        self.combine = combine
        self.spec, self.head_cfg = first.spec, first.head_cfg

    def __len__(self) -> int:
        return len(self.members)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K): each member's logit."""
        return torch.cat([m(x) for m in self.members], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_logits(self.member_logits(x), self.combine)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.features(x) for m in self.members], dim=1)

    @property
    def backbone(self) -> nn.Module:
        """x -> the members' pooled features side by side (B, K*D)."""
        return _Split(self, "features")

    @property
    def head(self) -> nn.Module:
        """(B, K*D) features -> the combined logit (B, 1)."""
        return _Split(self, "logit_from_features")

    def logit_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        parts = feats.chunk(len(self.members), dim=1)
        return combine_logits(torch.cat([m.head(f) for m, f in zip(self.members, parts)], dim=1), self.combine)


class _Split(nn.Module):
    """A view of one half of an ensemble (its features, or its head on them), as a module.

    The ensemble is held outside the module tree, so the view adds no second copy of the members' parameters to
    a state dict (safetensors refuses shared tensors)."""

    def __init__(self, ensemble: EnsembleClassifier, method: str):
        super().__init__()
        object.__setattr__(self, "_ensemble", ensemble)
        self._method = method
        self.training = ensemble.training  # callers save and restore a module's mode around eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self._ensemble, self._method)(x)

    def train(self, mode: bool = True):
        self._ensemble.train(mode)
        return self

    def _apply(self, fn, recurse=True):  # .to(device) / .float() act on the members
        self._ensemble._apply(fn, recurse)
        return self
