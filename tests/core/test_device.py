"""Tests for core.device: 'auto' takes CUDA, then Apple MPS, then the CPU; explicit devices that are absent fail
clearly; reduced precision is only a candidate (and fp32 training) on MPS."""
from __future__ import annotations

import pytest
import torch

from core import device


def _simulate(monkeypatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, "cuda"),    # CUDA wins over MPS
    (True, False, "cuda"),
    (False, True, "mps"),    # a Mac with Apple silicon
    (False, False, "cpu"),
])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    _simulate(monkeypatch, cuda, mps)
    assert device.pick_device("auto").type == expected
    assert device.pick_device().type == expected


def test_explicit_devices(monkeypatch):
    _simulate(monkeypatch, cuda=False, mps=False)
    assert device.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="'cuda' was asked for but no CUDA GPU"):
        device.pick_device("cuda")
    with pytest.raises(RuntimeError, match="'cuda' was asked for"):
        device.pick_device("cuda:1")
    with pytest.raises(RuntimeError, match="'mps' was asked for but Apple MPS is not available"):
        device.pick_device("mps")
    _simulate(monkeypatch, cuda=False, mps=True)
    assert device.pick_device("mps") == torch.device("mps")


def test_fast_dtype_is_a_candidate_per_backend(monkeypatch):
    monkeypatch.delenv("SKINSCREEN_FP32", raising=False)
    assert device.fast_dtype(torch.device("mps")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device.fast_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert device.fast_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert device.fast_dtype(torch.device("cpu")) is None
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    assert device.fast_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv("SKINSCREEN_FP32", "1")
    assert device.fast_dtype(torch.device("mps")) is None and device.fast_dtype(torch.device("cuda")) is None


def test_fabric_precision(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    assert device.fabric_precision("auto", "cuda") == "bf16-mixed"
    assert device.fabric_precision("auto", "mps") == "32-true"  # mixed precision on MPS is unmeasured
    assert device.fabric_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert device.fabric_precision("auto", "cpu") == "32-true"
    assert device.fabric_precision("16-mixed", "mps") == "16-mixed"  # an explicit choice is kept


def test_predictor_keeps_fp32_when_the_candidate_cannot_run(monkeypatch, tmp_path):
    """The load-time check decides; a backend whose autocast rejects the candidate dtype falls back to fp32."""
    import contextlib
    from dataclasses import replace

    from core import inference
    from core.backbones import get_spec
    from core.bundle import load_bundle, save_bundle
    from core.model import HeadConfig, LesionClassifier
    spec = get_spec("mobilenetv2_100")
    spec = replace(spec, preprocessing=replace(spec.preprocessing, input_size=64))
    folder = save_bundle(LesionClassifier(spec, HeadConfig(), weights="none").eval(), tmp_path / "b",
                         threshold={"value": 0.5, "rule": "fixed"}, provenance={"run_name": "t"})

    def strict_autocast(dev, dtype):
        if dtype is not None:
            raise RuntimeError(f"autocast on {dev.type} does not support {dtype}")
        return contextlib.nullcontext()
    monkeypatch.setattr(inference, "fast_dtype", lambda dev: torch.float16)
    monkeypatch.setattr(inference, "autocast", strict_autocast)
    p = inference.Predictor(load_bundle(folder), device="cpu")
    assert p.dtype is None and p.precision["dtype"] == "float32"
    assert "float16 not usable on cpu" in p.precision["reason"]
    from PIL import Image
    assert 0.0 <= p.predict_image(Image.new("RGB", (80, 80), (150, 100, 90))).prob <= 1.0  # and it predicts


def test_fp32_on_cuda_turns_tf32_off_inside_and_restores_the_settings_after():
    read, write, ieee = device._fp32_settings()  # settable without a GPU
    before = read()
    tf32 = ("tf32", "tf32") if ieee == ("ieee", "ieee") else (True, True)
    write(tf32)
    try:
        with device.autocast(torch.device("cuda"), None):
            assert read() == ieee
        assert read() == tf32
        with pytest.raises(ValueError), device.ieee_fp32(torch.device("cuda")):
            raise ValueError  # restored on an error too
        assert read() == tf32
        with device.autocast(torch.device("cpu"), None):
            assert read() == tf32  # not a CUDA device: untouched
    finally:
        write(before)


def test_overlapping_fp32_contexts_in_two_threads_keep_tf32_off_until_the_last_one_closes():
    import threading
    read, write, ieee = device._fp32_settings()
    before = read()
    mixed = ("tf32", "ieee") if ieee == ("ieee", "ieee") else (True, False)
    write(mixed)
    entered, release, seen = threading.Event(), threading.Event(), []

    def other_thread():
        with device.ieee_fp32(torch.device("cuda")):
            entered.set()
            release.wait(10)
            seen.append(read())  # after the first thread's context closed

    try:
        with device.ieee_fp32(torch.device("cuda")):
            t = threading.Thread(target=other_thread)
            t.start()
            assert entered.wait(10)
        assert read() == ieee  # the other thread is still inside: TF32 stays off
        release.set()
        t.join(10)
        assert seen == [ieee] and read() == mixed  # the last one out restores what the first found
    finally:
        release.set()
        write(before)
