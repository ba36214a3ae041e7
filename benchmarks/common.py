"""Shared pieces of the benchmarks: machine description, thread policy, synthetic photos, random-weight models."""
from __future__ import annotations

import io
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

from core.backbones import get_spec  # noqa: E402
from core.bundle import Bundle, BundleMeta, Provenance, Threshold  # noqa: E402
from core.device import cpu_has_bf16  # noqa: E402
from core.model import HeadConfig, LesionClassifier  # noqa: E402

SHARED = Path(os.environ.get("SKINSCREEN_SHARED") or ROOT.parent / "shared")  # gpu_check.py passes where it found it
REAL_PHOTOS = {"isic2017": SHARED / "data" / "isic2017_dermoscopic_subset" / "images",
               "pad_ufes_20": SHARED / "data" / "pad_ufes_20_subset" / "images"}
TFLITE_WEIGHTS = SHARED / "weights" / "mobilenetv2_100_tflite_imagenet.safetensors"
DEFAULT_BACKBONES = ("convnext_tiny", "resnet50", "resnet18", "efficientnet_b0", "mobilenetv2_100")
CPUINFO = Path("/proc/cpuinfo")  # Linux only: elsewhere the model name and instruction sets come from other places


def cpu_model() -> str:
    try:
        text = CPUINFO.read_text(encoding="utf-8")
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_tag() -> str:
    """A short file-name tag for the machine, e.g. 'xeon-2c'."""
    name = cpu_model().lower()
    for key in ("epyc", "xeon", "core", "ryzen", "apple", "graviton", "neoverse"):
        if key in name:
            break
    else:
        key = re.sub(r"[^a-z0-9]+", "-", name)[:16].strip("-") or "cpu"
    return f"{key}-{usable_cores()}c"


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity where the OS has one (Linux, Windows), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    try:
        return len(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error):  # macOS: no affinity
        return os.cpu_count() or 1


def load_avg() -> float:
    """The 1-minute load average (psutil emulates it on Windows, where its first reading is 0)."""
    return float(psutil.getloadavg()[0])


def set_threads(threads: int) -> int:
    """0 = auto: the cores not already busy (1-minute load average), at least 1.

    On a shared machine an OpenMP team larger than the idle cores spins at every barrier while its other
    threads wait to be scheduled; on this 2-core box that made forward passes 5-10x slower and the spread
    between repeats larger than the effects being measured."""
    cores = usable_cores()
    if threads <= 0:
        threads = max(1, min(cores, cores - int(round(load_avg()))))
    torch.set_num_threads(threads)
    return threads


NOTE_ENV = "SKINSCREEN_BENCH_NOTE"  # e.g. "machine otherwise idle": kept in every result's machine.note


def machine_info() -> dict:
    import PIL
    import timm
    info = {"cpu": cpu_model(), "cores": usable_cores(), "torch": torch.__version__,
            "timm": timm.__version__, "pillow": PIL.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "cpu_bf16": cpu_has_bf16(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg_1min_at_start": round(load_avg(), 2),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # what the run's machine was doing, said by whoever ran it; the load averages measure it either way
            "note": os.environ.get(NOTE_ENV) or "numbers are medians; see the load averages at start and end"}
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    try:
        flags = re.search(r"^flags\s*:\s*(.+)$", CPUINFO.read_text(encoding="utf-8"), re.M).group(1).split()
        info["isa"] = [f for f in ("avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                                   "amx_tile") if f in flags]
    except (OSError, AttributeError):
        flags = None
    # instruction-set caps make a machine behave like a smaller class in some libraries only (same cores, caches
    # and clock): such a run is labelled capped, never filed as the smaller class
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["isa_class"] = isa_class(flags, info["cpu_capability"])
    info["isa_source"] = str(CPUINFO) if flags is not None else "torch.backends.cpu.get_cpu_capability (AMX not told " \
                                                                 "apart from AVX512-BF16)"
    info["isa_caps"] = {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k)}
    if info["isa_caps"]:
        info["isa_class"] += "-capped"
    return info


ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def isa_class(flags: list[str] | None, capability: str | None = None) -> str:
    """The machine class results are comparable within: 'amx-bf16', 'avx512-bf16', 'avx512', 'avx2', 'arm' or
    'unknown'. From /proc/cpuinfo's flags on Linux; elsewhere (macOS, Windows) from torch's vector capability
    ('AVX2', 'AVX512') and native bf16, which cannot tell AMX from AVX512-BF16."""
    if flags is None:
        if platform.machine().lower() in ("arm64", "aarch64"):
            return "arm"
        if capability == "AVX512":
            return "avx512-bf16" if cpu_has_bf16() else "avx512"
        return "avx2" if capability == "AVX2" else "unknown"
    for cls, need in (("amx-bf16", "amx_bf16"), ("avx512-bf16", "avx512_bf16"), ("avx512", "avx512f"),
                      ("avx2", "avx2")):
        if need in flags:
            return cls
    return "arm" if "asimd" in flags else "older-x86"


def phone_jpeg(size=(4000, 3000), quality: int = 92, seed: int = 0) -> bytes:
    """A synthetic 12-megapixel phone photo: smooth colour regions plus sensor-like grain (~5 MB JPEG).

    Texture matters: JPEG decode time grows with the entropy-coded size, and a flat image decodes far faster
    than a real photo."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    w, h = size
    low = Image.fromarray(rng.integers(40, 230, (h // 50, w // 50, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    a = np.asarray(low, dtype=np.float32) + rng.normal(0, 8, (h, w, 1)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def real_photos(per_set: int) -> list[Path]:
    out = []
    for folder in REAL_PHOTOS.values():
        if folder.is_dir():
            out += sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:per_set]
    return out


def random_model(name: str, seed: int = 0) -> LesionClassifier:
    """A random-weight classifier (speed does not depend on the weights); 'mobilenetv2_100_tflite' gets the real
    ImageNet backbone from shared/weights when the file is there."""
    torch.manual_seed(seed)
    spec = get_spec(name)
    weights = str(TFLITE_WEIGHTS) if name == "mobilenetv2_100_tflite" and TFLITE_WEIGHTS.is_file() else "none"
    return LesionClassifier(spec, HeadConfig(), weights=weights).eval()


def make_bundle(model: LesionClassifier, threshold: float = 0.5) -> Bundle:
    meta = BundleMeta(backbone=model.spec.to_dict(), threshold=Threshold(value=threshold),
                      provenance=Provenance(run_name="benchmark (random weights)"), intended_use="benchmark")
    return Bundle(model=model, meta=meta)


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 2)


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")


def finish(out: dict, json_path: str | None) -> int:
    """Record the load at the end (the machine may be shared) and write the JSON if asked."""
    out["machine"]["load_avg_1min_at_end"] = round(load_avg(), 2)
    if json_path:
        write_json(json_path, out)
        print(f"wrote {json_path}")
    return 0
