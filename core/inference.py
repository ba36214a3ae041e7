"""Single-photo and batch prediction from a bundle: probability, verdict, Grad-CAM and the model's provenance.

The fast path (``fast=True``, the default) is what the app and ``train.screen`` use:

- decode only the resolution the model needs (JPEG DCT-domain draft down to ``core.dataset.decode_limits``, the
  same limits training used; see ``core.images.load_image``);
- resize/crop with PIL exactly as ``core.transforms.eval_transform`` does, then go straight from the uint8
  crop to a normalised channels-last tensor (no ToTensor/Normalize round trips);
- one forward pass serves both the probability and the heat-map: Grad-CAM weights come from the head's
  gradient with respect to the last feature map (``core.gradcam``), no backward through the backbone;
- on CPUs with native bf16 (AVX512-BF16/AMX) and on GPUs (CUDA; fp16 is tried on Apple MPS) the backbone runs
  under autocast with its convolution/linear weights cast to the low-precision type once, at load time (plain
  autocast re-casts every weight on every call, which costs more than it saves on a CPU). Norm layers and the
  head stay fp32.
  A measured check at load time compares the reduced-precision and fp32 feature maps and probabilities and
  falls back to fp32 when they differ by more than ``FEATURE_TOLERANCE`` / ``PRECISION_TOLERANCE``
  (``Predictor.precision`` records the decision and the measured numbers).

An ensemble bundle (core.model.EnsembleClassifier) runs each member through the same path: its probability is the
members' combination, its heat-map the mean of the members' heat-maps, its features (gate, similar cases) the
members' side by side, and ``Prediction.disagreement`` says how far apart the members' scores are.
"""
from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from core.bundle import Bundle
from core.context import Fused, fuse
from core.dataset import decode_limits
from core.ensemble import Disagreement, disagreement
from core.device import autocast, fast_dtype, pick_device
from core.engine import choose_engine, record as engine_record
from core.gradcam import cams, map_and_grads
from core.images import load_image
from core.model import EnsembleClassifier, combine_logits
from core.quality import QualityWarning, quality_warnings
from core.similar import SimilarCase
from core.trust import (FLAGGED, NOT_ASSESSED, NOT_FLAGGED, Assessment, assess, assess_batch, interval_sentence,
                        reference_population)
from core.transforms import eval_transform, resize_short

# The load-time check accepts the reduced precision only if, on a fixed batch of photo-like inputs, the last
# feature map's relative error ||A_low - A_fp32|| / ||A_fp32|| is at most FEATURE_TOLERANCE and no probability
# moves by more than PRECISION_TOLERANCE. The feature error does not depend on how confident the head is and
# transfers from synthetic inputs to real photos (measured: convnext_tiny 0.6%, resnet50 0.6%, resnet18 0.5%,
# efficientnet_b0 1.6-1.9%, mobilenetv2_100 6-8%, the TFLite MobileNetV2 12-14%; benchmarks/README.md), whereas a
# probability check alone passed the TFLite MobileNetV2 on synthetic inputs and then missed by 0.036 on photos.
FEATURE_TOLERANCE = 0.01
PRECISION_TOLERANCE = 0.01
_REDUCED_TYPES = (nn.Conv2d, nn.Linear)
SIMILAR_K = 6  # similar cases shown beside a prediction


