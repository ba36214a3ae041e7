"""The GPU check: CUDA tests, the shared demo in bf16 against the CPU run, DDP, the Train page's launcher, latency, throughput.

    benchmarks/gpu_check.sh                  # a CUDA machine: every step, under 10 minutes on one H200
    benchmarks/gpu_check.sh --dry-run-cpu    # the same steps on the CPU with tiny settings (tests this script)
    python benchmarks/gpu_check.py --make-reference runs/shared_demo   # refresh the CPU reference (below)

Without CUDA (and without --dry-run-cpu, or SKINSCREEN_GPU_CHECK_DRY_RUN=1) it says so, lists what it would have
done, and exits 0. Steps, in order (each in its own process group with its own timeout, inside a total budget; a
failed or hung step is recorded and the next one runs):

1. cuda_tests: `pytest -m cuda` (tests/core/test_cuda.py: Predictor on the GPU against CPU fp32, its precision
   choice, a tiny run trained on the GPU, the launcher resolving device 'auto' to cuda);
2. demo: train/configs/shared_demo.yaml with `--device cuda --precision bf16-mixed`; its validation and test ROC-AUC
   must lie inside the 95% intervals of the CPU run in results/shared_demo_cpu_reference.json;
3. ddp: train.fit with --devices = every visible GPU (one GPU: said so, devices=1);
4. launcher: core.jobs (the Train page's launcher) starts a run with device 'auto', sees it running, requests a stop,
   sees it stopped and resumable, resumes it, sees it train on, stops it again;
5. latency: benchmarks/predict_latency.py --device cuda (single photo, naive vs fast path, accuracy vs fp32);
6. throughput: benchmarks/throughput.py --device cuda (screening and training images/s, matmul floor).

Results: results/gpu_check_<gpu-name>.json (machine, GPU, every step's status, seconds, numbers and log tail) and a
summary table. Exit status 1 when any step failed, timed out or could not run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_check.py` from anywhere
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
REFERENCE = RESULTS / "shared_demo_cpu_reference.json"
DEMO_RECIPE = "train/configs/shared_demo.yaml"
DEMO_WEIGHTS = "weights/mobilenetv2_100_tflite_imagenet.safetensors"  # under the shared folder
ENFORCED = ("roc_auc",)  # metrics whose GPU value must lie in the CPU run's interval; the others are reported
STEPS = ("cuda_tests", "demo", "ddp", "launcher", "latency", "throughput")
BUDGET_S = {"cuda": 570, "dry-run-cpu": 1500}  # the GPU check must fit in 10 minutes; the dry run is on 2 cores
FAILED = ("fail", "error", "timeout", "not run")


# ------------------------------------------------------------------------------------------- plan
def plan_for(device: str, dry: bool, shared: Path | None, work: Path) -> dict:
    """What each step runs: full settings on a GPU, tiny ones in the CPU dry run."""
    import torch
    n_gpus = torch.cuda.device_count() if device == "cuda" else 0
    demo_extra = ["--epochs", "1", "--set", "input_size=64", "--set", "n_boot=20"] if dry else []
    return {
        "device": device, "dry_run": dry, "work": str(work), "shared": str(shared) if shared else None,
        "python": sys.executable,
        "timeouts": ({"cuda_tests": 240, "demo": 240, "ddp": 180, "launcher": 180, "latency": 180, "throughput": 180}
                     if dry else
                     {"cuda_tests": 200, "demo": 240, "ddp": 150, "launcher": 120, "latency": 120, "throughput": 150}),
        "cuda_tests": {"pytest_args": ["-m", "cuda and not slow", "-k", "not convnext"] if dry else ["-m", "cuda"]},
        "demo": {"extra": demo_extra, "precision": "bf16-mixed" if not dry else "auto", "enforce": not dry},
        "ddp": {"devices": 2 if dry else max(1, n_gpus), "real_data": not dry and shared is not None,
                "note": None if dry or n_gpus > 1 else "one GPU visible: DDP ran with devices=1 (a single process; "
                                                          "no collective between GPUs was exercised)"},
        "launcher": {"expected_device": device},
        "latency": {"args": (["--backbones", "mobilenetv2_100", "--repeats", "1", "--warmup", "1", "--photos", "1"]
                             if dry else ["--backbones", "convnext_tiny", "mobilenetv2_100_tflite", "--repeats", "10",
                                          "--photos", "6"])},
        "throughput": {"args": (["--backbones", "mobilenetv2_100", "--batch-size", "2", "--iters", "1"] if dry else
                                ["--backbones", "convnext_tiny", "resnet18", "mobilenetv2_100", "--batch-size", "64",
                                 "--iters", "5"])},
    }


def what_it_would_do() -> str:
    return ("On a CUDA machine this check would: (1) run the CUDA tests (pytest -m cuda); (2) train the shared demo "
            "(train/configs/shared_demo.yaml) on the GPU in bf16 and check its validation and test ROC-AUC against the "
            f"CPU run's 95% intervals ({REFERENCE.relative_to(ROOT)}); (3) run DDP on every visible GPU; (4) start, "
            "stop and resume a run through the Train page's launcher (core.jobs); (5) measure single-photo latency "
            "(benchmarks/predict_latency.py --device cuda) and (6) screening and training throughput "
            "(benchmarks/throughput.py --device cuda); and write benchmarks/results/gpu_check_<gpu-name>.json. "
            "Use --dry-run-cpu to run the same steps on this CPU with tiny settings.")


def find_shared(explicit: str | None) -> Path | None:
    """The shared data folder: --shared, $SKINSCREEN_SHARED, ../shared or ./shared (the first that has data/)."""
    for c in (explicit, os.environ.get("SKINSCREEN_SHARED"), ROOT.parent / "shared", ROOT / "shared"):
        if c and (Path(c) / "data" / "pad_ufes_20_subset").is_dir():
            return Path(c).resolve()
    return None


# ------------------------------------------------------------------------------------------- helpers for steps
def child_env(**extra: str) -> dict:
    """This environment with the repository first on PYTHONPATH; a path already there stays (a GPU machine may hold
    carried packages on it)."""
    paths = [str(ROOT), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


def cuda_test_files(tests: Path = ROOT / "tests") -> list[str]:
    """The test modules that hold tests marked cuda: only those are collected, so a GPU machine needs the core's
    packages alone (the app's tests import Streamlit, which such a machine may lack)."""
    marked = re.compile(r"^\s*(pytestmark\s*=.*pytest\.mark\.cuda|@pytest\.mark\.cuda)", re.M)
    return sorted(str(f) for f in tests.rglob("test_*.py") if marked.search(f.read_text(encoding="utf-8")))


def run_cmd(cmd: list[str], env: dict | None = None) -> int:
    """A command whose output goes to this step's log (stdout); the parent enforces the step's timeout."""
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=child_env(**(env or {})))


