"""Training jobs: the one-job lock, starting, stopping and resuming `train.fit`, and each run's state and logs.

Everything the app shows about training lives in run folders (status.json, metrics.csv, train.log, the
launch record and the lock file), so refreshing or restarting the app loses nothing.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from core.appstate import PROJECT_ROOT, runs_dir

RECIPES_DIR = PROJECT_ROOT / "train" / "configs"
LOCK_NAME = "train.lock"          # in RUNS_DIR: the one training job allowed at a time
LAUNCH_NAME = "launch.json"       # in a run folder: how the app started it (pid, process group, command)
CONSOLE_LOG = "console.log"       # in a run folder: the subprocess's stdout + stderr (tracebacks land here)
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
DEVICES = ("auto", "cpu", "cuda")


class TrainingBusy(RuntimeError):
    """A training job is already running; the message says which one and on what device."""


class LaunchError(ValueError):
    """A training request that cannot be started (bad name, folder taken, unknown recipe...)."""


# ------------------------------------------------------------------------------------------ processes
_CHILDREN: dict[int, subprocess.Popen] = {}  # jobs this app process started: poll() reaps them (no zombies)


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of pid (field 22 of /proc/pid/stat): with the pid it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has exited
        return None
    return fields[19]


def process_alive(pid: int | None, start: str | None = None) -> bool:
    """Whether pid still runs (and, when `start` is given on Linux, is the same process, not a reused pid)."""
    if not pid:
        return False
    child = _CHILDREN.get(int(pid))
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(int(pid), None)
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if Path("/proc").is_dir():
        now = _proc_start(int(pid))
        if now is None:
            return False
        if start is not None and now != str(start):
            return False
    return True


# ------------------------------------------------------------------------------------------ the lock
def _lock_path(root: Path) -> Path:
    return Path(root) / LOCK_NAME


def read_lock(root: str | Path | None = None) -> dict | None:
    path = _lock_path(Path(root) if root is not None else runs_dir())
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def current_job(root: str | Path | None = None) -> dict | None:
    """The lock record of the running job, or None; a lock whose process has gone is removed (stale)."""
    root = Path(root) if root is not None else runs_dir()
    lock = read_lock(root)
    if lock is None:
        path = _lock_path(root)
        if path.exists() and time.time() - path.stat().st_mtime > 30:
            path.unlink(missing_ok=True)  # unreadable for 30 s: a crash mid-write
        return None
    if process_alive(lock.get("pid"), lock.get("start")):
        return lock
    _lock_path(root).unlink(missing_ok=True)
    return None


def acquire_lock(root: str | Path, record: dict) -> dict:
    """Create the lock atomically (O_EXCL) or raise TrainingBusy naming the job that holds it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(_lock_path(root), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            job = current_job(root)  # clears a stale lock
            if job is not None:
                raise TrainingBusy(
                    f"a training job is already running: run '{job.get('run')}' on device "
                    f"'{job.get('device')}' (pid {job.get('pid')}, started "
                    f"{time.strftime('%H:%M:%S', time.localtime(job.get('started', 0)))}). "
                    "One job at a time: stop it on the Train page or wait for it to finish.") from None
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return record
    raise TrainingBusy("could not take the training lock (another session is starting a job); try again")


def _write_lock(root: Path, record: dict) -> None:
    tmp = _lock_path(root).with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, _lock_path(root))


def release_lock(root: str | Path, pid: int | None = None) -> None:
    """Remove the lock (only if it belongs to pid, when given)."""
    lock = read_lock(root)
    if lock is not None and pid is not None and lock.get("pid") != pid:
        return
    _lock_path(Path(root)).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ launching
@dataclass(frozen=True)
class TrainRequest:
    """What the Train page's form asks for; None keeps the recipe's value."""
    recipe: str                        # path to a YAML recipe
    name: str                          # run name = folder under RUNS_DIR
    backbone: str | None = None
    weights: str | None = None
    init_from: str | None = None       # a run or bundle folder
    epochs: int | None = None          # every stage
    lr: float | None = None            # every stage
    device: str = "auto"
    manifest: str | None = None        # replaces every stage's data with this manifest
    domain: str | None = None          # the domain label for that manifest
    data_root: str | None = None       # folder the recipe's relative data paths live in
    sets: tuple[str, ...] = field(default_factory=tuple)  # extra --set key=value overrides


def list_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))