@dataclass
class Prediction:
    prob: float                      # the raw score: sigmoid(logit), not a calibrated probability
    malignant: bool                  # raw score >= threshold (use `verdict`: a photo may be not assessed)
    threshold: float
    model_input: np.ndarray          # the RGB crop the model saw (H, W, 3), uint8
    cam: np.ndarray | None           # heat-map over model_input, [0, 1]
    cam_method: str | None
    quality: list[QualityWarning]
    model: dict                      # provenance: training data, split, validation metrics, intended use
    timings_ms: dict = field(default_factory=dict)
    fused: Fused | None = None       # photo + clinical answers (core.context); the photo alone when none given
    assessment: Assessment | None = None  # verdict flagged / not flagged / not assessed (reason), calibrated prob
    similar: list[SimilarCase] = field(default_factory=list)  # most similar training/validation photos first
    lacks: list[str] = field(default_factory=list)            # what an older bundle cannot do (no gate, ...)
    reference: str | None = None     # the population the calibrated probability refers to
    interval_note: str | None = None  # what the calibrated probability's interval means, or why there is none
    threshold_calibrated: float | None = None
    disagreement: Disagreement | None = None  # an ensemble's members' raw scores (None: one model)

    @property
    def verdict(self) -> str:
        return self.assessment.verdict if self.assessment else (FLAGGED if self.malignant else NOT_FLAGGED)

    @property
    def assessed(self) -> bool:
        return self.verdict != NOT_ASSESSED

    @property
    def prob_calibrated(self) -> float | None:
        return self.assessment.prob_calibrated if self.assessment else None

    @property
    def cam_empty(self) -> bool:
        """The heat-map is flat: Grad-CAM's ReLU left nothing (the weighted map was negative everywhere), so the
        overlay is uniform blue, which would read as 'nothing suspicious' beside any verdict."""
        return self.cam is not None and float(self.cam.max() - self.cam.min()) < 1e-6

    @property
    def prob_calibrated_ci95(self) -> tuple[float, float] | None:
        """The calibrated probability's 95% interval over the calibration's refits (None: not assessed, no
        calibration, or a bundle from before the refits were stored)."""
        return self.assessment.prob_calibrated_ci95 if self.assessment else None

    @property
    def not_assessed_reason(self) -> str | None:
        return self.assessment.reason if self.assessment else None