def synthetic_data(folder: Path, n: int = 48, size: int = 96) -> Path:
    """n small lesion-like photos (malignant: a larger, darker blob), two per patient, and their labels.csv."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["image,label,patient_id"]
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        label = i % 2
        img = np.full((size, size, 3), 200.0) + rng.normal(0, 12, (size, size, 3))
        blob = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < ((0.35 if label else 0.18) * size) ** 2
        img[blob] = (90, 50, 40) if label else (160, 120, 100)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")
        rows.append(f"img{i:03d}.png,{label},P{i // 2:03d}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder / "labels.csv"


def tiny_recipe(path: Path, labels: Path, epochs: int, device: str | None) -> Path:
    import yaml
    data = [{"csv": str(labels), "images": str(labels.parent), "domain": "synthetic"}]
    recipe = {"name": path.stem, "backbone": "mobilenetv2_100", "weights": "none", "input_size": 64, "n_boot": 20,
              "num_workers": 0, "split": {"val": 0.25, "test": 0.0, "seed": 0},
              "stages": [{"name": "only", "data": data, "epochs": epochs, "lr": 1e-3, "batch_size": 8}]}
    if device:
        recipe["device"] = device
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def demo_args(plan: dict) -> list[str]:
    shared = Path(plan["shared"])
    return ["--config", DEMO_RECIPE, "--data-root", str(shared / "data"), "--weights", str(shared / DEMO_WEIGHTS)]


def compare(reports: dict, reference: dict, enforced=ENFORCED) -> list[dict]:
    """Each metric of each split against the CPU run's 95% interval; `enforced` ones decide the check."""
    rows = []
    for split, report in reports.items():
        ref = reference["splits"].get(split, {}).get("metrics", {})
        for metric, est in report["metrics"].items():
            if metric not in ref or est.get("value") is None:
                continue
            lo, hi = ref[metric]["ci95"]
            value = float(est["value"])
            rows.append({"split": split, "metric": metric, "value": round(value, 4),
                         "cpu_value": round(ref[metric]["value"], 4), "cpu_ci95": [round(lo, 4), round(hi, 4)],
                         "inside": bool(lo <= value <= hi), "enforced": metric in enforced})
    return rows