def recipe_summary(path: str | Path) -> dict:
    """The parts of a recipe the form pre-fills: name, backbone, weights, init_from, stages."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    stages = [{"name": s.get("name"), "epochs": s.get("epochs"), "lr": s.get("lr"),
               "data": [d.get("manifest") or d.get("csv") for d in s.get("data") or []]}
              for s in raw.get("stages") or []]
    return {"name": raw.get("name") or Path(path).stem, "backbone": raw.get("backbone", "convnext_tiny"),
            "weights": raw.get("weights", "imagenet"), "init_from": raw.get("init_from"),
            "device": raw.get("device", "auto"), "data_root": raw.get("data_root"), "stages": stages}


def training_command(req: TrainRequest, out: str | Path, python: str | None = None) -> list[str]:
    """The `python -m train.fit` argv for a request (run from the project root)."""
    cmd = [python or sys.executable, "-m", "train.fit", "--config", str(req.recipe), "--out", str(out),
           "--name", req.name]
    if req.device and req.device != "auto":
        cmd += ["--device", req.device]
    if req.backbone:
        cmd += ["--backbone", req.backbone]
    if req.weights and not req.init_from:  # a previous run's bundle fixes the starting weights
        cmd += ["--weights", req.weights]
    if req.init_from:
        cmd += ["--init-from", str(req.init_from)]
    if req.epochs:
        cmd += ["--epochs", str(int(req.epochs))]
    if req.data_root:
        cmd += ["--data-root", str(req.data_root)]
    n_stages = len(recipe_summary(req.recipe)["stages"])
    for i in range(n_stages):
        if req.lr:
            cmd += ["--set", f"stages.{i}.lr={float(req.lr)!r}"]
        if req.manifest:
            source = {"manifest": str(req.manifest)} | ({"domain": req.domain} if req.domain else {})
            cmd += ["--set", f"stages.{i}.data=[{json.dumps(source)}]"]  # JSON is YAML flow syntax
    for s in req.sets:
        cmd += ["--set", s]
    return cmd


def resolved_device(device: str) -> str:
    from core.device import pick_device
    return pick_device(device).type if device == "auto" else device


def start_training(req: TrainRequest, root: str | Path | None = None, *, python: str | None = None,
                   env: dict | None = None) -> dict:
    """Start `python -m train.fit` as its own process group (never a thread), logging into the run folder.

    Refuses (TrainingBusy) while another job holds the lock; returns the launch record."""
    root = Path(root) if root is not None else runs_dir()
    if not RUN_NAME_RE.match(req.name or ""):
        raise LaunchError(f"run name {req.name!r}: use letters, digits, '.', '_' or '-' (max 80), "
                          "starting with a letter or digit")
    if not Path(req.recipe).is_file():
        raise LaunchError(f"recipe not found: {req.recipe}")
    if req.device not in DEVICES:
        raise LaunchError(f"device must be one of {DEVICES}")
    out = root / req.name
    if out.exists() and any(out.iterdir()):
        raise LaunchError(f"{out} already exists; pick another run name (or resume that run)")
    return _launch(root, out, training_command(req, out, python), resolved_device(req.device), env,
                   requested=req.device)


def resume_training(run: str | Path, root: str | Path | None = None, *, device: str | None = None,
                    python: str | None = None, env: dict | None = None) -> dict:
    """Continue a stopped or interrupted run from its checkpoint (`train.fit --resume`)."""
    run = Path(run)
    root = Path(root) if root is not None else run.parent
    if not (run / "checkpoint.pt").is_file():
        raise LaunchError(f"{run.name} has no checkpoint to resume from")
    cmd = [python or sys.executable, "-m", "train.fit", "--resume", "--out", str(run)]
    launch = _read_json(run / LAUNCH_NAME) or {}
    dev = device or launch.get("requested_device") or "auto"
    if dev != "auto":
        cmd += ["--device", dev]
    return _launch(root, run, cmd, resolved_device(dev), env, requested=dev)


def _launch(root: Path, out: Path, cmd: list[str], device: str, env: dict | None,
            requested: str | None = None) -> dict:
    record = {"pid": os.getpid(), "start": _proc_start(os.getpid()), "run": out.name, "path": str(out),
              "device": device, "started": time.time(), "command": cmd}
    acquire_lock(root, record)
    try:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / CONSOLE_LOG, "ab")
        try:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
        finally:
            log.close()
    except BaseException:
        release_lock(root)
        raise
    _CHILDREN[proc.pid] = proc
    record |= {"pid": proc.pid, "pgid": proc.pid, "start": _proc_start(proc.pid),
               "requested_device": requested or "auto"}
    _write_json(out / LAUNCH_NAME, record)
    _write_lock(root, record)
    return record


def stop_training(run: str | Path, *, force: bool = False) -> str:
    """Stop a run: SIGTERM to the trainer (it saves its state and writes status 'stopped', resumable; its
    data-loader workers exit with it) or, with force, SIGKILL to its whole process group.

    SIGTERM goes to the trainer alone, not the group: a worker killed first makes the trainer fail with
    "DataLoader worker ... killed by signal" instead of stopping cleanly. Only a process identified as this
    run's trainer is signalled. Returns what was done."""
    run = Path(run)
    info = run_info(run)  # identifies the live trainer (launch record: pid + start time; else a train.fit pid)
    if not info.alive:
        return f"{run.name} is not running"
    sig = signal.SIGKILL if force else signal.SIGTERM
    launch = _read_json(run / LAUNCH_NAME) or {}
    try:
        if force and launch.get("pgid") and launch.get("pid") == info.pid:
            os.killpg(launch["pgid"], sig)  # the trainer and its data-loader workers
        else:
            os.kill(info.pid, sig)
    except ProcessLookupError:
        return f"{run.name} had already exited"
    return f"sent {'SIGKILL' if force else 'SIGTERM'} to {run.name} (pid {info.pid})"


