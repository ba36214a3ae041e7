"""benchmarks/throughput.py: bf16 is measured only where training would use it; emulated bf16 is skipped and said so."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import report  # noqa: E402
import throughput  # noqa: E402


@pytest.fixture
def matmuls(monkeypatch):
    """The dtypes throughput.py asked a matmul rate for (the rates themselves are made up: speed is not tested)."""
    asked = []

    def fake(dtype, n=2048, iters=5, device="cpu"):
        asked.append(dtype)
        return 100.0
    monkeypatch.setattr(throughput, "matmul_gflops", fake)
    return asked


@pytest.mark.parametrize("native", [False, True])
def test_bf16_is_measured_only_where_training_would_use_it(native, matmuls, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(throughput, "fabric_precision", lambda pref, acc: "bf16-mixed" if native else "32-true")
    out = tmp_path / "throughput.json"
    assert throughput.main(["--backbones", "mobilenetv2_100", "--batch-size", "2", "--iters", "1", "--threads", "1",
                            "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    training = d["mobilenetv2_100"]["training"]
    assert set(training) == {f"{s}_{p}" for s in ("frozen_backbone", "unfrozen") for p in ("fp32", "bf16_autocast")}
    assert training["unfrozen_fp32"]["images_per_s"] > 0
    if native:
        assert matmuls == [torch.float32, torch.bfloat16] and d["bf16"] == "measured"
        assert training["unfrozen_bf16_autocast"]["images_per_s"] > 0
    else:  # an AVX2 laptop: emulated bf16 is ~100x slower and no run uses it
        assert matmuls == [torch.float32] and d["matmul_gflops"]["bf16"] is None
        assert d["bf16"].startswith("not measured: no native bf16")
        assert training["unfrozen_bf16_autocast"]["images_per_s"] is None
        assert "n/a" in capsys.readouterr().out
    table = report.throughput(d)  # the README table renders either way
    assert ("| n/a |" in table) != native and "mobilenetv2_100" in table


def test_a_run_under_instruction_set_caps_is_labelled_capped_never_the_smaller_class(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    plain = common.machine_info()
    assert plain["isa_caps"] == {} and not plain["isa_class"].endswith("-capped")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = common.machine_info()
    assert capped["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert capped["isa_class"] == plain["isa_class"] + "-capped"
    assert "(ONEDNN_MAX_CPU_ISA=AVX2)" in report.machine_line({**capped, "load_avg_1min_at_end": 0.0})