def run_summary(run: Path) -> dict:
    """Wall and per-epoch seconds, status and the split counts of a finished run folder."""
    from core import runfolder
    m = runfolder.read_metrics(run)
    status = runfolder.read_status(run)
    out = {"state": status.get("state"), "epochs": int(len(m))}
    if len(m):
        out["epoch_seconds"] = [float(s) for s in m["seconds"]]
    meta = run / "bundle" / "model.json"
    if meta.is_file():
        prov = json.loads(meta.read_text(encoding="utf-8"))["provenance"]
        out["train_seconds"] = prov.get("train_seconds")
        out["split_counts"] = prov.get("split_counts")
    return out


def result(status: str, summary: str, **details) -> dict:
    return {"status": status, "summary": summary, **details}


# ------------------------------------------------------------------------------------------- steps
def step_cuda_tests(plan: dict) -> dict:
    xml = Path(plan["work"]) / "cuda_tests.xml"
    env = {"SKINSCREEN_CUDA_TESTS_ON_CPU": "1"} if plan["dry_run"] else {}
    files = cuda_test_files()
    if not files:  # pytest given no file would collect every test, the app's too
        return result("fail", "no test module marked cuda was found under tests/")
    rc = run_cmd([plan["python"], "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                  *plan["cuda_tests"]["pytest_args"], *files], env)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.is_file():
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
    ran = counts["tests"] - counts["skipped"]
    passed = ran - counts["failures"] - counts["errors"]
    summary = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    if rc == 0 and ran > 0:
        return result("pass", summary, counts=counts, rc=rc)
    why = "" if ran else " (none ran: no test marked cuda found, or all skipped)"
    return result("fail", summary + why, counts=counts, rc=rc)


def step_demo(plan: dict) -> dict:
    if not plan["shared"]:
        status = "skipped" if plan["dry_run"] else "fail"
        return result(status, "shared data not found (--shared DIR, $SKINSCREEN_SHARED, ../shared or ./shared): "
                              "the demo could not be trained")
    out = Path(plan["work"]) / "runs" / f"shared_demo_{plan['device']}"
    t0 = time.time()
    rc = run_cmd([plan["python"], "-m", "train.fit", *demo_args(plan), "--out", str(out), "--device", plan["device"],
                  "--precision", plan["demo"]["precision"], *plan["demo"]["extra"]])
    wall = round(time.time() - t0, 1)
    if rc != 0:
        return result("fail", f"train.fit exited {rc}", wall_s=wall, run=str(out))
    reports = {split: json.loads((out / f"{split}_report.json").read_text(encoding="utf-8"))
               for split in ("val", "test")}
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    rows = compare(reports, reference)
    enforced = [r for r in rows if r["enforced"]]
    misses = [f"{r['split']} {r['metric']} {r['value']:.3f} outside [{r['cpu_ci95'][0]:.3f}, {r['cpu_ci95'][1]:.3f}]"
              for r in enforced if not r["inside"]]
    auc = ", ".join(f"{r['split']} ROC-AUC {r['value']:.3f} (CPU {r['cpu_value']:.3f} [{r['cpu_ci95'][0]:.2f}, "
                    f"{r['cpu_ci95'][1]:.2f}])" for r in enforced)
    details = {"wall_s": wall, "run": str(out), "comparison": rows, "reference": str(REFERENCE.relative_to(ROOT)),
               **run_summary(out)}
    # the intervals only mean something for the same patients: say whether the split matched the CPU run's
    details["same_split_counts_as_reference"] = details.get("split_counts") == reference.get("split_counts")
    if not plan["demo"]["enforce"]:
        return result("pass", f"dry run (tiny settings, interval check reported, not enforced): {auc}", **details)
    return result("fail" if misses else "pass", ("; ".join(misses) + "; " if misses else "") + auc + f"; {wall:.0f} s",
                  **details)


def step_ddp(plan: dict) -> dict:
    work, cfg = Path(plan["work"]), plan["ddp"]
    out = work / "runs" / f"ddp_{cfg['devices']}"
    if cfg["real_data"]:
        args = [*demo_args(plan), "--epochs", "1", "--set", "n_boot=50"]
    else:
        args = ["--config", str(tiny_recipe(work / "ddp.yaml", synthetic_data(work / "ddp_data"), 1, None))]
    env = {"OMP_NUM_THREADS": "1"} if plan["device"] == "cpu" else {}
    t0 = time.time()
    rc = run_cmd([plan["python"], "-m", "train.fit", *args, "--out", str(out), "--device", plan["device"],
                  "--devices", str(cfg["devices"])], env)
    wall = round(time.time() - t0, 1)
    note = f" ({cfg['note']})" if cfg["note"] else ""
    if rc != 0:
        return result("fail", f"train.fit --devices {cfg['devices']} exited {rc}{note}", wall_s=wall, note=cfg["note"])
    from core import runfolder
    from core.manifest import read_manifest
    report = json.loads((out / "val_report.json").read_text(encoding="utf-8"))
    splits = sorted((out / "splits").glob("*.csv"))
    n_val = int((read_manifest(splits[-1])["split"] == "val").sum())
    probs = [r["prob"] for r in report["predictions"]]
    ok = report["n"] == n_val and len(probs) == n_val and all(p is not None and 0 <= p <= 1 for p in probs)
    summary = (f"devices={cfg['devices']}: {'finished' if ok else 'validation predictions incomplete'}, "
               f"{len(probs)}/{n_val} validation photos, ROC-AUC {report['metrics']['roc_auc']['value']}, "
               f"{wall:.0f} s{note}")
    return result("pass" if ok else "fail", summary, wall_s=wall, devices=cfg["devices"], note=cfg["note"],
                  **run_summary(out), log_tail=runfolder.log_tail(out, lines=5))


def step_launcher(plan: dict) -> dict:
    from core import jobs, runfolder
    work = Path(plan["work"])
    recipe = tiny_recipe(work / "launcher.yaml", synthetic_data(work / "launcher_data"), 500, None)  # device: auto
    root = work / "launcher_runs"
    run = root / "launched"
    checks, times = [], {}

    def check(name: str, ok: bool, detail: str = "") -> bool:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail else ""), flush=True)
        return ok

    def wait(cond, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return True
            time.sleep(0.2)
        return False

    epochs = lambda: len(runfolder.read_metrics(run))  # noqa: E731
    rec = None
    try:
        t0 = time.time()
        rec = jobs.start_training(jobs.TrainRequest(recipe=str(recipe), name=run.name, device="auto"), root)
        check("device 'auto' resolved to the expected device", rec["device"] == plan["launcher"]["expected_device"],
              f"launch record: {rec['device']}")
        running = wait(lambda: jobs.run_info(run).state == "running" and epochs() >= 1, 90)
        times["start_to_first_epoch_s"] = round(time.time() - t0, 1)
        if check("started and running (one epoch done)", running, jobs.run_info(run).state):
            t1 = time.time()
            check("stop requested", "asked" in jobs.stop_training(run))
            stopped = jobs.wait_for(run, 60)
            info = jobs.run_info(run)
            times["stop_s"] = round(time.time() - t1, 1)
            check("stopped, resumable", stopped and info.state == "stopped" and info.resumable, info.state)
            done = epochs()
            if info.resumable:
                rec = jobs.resume_training(run, root)
                on = wait(lambda: epochs() > done and jobs.run_info(run).state == "running", 90)
                listed = runfolder.read_metrics(run)["epoch"].tolist()
                check("resumed and training on from its last epoch", on and listed == list(range(len(listed))),
                      f"epochs {listed}")
                jobs.stop_training(run)
                check("stopped again", jobs.wait_for(run, 60) and jobs.run_info(run).state == "stopped",
                      jobs.run_info(run).state)
        check("lock free afterwards", jobs.current_job(root) is None)
    finally:
        info = jobs.run_info(run) if run.exists() else None
        if info is not None and info.alive:
            jobs.stop_training(run, force=True)
    ok = all(c["ok"] for c in checks)
    summary = f"{sum(c['ok'] for c in checks)}/{len(checks)} checks" + (
        "" if ok else ": " + "; ".join(c["check"] for c in checks if not c["ok"]))
    return result("pass" if ok else "fail", summary, checks=checks, seconds=times,
                  log_tail=runfolder.log_tail(run, runfolder.CONSOLE, 15) if run.exists() else "")


def step_latency(plan: dict) -> dict:
    if not plan["shared"]:  # its accuracy columns are measured on real photos
        return result("skipped" if plan["dry_run"] else "fail", "shared data not found: no real photos for the "
                      "accuracy checks")
    out = Path(plan["work"]) / "latency.json"
    rc = run_cmd([plan["python"], "benchmarks/predict_latency.py", "--device", plan["device"], "--json", str(out),
                  *plan["latency"]["args"]])
    if rc != 0 or not out.is_file():
        return result("fail", f"predict_latency.py exited {rc}")
    data = json.loads(out.read_text(encoding="utf-8"))
    rows = {k: {"naive_ms": v["naive_ms"], "fast_ms": v["fast_ms"], "ratio": v["ratio"],
                "max_abs_prob_diff": v["max_abs_prob_diff"], "cam_corr_min": v["cam_corr_min"],
                "fast_dtype": v["fast_precision"]["dtype"], "fast_breakdown_ms": v["fast_breakdown_ms"]}
            for k, v in data.items() if k not in ("machine", "settings")}
    bad = [k for k, v in rows.items() if v["max_abs_prob_diff"] > 0.01]
    summary = "; ".join(f"{k}: fast {v['fast_ms']:.0f} ms ({v['fast_dtype']}), naive {v['naive_ms']:.0f} ms, "
                        f"|dP| {v['max_abs_prob_diff']:.4f}" for k, v in rows.items())
    return result("fail" if bad else "pass", summary, backbones=rows, settings=data["settings"])


def step_throughput(plan: dict) -> dict:
    out = Path(plan["work"]) / "throughput.json"
    rc = run_cmd([plan["python"], "benchmarks/throughput.py", "--device", plan["device"], "--json", str(out),
                  *plan["throughput"]["args"]])
    if rc != 0 or not out.is_file():
        return result("fail", f"throughput.py exited {rc}")
    data = json.loads(out.read_text(encoding="utf-8"))
    rows = {k: {"screening_images_per_s": v["screening"]["images_per_s"],
                **{f"train_{s}_images_per_s": t["images_per_s"] for s, t in v["training"].items()}}
            for k, v in data.items() if isinstance(v, dict) and "screening" in v}
    summary = "; ".join(f"{k}: screening {v['screening_images_per_s']:.0f}/s, training unfrozen " +
                        (f"bf16 {v['train_unfrozen_bf16_autocast_images_per_s']:.0f}/s"
                         if v["train_unfrozen_bf16_autocast_images_per_s"] is not None else
                         f"fp32 {v['train_unfrozen_fp32_images_per_s']:.0f}/s (no native bf16)") for k, v in rows.items())
    return result("pass", summary, backbones=rows, matmul_gflops=data["matmul_gflops"], settings=data["settings"])


STEP_FUNCS = {"cuda_tests": step_cuda_tests, "demo": step_demo, "ddp": step_ddp, "launcher": step_launcher,
              "latency": step_latency, "throughput": step_throughput}


# ------------------------------------------------------------------------------------------- the driver
def run_step(name: str, plan: dict, timeout: float) -> dict:
    """One step in its own process group, killed (with everything it started) when it outlives its timeout."""
    work = Path(plan["work"])
    log, res = work / "logs" / f"{name}.log", work / "steps" / f"{name}.json"
    log.parent.mkdir(parents=True, exist_ok=True)
    res.unlink(missing_ok=True)
    t0 = time.time()
    from core import jobs
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen([plan["python"], str(Path(__file__).resolve()), "--step", name, "--work", str(work)],
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, **jobs.popen_kwargs(),
                                env=child_env(PYTHONUNBUFFERED="1",
                                              **({"SKINSCREEN_SHARED": plan["shared"]} if plan["shared"] else {})))
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            jobs.kill_tree(proc.pid, jobs.create_time(proc.pid))
            rc, timed_out = proc.wait(), True
    kill_launched(work)  # trainers the launcher started run in their own session
    seconds = round(time.time() - t0, 1)
    tail = log.read_text(errors="replace", encoding="utf-8").splitlines()[-25:]
    if timed_out:
        out = result("timeout", f"killed after its {timeout:.0f} s timeout")
    elif res.is_file():
        out = json.loads(res.read_text(encoding="utf-8"))
    else:
        out = result("error", f"the step crashed (exit {rc}); see its log tail")
    out |= {"seconds": seconds, "timeout_s": round(timeout), "log": str(log)}
    if out["status"] in FAILED:
        out["log_tail"] = "\n".join(tail)
    return out


def kill_launched(work: Path) -> None:
    from core import jobs
    for run in (work / "launcher_runs").glob("*"):
        info = jobs.run_info(run)
        if info.alive:
            jobs.stop_training(run, force=True)


def gpu_info() -> dict:
    import torch
    if not torch.cuda.is_available():
        return {}
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"name": p.name, "memory_gib": round(p.total_memory / 2 ** 30, 1),
                     "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})
    info = {"gpus": gpus, "count": len(gpus), "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "bf16_supported": torch.cuda.is_bf16_supported()}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return info


def package_versions() -> dict:
    """The installed versions of the packages the steps use: a GPU machine may hold other ones than the pins."""
    from importlib import metadata
    out = {}
    for name in ("torch", "torchvision", "timm", "lightning-fabric", "numpy", "pandas", "scikit-learn", "pillow",
                 "onnxruntime", "grad-cam"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_tag(info: dict) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", info["gpus"][0]["name"].lower()).strip("-")
    return name + (f"-x{info['count']}" if info["count"] > 1 else "")


def summary_table(steps: dict) -> str:
    lines = [f"{'step':11} {'status':8} {'seconds':>7}  summary", "-" * 100]
    for name, s in steps.items():
        lines.append(f"{name:11} {s['status']:8} {s.get('seconds', 0):7.1f}  {s['summary']}")
    return "\n".join(lines)


def make_reference(run: Path) -> int:
    """results/shared_demo_cpu_reference.json from a finished CPU run of the shared demo (its reports and bundle)."""
    meta = json.loads((run / "bundle" / "model.json").read_text(encoding="utf-8"))
    ref = {"what": "the shared demo (train/configs/shared_demo.yaml) trained on a CPU: the intervals the GPU run's "
                   "validation and test ROC-AUC must fall in (benchmarks/gpu_check.py)",
           "run": run.name, "created": meta["provenance"]["created"],
           "train_seconds": meta["provenance"]["train_seconds"], "versions": meta["provenance"]["versions"],
           "weights_sha256": meta["weights_sha256"], "split_counts": meta["provenance"]["split_counts"],
           "threshold": meta["threshold"]["value"], "splits": {}}
    for split in ("val", "test"):
        r = json.loads((run / f"{split}_report.json").read_text(encoding="utf-8"))
        ref["splits"][split] = {"n": r["n"], "n_positive": r["n_positive"], "ci_method": r["ci_method"],
                                "metrics": r["metrics"]}
    REFERENCE.write_text(json.dumps(ref, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {REFERENCE}")
    return 0


def partial_path(path: Path) -> Path:
    """Where the results go while steps remain: beside the results file, so an interrupted re-run never replaces
    a complete earlier one."""
    return path.with_name(path.stem + ".partial" + path.suffix)


def write_results(out: dict, path: Path, t_start: float, final: bool) -> None:
    """The results so far (to partial_path until the last step; `complete` says which)."""
    from common import load_avg
    out["total_s"] = round(time.time() - t_start, 1)
    out["failed"] = [n for n, s in out["steps"].items() if s["status"] in FAILED]
    out["complete"] = final
    if final:
        out["machine"]["load_avg_1min_at_end"] = round(load_avg(), 2)
    (path if final else partial_path(path)).write_text(json.dumps(out, indent=1, default=str) + "\n",
                                                       encoding="utf-8")
    if final:
        partial_path(path).unlink(missing_ok=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run-cpu", action="store_true", help="run every step on the CPU with tiny settings")
    p.add_argument("--json", help="results file (default: benchmarks/results/gpu_check_<gpu-name>.json; in the "
                                  "dry run, gpu_check_dry-run-cpu.json in the work folder)")
    p.add_argument("--work", help="scratch folder for runs and logs (default: a new folder in the system's "
                                  "temporary folder)")
    p.add_argument("--shared", help="the shared folder holding data/ and weights/ (default ../shared or ./shared)")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--budget", type=float, help=f"seconds for all steps together (default {BUDGET_S})")
    p.add_argument("--timeout", action="append", default=[], metavar="STEP=SECONDS",
                   help="another timeout for one step, e.g. --timeout demo=400 (repeatable)")
    p.add_argument("--note", help="what differs from a plain run (e.g. how the photos reached this machine), kept in "
                                  "the results file")
    p.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    p.add_argument("--make-reference", metavar="RUN", help="write the CPU reference from a finished shared_demo run")
    args = p.parse_args(argv)
    if args.make_reference:
        return make_reference(Path(args.make_reference))
    if args.step:  # a child: run one step, write its result
        plan = json.loads((Path(args.work) / "plan.json").read_text(encoding="utf-8"))
        out = STEP_FUNCS[args.step](plan)
        (Path(args.work) / "steps").mkdir(exist_ok=True)
        (Path(args.work) / "steps" / f"{args.step}.json").write_text(json.dumps(out, indent=1, default=str),
                                                                     encoding="utf-8")
        return 0

    import torch
    dry = args.dry_run_cpu or os.environ.get("SKINSCREEN_GPU_CHECK_DRY_RUN") == "1"
    if not torch.cuda.is_available() and not dry:
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"No CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, {built}). "
              "Nothing was run.\n" + what_it_would_do())
        return 0
    device = "cpu" if dry else "cuda"
    stamp = f"gpu_check_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}"
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / stamp
    work.mkdir(parents=True, exist_ok=True)
    shared = find_shared(args.shared)
    plan = plan_for(device, dry, shared, work)
    for item in args.timeout:
        step, _, seconds = item.partition("=")
        if step not in STEPS or not seconds.replace(".", "", 1).isdigit():
            p.error(f"--timeout {item!r}: expected STEP=SECONDS with STEP one of {', '.join(STEPS)}")
        plan["timeouts"][step] = float(seconds)
    (work / "plan.json").write_text(json.dumps(plan, indent=1), encoding="utf-8")
    budget = args.budget or BUDGET_S["dry-run-cpu" if dry else "cuda"]

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import machine_info
    gpu = gpu_info()
    out = {"mode": "dry-run-cpu" if dry else "cuda", "machine": machine_info(), "gpu": gpu,
           "budget_s": budget, "work": str(work), "shared": plan["shared"], "note": args.note,
           "versions": package_versions(), "steps": {}}
    print(f"GPU check ({out['mode']}): {', '.join(g['name'] for g in gpu.get('gpus', [])) or 'CPU'} | torch "
          f"{torch.__version__} | work folder {work} | budget {budget:.0f} s", flush=True)
    path = Path(args.json) if args.json else (work / "gpu_check_dry-run-cpu.json" if dry else
                                              RESULTS / f"gpu_check_{gpu_tag(gpu)}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    for name in args.steps:
        left = budget - (time.time() - t_start)
        if left < 20:
            out["steps"][name] = result("not run", f"the {budget:.0f} s budget was spent before this step")
        else:
            out["steps"][name] = run_step(name, plan, min(plan["timeouts"][name], left))
        s = out["steps"][name]
        print(f"[{name}] {s['status']} ({s.get('seconds', 0):.0f} s): {s['summary']}", flush=True)
        write_results(out, path, t_start, final=False)  # a machine taken back mid-check still leaves the steps done
    write_results(out, path, t_start, final=True)
    print("\n" + summary_table(out["steps"]))
    print(f"\n{len(out['steps']) - len(out['failed'])}/{len(out['steps'])} steps passed in {out['total_s']:.0f} s"
          + (f"; failed: {', '.join(out['failed'])}" if out["failed"] else "") + f"\nwrote {path}")
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
