"""The one place that decides which device and precision the project runs on."""
from __future__ import annotations

import contextlib
import os
import threading

import torch


def mps_available() -> bool:
    """Apple-silicon GPU (Metal Performance Shaders) available to this torch build."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(preference: str = "auto") -> torch.device:
    """'auto' takes CUDA, then Apple MPS, then the CPU; an explicit 'cuda' or 'mps' that is absent is an error."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
    if preference.startswith("mps") and not mps_available():
        raise RuntimeError("device 'mps' was asked for but Apple MPS is not available; use 'auto' or 'cpu'")
    return torch.device(preference)


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix units (AVX512-BF16/AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision worth trying for inference on this device, or None for plain fp32.

    A candidate only: core.inference keeps it for a model only if its load-time check shows the feature map
    within tolerance of fp32. On MPS the candidate is fp16 (Metal's native half type; bf16 needs a recent macOS
    and is not faster there); nothing about MPS accuracy has been measured here, so the check decides alone."""
    if os.environ.get("SKINSCREEN_FP32") == "1":  # escape hatch for bit-for-bit comparisons
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


_TF32_LOCK = threading.Lock()
_tf32_off = {"depth": 0, "saved": None}  # contexts open across threads, and the settings the first one found


def _fp32_settings():
    """(read, write) for the cuDNN-convolution and CUDA-matmul fp32 precision: torch's per-backend API where it has
    one (mixing it with the legacy allow_tf32 flags makes torch refuse to read them), else the legacy flags."""
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is not None and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        def read():
            return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision

        def write(values):
            torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = values
        return read, write, ("ieee", "ieee")

    def read_legacy():
        return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32

    def write_legacy(values):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = values
    return read_legacy, write_legacy, (False, False)


@contextlib.contextmanager
def ieee_fp32(device: torch.device):
    """fp32 that is fp32 on CUDA too: cuDNN runs fp32 convolutions in TF32 (a 10-bit mantissa) by default, which moved
    a MobileNetV2's probability by 0.011 from the CPU's on an H200 (the GPU check), past the 0.01 this project holds
    every device to. Elsewhere a no-op. The settings are process-wide: the first context to open turns TF32 off,
    the last to close restores what it found (the app predicts from several threads; one thread's exit must not
    turn TF32 back on under another's forward pass)."""
    if torch.device(device).type != "cuda":
        yield
        return
    read, write, ieee = _fp32_settings()
    with _TF32_LOCK:
        if _tf32_off["depth"] == 0:
            _tf32_off["saved"] = read()
            write(ieee)
        _tf32_off["depth"] += 1
    try:
        yield
    finally:
        with _TF32_LOCK:
            _tf32_off["depth"] -= 1
            if _tf32_off["depth"] == 0:
                write(_tf32_off["saved"])


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for `dtype`, or plain IEEE fp32 (no TF32 on CUDA) for None."""
    if dtype is None:
        return ieee_fp32(device)
    return torch.autocast(device_type=device.type, dtype=dtype)


def fabric_precision(preference: str, accelerator: str) -> str:
    """Map a run's precision setting onto Lightning Fabric's: 'auto' = bf16-mixed on CUDA GPUs and on CPUs with
    native bf16 units (about 1.8x faster training on such a CPU, same validation AUC), else fp32 (also on Apple
    MPS: mixed-precision training there is unmeasured, and a run's validation choices must not depend on it)."""
    if preference != "auto":
        return preference
    if accelerator in ("cuda", "gpu") or (accelerator == "cpu" and cpu_has_bf16()):
        return "bf16-mixed"
    return "32-true"


def hardware_record(accelerator: str, precision: str, setting: str, processes: int = 1) -> dict:
    """What a training run ran on, for its bundle's provenance: device, processes, the precision it trained in
    (and the recipe's setting, e.g. 'auto'), and the CPU's vector capability and native-bf16 support. bf16 and
    fp32 training give different models from the same recipe and seed, so a result is traced to its machine class."""
    record = {"device": accelerator, "processes": int(processes), "precision": precision, "precision_setting": setting,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_native_bf16": cpu_has_bf16()}
    if accelerator in ("cuda", "gpu") and torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name()
    return record


def dataloader_workers(processes: int = 1) -> int:
    """DataLoader workers per process: the machine's cores shared by its processes, one core each kept for
    the process itself, at most 8 (decoding beyond that rarely pays)."""
    return max(0, min(8, (os.cpu_count() or 1) // max(1, processes) - 1))