def wait_for(run: str | Path, timeout: float = 60.0) -> bool:
    """Wait until the app-started process of run exits (True) or timeout (False); for tests and scripts."""
    launch = _read_json(Path(run) / LAUNCH_NAME) or {}
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not process_alive(launch.get("pid"), launch.get("start")):
            return True
        time.sleep(0.2)
    return False


# ------------------------------------------------------------------------------------------ runs
@dataclass
class RunInfo:
    name: str
    path: Path
    state: str                 # starting | running | finished | failed | stopped | interrupted | unknown
    stage: int | None = None
    stage_name: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    updated: float | None = None
    pid: int | None = None
    alive: bool = False
    error: str | None = None
    has_bundle: bool = False
    resumable: bool = False


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_status(run: str | Path) -> dict:
    return _read_json(Path(run) / "status.json") or {}


def _is_trainer(pid: int) -> bool:
    """Whether pid runs train.fit (guards a status.json pid that has since been reused); True without /proc."""
    try:
        return b"train.fit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not Path("/proc").is_dir()


def run_info(run: str | Path) -> RunInfo:
    """A run's state from its folder; 'running' whose process has gone becomes 'interrupted'."""
    run = Path(run)
    status = read_status(run)
    launch = _read_json(run / LAUNCH_NAME) or {}
    # The app's launch record names the process exactly (pid + start time); a run started from a terminal
    # has only the pid in status.json.
    alive_pid = None
    if launch.get("pid") and process_alive(launch["pid"], launch.get("start")):
        alive_pid = launch["pid"]
    elif (status.get("pid") and status.get("pid") != launch.get("pid") and process_alive(status["pid"])
          and _is_trainer(status["pid"])):
        alive_pid = status["pid"]
    alive = alive_pid is not None
    relaunched = bool(launch) and launch.get("started", 0) > status.get("updated", 0)
    state = status.get("state")
    if state is None or relaunched:  # (re)started by the app, no status update since
        state = ("starting" if alive else "failed") if launch else "unknown"
    elif state == "running" and not alive:
        state = "interrupted"
    elif state in ("stopped", "failed", "finished") and alive:
        state = "stopping"  # the trainer wrote its final state and is exiting
    error = status.get("error") if state == "failed" else None
    if state == "failed" and not error and (not status or relaunched):
        error = f"exited before training started; see {CONSOLE_LOG}"
    return RunInfo(name=run.name, path=run, state=state, stage=status.get("stage"),
                   stage_name=status.get("stage_name"), epoch=status.get("epoch"), epochs=status.get("epochs"),
                   updated=status.get("updated"), pid=alive_pid or status.get("pid") or launch.get("pid"),
                   alive=alive, error=error, has_bundle=(run / "bundle" / "model.json").is_file(),
                   resumable=(run / "checkpoint.pt").is_file() and state in ("stopped", "interrupted", "failed"))


def list_runs(root: str | Path | None = None) -> list[RunInfo]:
    """Run folders under root (those with status.json, launch.json or config.yaml), newest first."""
    root = Path(root) if root is not None else runs_dir()
    if not root.is_dir():
        return []
    runs = []
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith(".") and any(
                (d / f).exists() for f in ("status.json", LAUNCH_NAME, "config.yaml")):
            runs.append(run_info(d))
    return sorted(runs, key=lambda r: -(r.updated or _mtime(r.path)))


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def runs_table(runs: list[RunInfo]) -> pd.DataFrame:
    rows = []
    for r in runs:
        m = read_metrics(r.path)
        auc = m["val_roc_auc"].dropna() if "val_roc_auc" in m else pd.Series(dtype=float)
        rows.append({"run": r.name, "state": r.state,
                     "stage": r.stage_name if r.stage_name is not None else (r.stage if r.stage is not None else ""),
                     "epoch": f"{r.epoch + 1}/{r.epochs}" if r.epoch is not None and r.epochs else "",
                     "best val AUC": round(float(auc.max()), 3) if len(auc) else None,
                     "model": "yes" if r.has_bundle else "",
                     "updated": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.updated)) if r.updated else "",
                     "note": r.error or ""})
    return pd.DataFrame(rows, columns=["run", "state", "stage", "epoch", "best val AUC", "model", "updated",
                                       "note"])


def read_metrics(run: str | Path) -> pd.DataFrame:
    """metrics.csv (one row per epoch), or an empty frame when there is none yet."""
    try:
        df = pd.read_csv(Path(run) / "metrics.csv")
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return pd.DataFrame()
    if {"stage", "epoch"} <= set(df.columns):
        df["step"] = range(1, len(df) + 1)  # epochs counted across stages, for one x axis
    return df


def log_tail(run: str | Path, name: str = "train.log", lines: int = 30, max_bytes: int = 64_000) -> str:
    path = Path(run) / name
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