class Predictor:
    """Holds one loaded model; thread-safe (the app shares it across sessions)."""

    def __init__(self, bundle: Bundle, device: str = "auto", fast: bool = True, engine: str | None = None):
        self.bundle = bundle
        self.device = pick_device(device)
        self.fast = fast
        self.model = bundle.model.to(self.device).eval()
        if fast:
            self.model = self.model.to(memory_format=torch.channels_last)
        ensemble = isinstance(self.model, EnsembleClassifier)
        self.members = list(self.model.members) if ensemble else [self.model]
        self.combine = self.model.combine if ensemble else "mean_logit"  # one member: its own logit either way
        self.pp = bundle.spec.preprocessing
        self.transform = eval_transform(self.pp)  # the reference pipeline (prepare_reference); fast path mirrors it
        self.summary = bundle.meta.summary()
        self.context = bundle.meta.context  # the optional clinical-context stage (None: photo only)
        self.decode_kw = decode_limits(self.pp.resize_to)  # load_image's JPEG draft limits, as in training
        self._lock = threading.Lock()
        self._mean = torch.tensor(self.pp.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(self.pp.std, dtype=torch.float32).view(1, 3, 1, 1)
        # Per member, the module that computes feature maps: the fp32 model, or a reduced-precision copy of its backbone.
        self._features = list(self.members)
        self.dtype = None
        self.precision = {"dtype": "float32", "reason": "fast=False" if not fast else "no fast reduced precision "
                          "on this device", "max_abs_prob_diff": None}
        self.engine = engine_record("pytorch", "fast=False") if not fast else None
        if fast:
            dtype = fast_dtype(self.device)
            if dtype is not None:
                self._choose_precision(dtype)
            # engine (core/engine.py): PyTorch as above, or ONNX Runtime (fp32) when measured faster and as exact
            self._choose_engine(engine)
            self.warmup()

    def _choose_engine(self, engine: str | None) -> None:
        """The first member's measurement decides; every other member must then pass the accuracy check too (one
        engine for all: ONNX Runtime runs fp32, so the members cannot mix it with an autocast path)."""
        first, record = choose_engine(self.members[0], self.pp, self.device, self._features[0], self.dtype,
                                      engine=engine)
        if record["engine"] == "pytorch":
            self.engine = record
            return
        rest = [choose_engine(m, self.pp, self.device, f, self.dtype, engine="onnxruntime")
                for m, f in zip(self.members[1:], self._features[1:])]
        failed = [i + 1 for i, (_, r) in enumerate(rest) if r["engine"] == "pytorch"]
        if failed:
            self.engine = {**record, "engine": "pytorch", "reason": f"ONNX Runtime chosen for member 0 ({record['reason']}) "
                           f"but member(s) {failed} failed its accuracy check: PyTorch for all"}
            return
        self._features = [first] + [f for f, _ in rest]
        self.engine = record if not rest else {**record, "members": len(self.members)}
        self.dtype = None  # the graph computes fp32: no autocast, nothing to re-score near the threshold

    # ------------------------------------------------------------------ precision
    def _choose_precision(self, dtype: torch.dtype) -> None:
        """Use `dtype` only if it reproduces fp32's feature maps and probabilities on a fixed photo-like batch."""
        name = str(dtype).removeprefix("torch.")
        try:
            x = check_inputs(self.pp, self.device)
            reduced, rel, diff = [], 0.0, 0.0
            for member in self.members:  # every member must pass: one bad member would move the combined score
                copy_, r, d = _reduced_and_errors(member, x, dtype, self.device)
                reduced, rel, diff = reduced + [copy_], max(rel, r), max(diff, d)
        except (RuntimeError, TypeError) as e:  # a backend without this dtype's kernels or autocast (e.g. old MPS)
            self.precision.update(reason=f"{name} not usable on {self.device.type}: {e}")
            return
        measured = f"feature error {rel:.2%} (limit {FEATURE_TOLERANCE:.0%}), max |dP| {diff:.2g} (limit " \
                   f"{PRECISION_TOLERANCE:g}) on the load-time check"
        self.precision = {"dtype": name, "reason": measured, "max_abs_prob_diff": diff, "feature_rel_err": rel}
        if rel <= FEATURE_TOLERANCE and diff <= PRECISION_TOLERANCE:
            self._features, self.dtype = reduced, dtype
        else:
            self.precision.update(dtype="float32", reason=f"{name} rejected: {measured}")

    def warmup(self) -> None:
        """One forward + CAM at the input size, so the first real request does not pay for kernel selection."""
        s = self.pp.input_size
        img = np.zeros((s, s, 3), np.uint8)
        self._forward(self.to_input(img[None]), "gradcam", (s, s))

    # ------------------------------------------------------------------ preprocessing
    def crop(self, img: Image.Image) -> np.ndarray:
        """The model's view of `img` as uint8 (S, S, 3); see model_view."""
        return model_view(img, self.pp)

    def to_input(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 crops (B, S, S, 3) -> normalised float (B, 3, S, S) in channels-last memory on the device."""
        t = torch.as_tensor(crops).to(self.device)
        x = t.permute(0, 3, 1, 2).float()  # a permuted NHWC buffer is already channels-last
        x = (x * (1.0 / 255.0) - self._mean.to(self.device)) / self._std.to(self.device)
        return x.contiguous(memory_format=torch.channels_last)

    def prepare(self, img: Image.Image) -> tuple[torch.Tensor, np.ndarray]:
        """Normalised input tensor (1, 3, S, S) and the matching RGB crop for display."""
        rgb = self.crop(img)
        return self.to_input(rgb[None]), rgb

    def prepare_reference(self, img: Image.Image) -> torch.Tensor:
        """The same input through torchvision's eval_transform (the reference the fast preprocessing must equal)."""
        return self.transform(img).unsqueeze(0)

    # ------------------------------------------------------------------ model
    def _forward(self, x: torch.Tensor, cam_method: str | None, size):
        """Member logits (B, K), heat-map (or None) and pooled features (B, K*D) from one forward pass per member."""
        if not cam_method:
            return self._forward_no_cam(x)
        logits, heats, feats = [], [], []
        with self._lock:
            for member, features in zip(self.members, self._features):
                fmap, grads, z = map_and_grads(member, x, self.dtype, features=features)
                with torch.no_grad():
                    feats.append(member.backbone.forward_head(fmap, pre_logits=True).float())
                logits.append(z.float())
                heats.append(cams(fmap, grads, size, cam_method))
        return torch.cat(logits, 1), mean_cam(heats), torch.cat(feats, 1).cpu().numpy()

    def _forward_no_cam(self, x: torch.Tensor):
        member_logits, feats = self.member_outputs(x)
        return member_logits, None, feats

    def _trust(self, prob: float, feats: np.ndarray, quality) -> dict:
        """The Prediction fields that say whether the photo may be assessed, and what it resembles."""
        b = self.bundle
        gate_result = b.gate.check(feats)[0] if b.gate is not None else None
        assessment = assess(prob, b.threshold, calibration=b.calibration, gate_result=gate_result, quality=quality)
        # a refused photo gets no similar cases either: their labels beside it would read as a verdict
        similar = b.similar.query(feats, SIMILAR_K)[0] if b.similar is not None and assessment.assessed else []
        return {"assessment": assessment, "similar": similar, "lacks": b.lacks(),
                "reference": reference_population(b.calibration),
                "interval_note": interval_sentence(b.calibration, assessment.prob_calibrated_ci95,
                                                   b.calibration.threshold(b.threshold) if b.calibration else None)
                if assessment.assessed else None,
                "threshold_calibrated": b.calibration.threshold(b.threshold) if b.calibration else None}

    def predict_image(self, img: Image.Image, cam_method: str | None = "gradcam", context: dict | None = None
                      ) -> Prediction:
        t0 = time.perf_counter()
        quality = quality_warnings(img)
        x, rgb = self.prepare(img)
        t1 = time.perf_counter()
        member_logits, heat, feats = self._forward(x, cam_method, rgb.shape[:2])
        prob = float(torch.sigmoid(combine_logits(member_logits, self.combine)).item())
        thr = self.bundle.threshold
        members = disagreement(torch.sigmoid(member_logits).cpu().numpy(), thr)
        if self.dtype is not None and abs(prob - thr) <= PRECISION_TOLERANCE:
            prob = float(self.probs(x)[0])  # near the threshold the verdict must be fp32's, where it was chosen
        t2 = time.perf_counter()
        trust = self._trust(prob, feats, quality)
        assessed = trust["assessment"].assessed
        return Prediction(prob=prob, malignant=prob >= thr, threshold=thr, model_input=rgb,
                          cam=None if heat is None else heat[0], cam_method=cam_method, quality=quality,
                          model=self.summary,
                          timings_ms={"preprocess": (t1 - t0) * 1e3, "model": (t2 - t1) * 1e3},
                          # a photo the model cannot assess gets no result at all, fused with answers or not
                          fused=fuse(self.context, prob, thr, context) if assessed else None,
                          disagreement=members, **trust)

    def predict_source(self, source, *, name=None, crop=None, cam_method="gradcam", context=None) -> Prediction:
        """From a path, bytes or an upload: decode only as much resolution as the model needs."""
        t0 = time.perf_counter()
        img = load_image(source, name=name, crop=crop, **self.decode_kw)
        t1 = time.perf_counter()
        pred = self.predict_image(img, cam_method, context)
        pred.timings_ms = {"decode": (t1 - t0) * 1e3, **pred.timings_ms}
        return pred

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1) of a normalised batch, in fp32, through the same (possibly reduced-precision) path."""
        return self.outputs(x)[0]

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Logits (B, 1) and pooled features (B, K*D) (what the head, the gate and similar cases see), fp32."""
        member_logits, feats = self.member_outputs(x)
        return combine_logits(member_logits, self.combine), feats

    def member_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Each member's logit (B, K) and the members' pooled features side by side (B, K*D), fp32."""
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        logits, feats = [], []
        with self._lock, torch.no_grad():
            for member, features in zip(self.members, self._features):
                with autocast(self.device, self.dtype):
                    fmap = features.feature_map(x)
                pooled = member.backbone.forward_head(fmap.float(), pre_logits=True).float()
                logits.append(member.head(pooled).float())
                feats.append(pooled)
        return torch.cat(logits, 1), torch.cat(feats, 1).cpu().numpy()

    def assess_batch(self, x: torch.Tensor, quality_lists=None) -> list[Assessment]:
        """Verdicts (flagged / not flagged / not assessed with a reason) for a normalised batch (train.screen)."""
        p, feats, member_p = self._scores(x)
        return assess_batch(p, self.bundle.threshold, calibration=self.bundle.calibration, gate=self.bundle.gate,
                            feats=feats, quality_lists=quality_lists, member_probs=member_p)

    def probs(self, x: torch.Tensor) -> np.ndarray:
        """P(malignant) (raw score) per image of a normalised batch; images near the threshold re-scored in fp32."""
        return self.probs_and_features(x)[0]

    def probs_and_features(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores (near-threshold ones re-scored in fp32) and pooled features from one forward pass."""
        return self._scores(x)[:2]

    def _scores(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """probs_and_features plus each member's raw score (B, K)."""
        member_logits, feats = self.member_outputs(x)
        member_p = torch.sigmoid(member_logits).cpu().numpy().astype(np.float64)
        p = torch.sigmoid(combine_logits(member_logits, self.combine)).squeeze(1).cpu().numpy().astype(np.float64)
        near = np.flatnonzero(np.abs(p - self.bundle.threshold) <= PRECISION_TOLERANCE)
        if self.dtype is not None and len(near):
            with self._lock, torch.no_grad(), autocast(self.device, None):  # IEEE fp32 (no TF32 on CUDA)
                exact = torch.sigmoid(self.model(x[near].to(self.device)).float()).squeeze(1)
            p[near] = exact.cpu().numpy()
        return p, feats, member_p


def model_view(img: Image.Image, pp) -> np.ndarray:
    """uint8 (S, S, 3): short side resized to pp.resize_to, centre crop of pp.input_size (no model needed, so
    DataLoader workers can run it).

    Same geometry and filter as torchvision's Resize(int) + CenterCrop on a PIL image (eval_transform); only a
    photo whose short side is >= REDUCING_GAP x the target is box-reduced first (near-identical, much faster)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = resize_short(img, pp.resize_to, pp.interpolation)
    s = pp.input_size
    w, h = img.size
    if w < s or h < s:  # torchvision pads with zeros when the crop is larger than the image
        canvas = Image.new("RGB", (max(w, s), max(h, s)))
        canvas.paste(img, ((max(w, s) - w) // 2, (max(h, s) - h) // 2))
        img, (w, h) = canvas, canvas.size
    left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
    return np.array(img.crop((left, top, left + s, top + s)))  # a writable copy (torch wants one)


def _reduced_and_errors(member: nn.Module, x: torch.Tensor, dtype, device) -> tuple[nn.Module, float, float]:
    """A member's reduced-precision copy, its largest relative feature-map error and its largest probability change."""
    reduced = reduced_precision_copy(member, dtype)
    with torch.no_grad():
        with autocast(device, None):  # the reference is IEEE fp32 (no TF32 on CUDA)
            f32 = member.feature_map(x).float()
        with autocast(device, dtype):
            low = reduced.feature_map(x).float()
        p32 = torch.sigmoid(member.logit_from_map(f32).float())
        plow = torch.sigmoid(member.logit_from_map(low).float())
    rel = float(((low - f32).flatten(1).norm(dim=1) / f32.flatten(1).norm(dim=1).clamp_min(1e-12)).max())
    return reduced, rel, float((plow - p32).abs().max())


def mean_cam(heats: list[np.ndarray]) -> np.ndarray:
    """The members' heat-maps (each (B, H, W) in [0, 1]) averaged and rescaled to [0, 1]; one member's unchanged."""
    if len(heats) == 1:
        return heats[0]
    cam = np.mean(heats, axis=0)
    lo = cam.min(axis=(1, 2), keepdims=True)
    hi = cam.max(axis=(1, 2), keepdims=True)
    return (cam - lo) / (hi - lo + 1e-7)


def reduced_precision_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` whose backbone convolutions and linear layers hold `dtype` weights.

    Run under autocast(dtype): those layers then use the weights as they are instead of casting them on every
    call; norm layers (fp32 under autocast's rules) and the head keep fp32 weights, so only feature_map() is
    meant to be called on the copy."""
    reduced = copy.deepcopy(model)
    for module in reduced.backbone.modules():
        if isinstance(module, _REDUCED_TYPES):
            module.to(dtype)
    return reduced.eval()


def check_inputs(pp, device, n: int = 4, seed: int = 0) -> torch.Tensor:
    """A fixed batch of photo-like synthetic inputs (smooth skin tones, a darker blob, fine texture), normalised."""
    g = torch.Generator().manual_seed(seed)
    s = pp.input_size
    low = torch.rand(n, 3, 6, 6, generator=g)
    base = torch.nn.functional.interpolate(low, size=(s, s), mode="bicubic", align_corners=False)
    skin = torch.tensor([0.80, 0.60, 0.50]).view(1, 3, 1, 1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
    blob = torch.exp(-((xx / 0.4) ** 2 + (yy / 0.3) ** 2)).view(1, 1, s, s)
    img = skin * (0.75 + 0.25 * base) * (1 - 0.6 * blob) + 0.03 * torch.randn(n, 3, s, s, generator=g)
    mean = torch.tensor(pp.mean).view(1, 3, 1, 1)
    std = torch.tensor(pp.std).view(1, 3, 1, 1)
    x = (img.clamp(0, 1) - mean) / std
    return x.to(device).contiguous(memory_format=torch.channels_last)
