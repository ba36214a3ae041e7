"""benchmarks/gpu_check.sh: the no-CUDA message, the interval comparison, a hung step killed on its timeout while the
check goes on, and (slow) the whole check end to end on the CPU (--dry-run-cpu)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def check(*args, env=None, timeout=1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_without_cuda_it_says_so_and_what_it_would_have_done_and_exits_0(tmp_path):
    before = set((ROOT / "benchmarks" / "results").glob("gpu_check_*.json"))
    r = check("--work", str(tmp_path / "work"), env={"CUDA_VISIBLE_DEVICES": "", "SKINSCREEN_GPU_CHECK_DRY_RUN": ""},
              timeout=120)
    assert r.returncode == 0, r.stderr
    assert "No CUDA device" in r.stdout and "Nothing was run" in r.stdout
    for step in ("pytest -m cuda", "shared_demo.yaml", "DDP", "launcher", "predict_latency.py", "throughput.py"):
        assert step in r.stdout
    assert set((ROOT / "benchmarks" / "results").glob("gpu_check_*.json")) == before
    assert not (tmp_path / "work").exists()


def test_the_gpu_metrics_are_checked_against_the_cpu_runs_intervals():
    reference = {"splits": {"val": {"metrics": {"roc_auc": {"value": 0.93, "ci95": [0.87, 0.97]},
                                                "recall": {"value": 0.93, "ci95": [0.83, 1.0]}}},
                            "test": {"metrics": {"roc_auc": {"value": 0.91, "ci95": [0.82, 0.97]}}}}}
    reports = {"val": {"metrics": {"roc_auc": {"value": 0.95}, "recall": {"value": 0.70}, "f1": {"value": 0.8}}},
               "test": {"metrics": {"roc_auc": {"value": 0.80}}}}
    rows = {(r["split"], r["metric"]): r for r in gpu_check.compare(reports, reference)}
    assert set(rows) == {("val", "roc_auc"), ("val", "recall"), ("test", "roc_auc")}  # f1 has no reference
    assert rows["val", "roc_auc"]["inside"] and rows["val", "roc_auc"]["enforced"]
    assert not rows["test", "roc_auc"]["inside"] and rows["test", "roc_auc"]["enforced"]
    assert not rows["val", "recall"]["inside"] and not rows["val", "recall"]["enforced"]  # reported only


def test_the_committed_reference_is_the_shared_demo_cpu_run():
    ref = json.loads(gpu_check.REFERENCE.read_text())
    assert set(ref["splits"]) == {"val", "test"}
    for split, n in (("val", 74), ("test", 74)):
        auc = ref["splits"][split]["metrics"]["roc_auc"]
        assert ref["splits"][split]["n"] == n and auc["ci95"][0] <= auc["value"] <= auc["ci95"][1]


def test_steps_keep_a_pythonpath_already_set_behind_the_repository(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/tmp/site", str(ROOT)]))
    env = gpu_check.child_env(X="1")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/tmp/site"] and env["X"] == "1"
    monkeypatch.delenv("PYTHONPATH")
    assert gpu_check.child_env()["PYTHONPATH"] == str(ROOT)


def test_only_the_modules_holding_cuda_tests_are_collected(tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "test_page.py").write_text("import streamlit\n", encoding="utf-8")
    (tmp_path / "test_gpu.py").write_text("pytestmark = pytest.mark.cuda\n", encoding="utf-8")
    (tmp_path / "test_one.py").write_text("@pytest.mark.cuda\ndef test_x(): pass\n", encoding="utf-8")
    (tmp_path / "test_mentions.py").write_text('text = "pytestmark = [pytest.mark.cuda]"\n', encoding="utf-8")
    assert gpu_check.cuda_test_files(tmp_path) == [str(tmp_path / "test_gpu.py"), str(tmp_path / "test_one.py")]
    files = gpu_check.cuda_test_files()
    assert str(ROOT / "tests" / "core" / "test_cuda.py") in files
    assert not any("app" in Path(f).relative_to(ROOT).parts for f in files)
    assert str(ROOT / "tests" / "benchmarks" / "test_gpu_check.py") not in files  # it only mentions the marker


def test_results_stay_partial_until_the_last_step(tmp_path):
    out = {"machine": {}, "steps": {"cuda_tests": {"status": "pass"}}}
    path = tmp_path / "gpu_check_x.json"
    path.write_text('{"complete": true}')  # a complete earlier run
    gpu_check.write_results(out, path, 0.0, final=False)
    assert json.loads(path.read_text()) == {"complete": True}  # untouched while steps remain
    assert json.loads(gpu_check.partial_path(path).read_text())["complete"] is False
    gpu_check.write_results(out, path, 0.0, final=True)
    assert json.loads(path.read_text())["complete"] is True and not gpu_check.partial_path(path).exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_step_past_its_timeout_is_killed_recorded_and_the_check_goes_on(tmp_path):
    out = tmp_path / "result.json"
    r = check("--dry-run-cpu", "--steps", "latency", "throughput", "--timeout", "latency=1", "--work",
              str(tmp_path / "work"), "--json", str(out), timeout=280)
    assert r.returncode == 1, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["steps"]["latency"]["status"] == "timeout" and res["failed"] == ["latency"]
    assert res["steps"]["throughput"]["status"] == "pass"  # the next step still ran
    assert "latency" in r.stdout and "timeout" in r.stdout
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers  # the step's whole process group was killed


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_dry_run_runs_every_step_on_the_cpu_end_to_end(tmp_path):
    out = tmp_path / "result.json"
    r = check("--dry-run-cpu", "--work", str(tmp_path / "work"), "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["mode"] == "dry-run-cpu" and res["failed"] == [] and "isa" in res["machine"]
    steps = res["steps"]
    assert list(steps) == list(gpu_check.STEPS)
    shared = res["shared"] is not None
    for name, step in steps.items():
        expected = {"pass"} if shared or name not in ("demo", "latency") else {"skipped"}
        assert step["status"] in expected, (name, step)
    assert steps["cuda_tests"]["counts"]["tests"] > steps["cuda_tests"]["counts"]["skipped"]  # they ran, on the CPU
    assert all(c["ok"] for c in steps["launcher"]["checks"]) and len(steps["launcher"]["checks"]) == 7
    assert steps["ddp"]["devices"] == 2
    if shared:
        aucs = {(row["split"], row["metric"]) for row in steps["demo"]["comparison"]}
        assert {("val", "roc_auc"), ("test", "roc_auc")} <= aucs
    for name in gpu_check.STEPS:
        assert f"{name:11} pass" in r.stdout or f"{name:11} skipped" in r.stdout  # the summary table
