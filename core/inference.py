"""Single-photo and batch prediction from a bundle: probability, verdict, Grad-CAM and the model's provenance."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from core.bundle import Bundle
from core.device import fast_dtype, pick_device
from core.evaluation import model_summary
from core.gradcam import cams, map_and_grads
from core.images import load_image
from core.quality import QualityWarning, quality_warnings
from core.transforms import eval_transform


@dataclass
class Prediction:
    prob: float
    malignant: bool
    threshold: float
    model_input: np.ndarray          # the RGB crop the model saw (H, W, 3), uint8
    cam: np.ndarray | None           # heat-map over model_input, [0, 1]
    cam_method: str | None
    quality: list[QualityWarning]
    model: dict                      # provenance: training data, split, validation metrics, intended use
    timings_ms: dict = field(default_factory=dict)


class Predictor:
    """Holds one loaded model; thread-safe (the app shares it across sessions)."""

    def __init__(self, bundle: Bundle, device: str = "auto", fast: bool = True):
        self.bundle = bundle
        self.device = pick_device(device)
        self.dtype = fast_dtype(self.device) if fast else None
        self.model = bundle.model.to(self.device).eval()
        if fast:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.pp = bundle.spec.preprocessing
        self.transform = eval_transform(self.pp)
        self.summary = model_summary(bundle.meta)
        self._lock = threading.Lock()

    def prepare(self, img: Image.Image) -> tuple[torch.Tensor, np.ndarray]:
        """Normalised input tensor (1, 3, S, S) and the matching RGB crop for display."""
        x = self.transform(img).unsqueeze(0)
        mean = torch.tensor(self.pp.mean)[:, None, None]
        std = torch.tensor(self.pp.std)[:, None, None]
        rgb = ((x[0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return x, rgb

    def predict_image(self, img: Image.Image, cam_method: str | None = "gradcam") -> Prediction:
        t0 = time.perf_counter()
        quality = quality_warnings(img)
        x, rgb = self.prepare(img)
        x = x.to(self.device, memory_format=torch.channels_last)
        t1 = time.perf_counter()
        with self._lock:
            if cam_method:
                fmap, grads, logits = map_and_grads(self.model, x, self.dtype)
                heat = cams(fmap, grads, rgb.shape[:2], cam_method)[0]
            else:
                logits, heat = self.logits(x), None
        prob = float(torch.sigmoid(logits.float()).item())
        t2 = time.perf_counter()
        thr = self.bundle.threshold
        return Prediction(prob=prob, malignant=prob >= thr, threshold=thr, model_input=rgb, cam=heat,
                          cam_method=cam_method, quality=quality, model=self.summary,
                          timings_ms={"preprocess": (t1 - t0) * 1e3, "model": (t2 - t1) * 1e3})

    def predict_source(self, source, *, name=None, crop=None, cam_method="gradcam") -> Prediction:
        """From a path, bytes or an upload: decode only as much resolution as the model needs."""
        t0 = time.perf_counter()
        img = load_image(source, name=name, crop=crop, min_side=self.pp.resize_to)
        pred = self.predict_image(img, cam_method)
        pred.timings_ms["decode"] = (time.perf_counter() - t0) * 1e3 - sum(pred.timings_ms.values())
        return pred

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        from core.device import autocast
        with autocast(self.device, self.dtype):
            return self.model(x.to(self.device, memory_format=torch.channels_last)).float()
