"""Wall time and peak memory of one training recipe run from scratch, with the numbers the run produced.

    python benchmarks/recipe_time.py --config train/configs/shared_demo_cv.yaml \\
        --json benchmarks/results/recipe_time_shared_demo_cv_<tag>.json
    python benchmarks/recipe_time.py --config train/configs/shared_demo_cv.yaml --nested --json ...

Runs `python -m train.fit` in a child process (run it on an idle machine: the load average is recorded at start and
end). Each second it samples the resident memory of the largest process (what `/usr/bin/time` reports) and the sum
over the whole process tree, the training process and its DataLoader workers. The sum is an upper bound: forked
workers share some of the parent's pages and each counts them. The proportional set size would not, but reading it
takes the process's memory-map lock and slowed a 2-core run by 15-40%, so it is not sampled.

From the fresh run folder it reads back the machine and precision it trained with (the bundle's `trained_on`), each
fold's and pair run's training seconds and best epochs, and the out-of-fold, threshold-transfer and test metrics with
their CIs. A recipe's time budget (shared_demo_cv: 40 minutes on either CPU class) is checked per class from these
files, one per class; a time is never carried from one class to another.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import psutil

from common import ROOT, cpu_tag, finish, machine_info
from core import runfolder
from core.bundle import read_meta
from core.fileio import read_json_or_none

KEYS = ("roc_auc", "pr_auc", "recall", "specificity")


def run_fit(config: str, out: Path, extra: list[str]) -> dict:
    """train.fit in a child process: exit code, wall seconds, the peak resident memory of its largest process and
    of its whole process tree (summed; sampled each second, so a shorter peak can be missed)."""
    cmd = [sys.executable, "-m", "train.fit", "--config", config, "--out", str(out), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    parent, tree_peak, largest = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        rss = []
        try:
            family = [parent] + parent.children(recursive=True)
        except psutil.Error:  # it just finished
            family = []
        for p in family:
            try:
                rss.append(p.memory_info().rss)  # /proc/<pid>/statm: no lock the training process waits on
            except psutil.Error:  # a worker that exited between the listing and the reading
                pass
        tree_peak, largest = max(tree_peak, sum(rss)), max([largest, *rss])
        time.sleep(1.0)
    return {"command": " ".join(cmd[1:]), "exit_code": proc.returncode,
            "wall_s": round(time.perf_counter() - start, 1), "peak_rss_tree_sum_bytes": tree_peak,
            "peak_rss_largest_process_bytes": largest}


def run_numbers(out: Path) -> dict:
    """What the finished run folder says: machines, training seconds per run, validation and test metrics."""
    prov = read_meta(out).provenance
    res = {"trained_on": prov.trained_on, "train_seconds": prov.train_seconds}
    cv = read_json_or_none(out / runfolder.CV_REPORT)
    if cv is None:
        res["validation"] = _pick(read_json_or_none(out / runfolder.VAL_REPORT)["metrics"])
    else:
        res["folds"] = [{"fold": f["fold"], "best_epochs": f["best_epochs"], "roc_auc": f["metrics"]["roc_auc"],
                         "train_seconds": read_meta(runfolder.fold_path(out, f["fold"])).provenance.train_seconds}
                        for f in cv["cv"]["per_fold"]]
        res["out_of_fold"] = {**_pick(cv["metrics"]), "n": cv["n"], "n_positive": cv["n_positive"]}
        nested, rates = cv["cv"].get("nested"), ("sensitivity", "specificity")
        # the bundle's threshold, with the transfer of the scores it was chosen on (nested: the ensembles')
        res["threshold"] = cv["cv"]["threshold"]["value"]
        res["threshold_transfer"] = _pick((nested or cv["cv"])["threshold_transfer"], rates)
        if nested:
            res["nested"] = {**_pick(nested["metrics"]), "pairs": nested["pairs"],
                             "pair_train_seconds": nested.get("train_seconds")}
            res["member_threshold"] = cv["cv"]["member_threshold"]["value"]
            res["member_threshold_transfer"] = _pick(cv["cv"]["threshold_transfer"], rates)
    test = read_json_or_none(out / runfolder.TEST_REPORT)
    if test is not None:
        res["test"] = {**_pick(test["metrics"]), "n": test["n"], "n_positive": test["n_positive"]}
    return res


def _pick(metrics: dict, keys=KEYS) -> dict:
    return {k: metrics[k] for k in keys if k in metrics}


def table(r: dict) -> str:
    """The run in a few printable lines."""
    def est(e):
        return "n/a" if not e or e.get("value") is None else (
            f"{e['value']:.3f}" + (f" [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]" if e.get("ci95") else ""))
    m, n = r["run"], r["numbers"]
    lines = [f"wall {m['wall_s'] / 60:.1f} min; peak resident memory {m['peak_rss_largest_process_bytes'] / 2**30:.2f} "
             f"GiB (largest process), {m['peak_rss_tree_sum_bytes'] / 2**30:.2f} GiB (process tree summed, an upper bound)",
             "trained on: " + "; ".join(f"{h.get('device')} {h.get('cpu_capability')} {h.get('precision')}"
                                        for h in n.get("trained_on") or [])]
    for f in n.get("folds", []):
        lines.append(f"  fold {f['fold']}: {f['train_seconds'] / 60:.1f} min, best epochs {f['best_epochs']}, "
                     f"ROC-AUC {f['roc_auc']:.3f}")
    for name in ("validation", "out_of_fold", "nested", "test"):
        if name in n:
            lines.append(f"{name}: " + ", ".join(f"{k} {est(n[name].get(k))}" for k in KEYS))
    if "threshold_transfer" in n:
        t = n["threshold_transfer"]
        lines.append(f"threshold {n['threshold']:.3f}; on new patients (cross-fitted): sensitivity "
                     f"{est(t['sensitivity'])}, specificity {est(t['specificity'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the recipe, e.g. train/configs/shared_demo_cv.yaml")
    p.add_argument("--out", help="a run folder that does not exist yet (default runs/<recipe>_timing_<cpu tag>)")
    p.add_argument("--nested", action="store_true", help="time the recipe with nested cross-validation")
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    out = Path(args.out or ROOT / "runs" / f"{Path(args.config).stem}{'_nested' if args.nested else ''}_timing_"
                                               f"{cpu_tag()}")
    if out.exists():
        print(f"error: {out} exists; a timing needs a run from scratch (remove it or pass another --out)",
              file=sys.stderr)
        return 2
    info = machine_info()
    print(f"{info['cpu']} | {info['cores']} cores | {info['isa_class']} | load {info['load_avg_1min_at_start']} | "
          f"{args.config}{' --nested' if args.nested else ''} -> {out}", flush=True)
    # the child runs in the repository root, where recipes' relative data paths (../shared/...) point from
    run = run_fit(str(Path(args.config).resolve()), out.resolve(), ["--nested"] if args.nested else [])
    if run["exit_code"] != 0:
        print(f"error: train.fit exited {run['exit_code']} after {run['wall_s']:.0f} s; nothing written",
              file=sys.stderr)
        return 1
    result = {"machine": info, "config": args.config, "nested": args.nested, "out": str(out), "run": run,
              "numbers": run_numbers(out)}
    print(table(result))
    return finish(result, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
