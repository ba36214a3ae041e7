"""Grad-CAM and Grad-CAM++ for the malignant logit, computed from the last feature map without a backbone backward."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

METHODS = ("gradcam", "gradcam++")


def map_and_grads(model, x: torch.Tensor, dtype=None, features=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feature map A, d(logit)/dA and the logits (`features`: a module computing the map, e.g. a bf16 copy).

    The map is the output of the backbone's last stage (the Grad-CAM layer). Only pooling and the head
    sit between it and the logit, so its gradient needs a backward through the head alone; this also
    works when every backbone parameter is frozen (where hook-based Grad-CAM gets no gradient)."""
    from core.device import autocast
    with torch.no_grad(), autocast(x.device, dtype):
        fmap = (features or model).feature_map(x)
    fmap = fmap.float().detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.logit_from_map(fmap)
        grads, = torch.autograd.grad(logits.sum(), fmap)  # samples are independent: sum gives per-sample grads
    return fmap.detach(), grads, logits.detach()


def cam_weights(fmap: torch.Tensor, grads: torch.Tensor, method: str) -> torch.Tensor:
    """Channel weights (B, C): Grad-CAM averages the gradient; Grad-CAM++ weights positive gradients
    (Chattopadhyay et al. 2018, in the closed form pytorch-grad-cam uses)."""
    if method == "gradcam":
        return grads.mean(dim=(2, 3))
    if method == "gradcam++":
        # float64 and eps 1e-6 as in pytorch-grad-cam: gradients are tiny, so cubes underflow in float32.
        # Apple's MPS has no float64, so the (small: B x C x 7 x 7) arrays are weighed on the CPU there.
        at = "cpu" if grads.device.type == "mps" else grads.device
        g, a = grads.detach().to(at, torch.float64), fmap.detach().to(at, torch.float64)
        g2, g3 = g.pow(2), g.pow(3)
        denom = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3 + 1e-6
        aij = torch.where(g != 0, g2 / denom, torch.zeros_like(g))
        return (g.clamp(min=0) * aij).sum(dim=(2, 3)).to(grads.device, torch.float32)
    raise ValueError(f"CAM method must be one of {METHODS}, not {method!r}")


def cams(fmap: torch.Tensor, grads: torch.Tensor, size: tuple[int, int], method: str = "gradcam") -> np.ndarray:
    """Heat-maps (B, H, W) in [0, 1] at the input size: ReLU of the weighted map, min-max scaled per image."""
    w = cam_weights(fmap, grads, method)
    cam = torch.relu((w[:, :, None, None] * fmap).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = cam.amin(dim=(1, 2), keepdim=True)
    hi = cam.amax(dim=(1, 2), keepdim=True)
    return ((cam - lo) / (hi - lo + 1e-7)).cpu().numpy()


def reference_cam(model, x: torch.Tensor, method: str = "gradcam") -> np.ndarray:
    """pytorch-grad-cam's own hook-based result on the same layer (the slow reference the fast path is checked against)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
    layer = model.backbone.get_submodule(model.spec.cam_layer)
    cls = GradCAM if method == "gradcam" else GradCAMPlusPlus
    x = x.clone().requires_grad_(True)  # gives the hooks a gradient even when the backbone is frozen
    with cls(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[BinaryClassifierOutputTarget(1)] * len(x))


def overlay(rgb: np.ndarray, cam: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """Blend a jet-coloured heat-map onto an RGB uint8 image; opacity 0 shows the photo alone."""
    from pytorch_grad_cam.utils.image import show_cam_on_image
    return show_cam_on_image(rgb.astype(np.float32) / 255.0, cam.astype(np.float32), use_rgb=True,
                             image_weight=float(np.clip(1 - opacity, 0, 1)))
