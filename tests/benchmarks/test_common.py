"""benchmarks/common.py off Linux: no /proc/cpuinfo, no sched_getaffinity (macOS, Windows), no os.getloadavg
(Windows). The machine record still names the class from torch, counts the cores and reads a load."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402


@pytest.fixture
def not_linux(monkeypatch, tmp_path):
    """What a Windows laptop lacks: /proc/cpuinfo, os.sched_getaffinity and os.getloadavg."""
    monkeypatch.setattr(common, "CPUINFO", tmp_path / "no_cpuinfo")
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.delattr(os, "getloadavg", raising=False)
    monkeypatch.setattr(common.platform, "machine", lambda: "AMD64")
    for key in common.ISA_CAPS:
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize("capability, bf16, expected", [("AVX2", False, "avx2"), ("AVX512", False, "avx512"),
                                                         ("AVX512", True, "avx512-bf16"), ("DEFAULT", False, "unknown")])
def test_without_cpu_flags_the_class_comes_from_torchs_capability_and_native_bf16(not_linux, monkeypatch,
                                                                                 capability, bf16, expected):
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: bf16)
    assert common.isa_class(None, capability) == expected


def test_the_machine_record_works_without_linux_interfaces(not_linux, monkeypatch):
    monkeypatch.setattr(common.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    info = common.machine_info()
    assert info["isa_class"] == "avx2" and info["isa_source"].startswith("torch.backends.cpu.get_cpu_capability")
    assert "isa" not in info and info["cores"] == common.usable_cores() >= 1
    assert isinstance(info["load_avg_1min_at_start"], float)
    assert common.cpu_tag().endswith(f"-{info['cores']}c")
    out = {"machine": info}
    assert common.finish(out, None) == 0 and isinstance(out["machine"]["load_avg_1min_at_end"], float)
    import report
    assert "(class avx2: no CPU flags; torch capability AVX2)" in report.machine_line(out["machine"])


def test_on_linux_the_class_comes_from_the_cpu_flags(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n")
    monkeypatch.setattr(common, "CPUINFO", cpuinfo)
    for key in common.ISA_CAPS:
        monkeypatch.delenv(key, raising=False)
    info = common.machine_info()
    assert (info["isa_class"], info["isa"], info["isa_source"]) == ("avx2", ["avx2", "fma"], str(cpuinfo))
    assert common.cpu_model() == "AMD EPYC 7B13" and common.cpu_tag().startswith("epyc-")


def test_the_machine_note_says_what_the_runner_says_and_claims_nothing_by_default(monkeypatch):
    monkeypatch.delenv(common.NOTE_ENV, raising=False)
    default = common.machine_info()["note"]
    assert "medians" in default and "other engineers" not in default  # no claim about a machine nobody described
    monkeypatch.setenv(common.NOTE_ENV, "machine otherwise idle")
    assert common.machine_info()["note"] == "machine otherwise idle"
