"""Training jobs: the one-job lock, starting, stopping and resuming `train.fit`, and each run's state.

Everything the app shows about training lives in run folders (core.runfolder) and the lock file, so refreshing or
restarting the app loses nothing. Processes are identified and stopped through psutil (pid + creation time; a stop
request file for a clean stop), so this works the same on Linux, macOS and Windows.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psutil
import yaml

from core import runfolder
from core.appstate import PROJECT_ROOT, runs_dir
from core.fileio import atomic_write_json, read_json_or_none

RECIPES_DIR = PROJECT_ROOT / "train" / "configs"
LOCK_NAME = "train.lock"          # in RUNS_DIR: the one training job allowed at a time
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,78}[A-Za-z0-9_-]$|^[A-Za-z0-9]$")  # no trailing '.'
# names Windows reserves for devices, with or without an extension: a run folder cannot have them there
WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)
DEVICES = ("auto", "cpu", "cuda", "mps")
CREATE_TIME_TOLERANCE = 0.01      # seconds: the same process reports the same creation time; a reused pid a later one


class TrainingBusy(RuntimeError):
    """A training job is already running; the message says which one and on what device."""


class LaunchError(ValueError):
    """A training request that cannot be started (bad name, folder taken, unknown recipe...)."""


# ------------------------------------------------------------------------------------------ processes
_CHILDREN: dict[int, subprocess.Popen] = {}  # jobs this app process started: poll() reaps them (no zombies)


def create_time(pid: int | None) -> float | None:
    """When pid was created (psutil, seconds since the epoch): with the pid it names one process, whatever the OS.
    None when there is no such process (or it has exited and awaits its reaper)."""
    if not pid:
        return None
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, ValueError):
        return None
    except psutil.AccessDenied:  # exists, owned by someone else: it has a creation time we may not read
        return None


def process_alive(pid: int | None, created: float | None = None) -> bool:
    """Whether pid runs and, when `created` is given, is the same process (not a reused pid)."""
    if not pid:
        return False
    child = _CHILDREN.get(int(pid))
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(int(pid), None)
        return False
    now = create_time(pid)
    if now is None:
        return False
    return created is None or abs(now - float(created)) <= CREATE_TIME_TOLERANCE


def is_trainer(pid: int) -> bool:
    """Whether pid runs train.fit (guards a status.json pid that has since been reused by another program)."""
    try:
        return any("train.fit" in part for part in psutil.Process(int(pid)).cmdline())
    except (psutil.Error, ValueError):
        return False


def popen_kwargs() -> dict:
    """Start the trainer detached from the app's console, so Ctrl-C on `streamlit run` or closing the app leaves
    it training: its own session on POSIX, its own process group on Windows (start_new_session does not exist
    there)."""
    if os.name == "nt":
        # no window: without it the trainer shares the app's console and dies when that window is closed
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def kill_tree(pid: int, created: float | None) -> list[int]:
    """Kill pid and every descendant (data-loader workers, DDP ranks), if pid is still the process created at
    `created`; returns the pids killed."""
    if not process_alive(pid, created):
        return []
    try:
        root = psutil.Process(int(pid))
        procs = [root, *root.children(recursive=True)]  # list the children before the parent dies
    except psutil.NoSuchProcess:
        return []
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    child = _CHILDREN.pop(int(pid), None)
    if child is not None:
        child.wait(timeout=10)  # reap it
    return [p.pid for p in procs]


# ------------------------------------------------------------------------------------------ the lock
def _lock_path(root: Path) -> Path:
    return Path(root) / LOCK_NAME


def read_lock(root: str | Path | None = None) -> dict | None:
    lock = read_json_or_none(_lock_path(Path(root) if root is not None else runs_dir()))
    return lock if isinstance(lock, dict) else None


def current_job(root: str | Path | None = None) -> dict | None:
    """The lock record of the running job, or None; a lock whose process has gone is removed (stale)."""
    root = Path(root) if root is not None else runs_dir()
    lock = read_lock(root)
    if lock is None:
        path = _lock_path(root)
        if path.exists() and time.time() - path.stat().st_mtime > 30:
            path.unlink(missing_ok=True)  # unreadable for 30 s: a crash mid-write
        return None
    if process_alive(lock.get("pid"), lock.get("create_time")):
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
            refuse_if_busy(root)  # clears a stale lock
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return record
    raise TrainingBusy("could not take the training lock (another session is starting a job); try again")


def refuse_if_busy(root: str | Path) -> None:
    """Raise TrainingBusy naming the running job, if there is one (a stale lock is cleared on the way)."""
    job = current_job(root)
    if job is not None:
        raise TrainingBusy(
            f"a training job is already running: run '{job.get('run')}' on device "
            f"'{job.get('device')}' (pid {job.get('pid')}, started "
            f"{time.strftime('%H:%M:%S', time.localtime(job.get('started', 0)))}). "
            "One job at a time: stop it on the Train page or wait for it to finish.")


def _write_lock(root: Path, record: dict) -> None:
    atomic_write_json(_lock_path(root), record)


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
    lr: float | str | None = None      # every stage; the form's text as typed (checked by parse_lr)
    device: str = "auto"
    manifest: str | None = None        # replaces every stage's data with this manifest
    domain: str | None = None          # the domain label for that manifest
    data_root: str | None = None       # folder the recipe's relative data paths live in
    folds: int | None = None           # cross-validation folds (0: one validation split; >= 2: K folds)
    nested: bool | None = None         # nested cross-validation: the ensemble's threshold on ensemble scores
    sets: tuple[str, ...] = field(default_factory=tuple)  # extra --set key=value overrides


def parse_lr(text) -> float | None:
    """The form's learning rate: blank (or None) keeps the recipe's; anything else must be a positive number."""
    said = "" if text is None else str(text).strip()
    if not said:
        return None
    try:
        value = float(said)
    except ValueError:
        raise LaunchError(f"learning rate {said!r} is not a number (e.g. 1e-4, or blank for the recipe's)") from None
    if not 0 < value < float("inf"):
        raise LaunchError(f"learning rate {said} must be a positive number (e.g. 1e-4)")
    return value


def list_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))


def recipe_summary(path: str | Path) -> dict:
    """The parts of a recipe the form pre-fills: name, backbone, weights, init_from, stages."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    stages = [{"name": s.get("name"), "epochs": s.get("epochs"), "lr": s.get("lr"),
               "data": [d.get("manifest") or d.get("csv") for d in s.get("data") or []]}
              for s in raw.get("stages") or []]
    return {"name": raw.get("name") or Path(path).stem, "backbone": raw.get("backbone", "convnext_tiny"),
            "weights": raw.get("weights", "imagenet"), "init_from": raw.get("init_from"),
            "device": raw.get("device", "auto"), "data_root": raw.get("data_root"),
            "folds": int((raw.get("cv") or {}).get("folds") or 0),
            "nested": bool((raw.get("cv") or {}).get("nested") or False), "stages": stages}


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
    if req.folds is not None:
        cmd += ["--folds", str(int(req.folds))]
    if req.nested is not None:
        cmd += ["--nested" if req.nested else "--no-nested"]
    n_stages = len(recipe_summary(req.recipe)["stages"])
    lr = parse_lr(req.lr)
    for i in range(n_stages):
        if lr is not None:
            cmd += ["--set", f"stages.{i}.lr={lr!r}"]
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
    refuse_if_busy(root)  # the first thing to say, before the check's seconds
    problems = request_problems(req, root)
    if problems:
        raise LaunchError("; ".join(problems))
    out = root / req.name
    cmd = training_command(req, out, python)
    if problems := input_problems(cmd, env):  # the run's own --check: its config, data, weights and starting run
        raise LaunchError("; ".join(problems))
    return _launch(root, out, cmd, resolved_device(req.device), env, requested=req.device)


def request_problems(req: TrainRequest, root: Path) -> list[str]:
    """Everything wrong with the form's request itself, all at once (the run's inputs are checked next)."""
    problems = []
    if not RUN_NAME_RE.match(req.name or ""):
        problems.append(f"run name {req.name!r}: use letters, digits, '.', '_' or '-' (max 80), starting with a "
                        "letter or digit and not ending in '.'")
    elif WINDOWS_RESERVED.match(req.name):
        problems.append(f"run name {req.name!r} is a device name on Windows (CON, PRN, AUX, NUL, COM1, LPT1...); "
                        "pick another")
    elif (root / req.name).exists() and any((root / req.name).iterdir()):
        problems.append(f"{root / req.name} already exists; pick another run name (or resume that run)")
    try:
        parse_lr(req.lr)
    except LaunchError as e:
        problems.append(str(e))
    if req.device not in DEVICES:
        problems.append(f"device must be one of {DEVICES}")
    if req.folds is not None and (req.folds == 1 or req.folds < 0):
        problems.append(f"folds must be 0 (one validation split) or at least 2, not {req.folds}")
    if not Path(req.recipe).is_file():
        problems.append(f"recipe not found: {req.recipe}")
    elif req.nested:
        folds = req.folds if req.folds is not None else recipe_summary(req.recipe)["folds"]
        if folds < 3:
            problems.append(f"nested cross-validation needs at least 3 folds, not {folds}")
    return problems


def input_problems(cmd: list[str], env: dict | None = None) -> list[str]:
    """Run the command with --check (train.fit builds the config and looks up its data, weights and starting run,
    exactly as the run will): what would stop the run in its first seconds, every reason of it."""
    try:
        done = subprocess.run([*cmd, "--check"], cwd=PROJECT_ROOT, capture_output=True, timeout=300,
                              stdin=subprocess.DEVNULL, encoding="utf-8", errors="replace",
                              env={**os.environ, **(env or {}), "PYTHONIOENCODING": "utf-8"})
    except subprocess.TimeoutExpired:
        raise LaunchError("checking the run's inputs took over 5 minutes; start it from a terminal to see why") \
            from None
    if done.returncode == 0:
        return []
    said = [line.removeprefix("error: ") for line in done.stderr.splitlines() if line.startswith("error: ")]
    return said or (done.stderr.strip().splitlines() or ["the check failed without a reason"])[-1:]


def resume_training(run: str | Path, root: str | Path | None = None, *, device: str | None = None,
                    python: str | None = None, env: dict | None = None) -> dict:
    """Continue a stopped or interrupted run from its checkpoint (`train.fit --resume`)."""
    run = Path(run)
    root = Path(root) if root is not None else run.parent
    if not runfolder.holds_run(run):
        raise LaunchError(f"{run.name} has no checkpoint to resume from")
    cmd = [python or sys.executable, "-m", "train.fit", "--resume", "--out", str(run)]
    launch = runfolder.read_launch(run)
    dev = device or launch.get("requested_device") or "auto"
    if dev != "auto":
        cmd += ["--device", dev]
    return _launch(root, run, cmd, resolved_device(dev), env, requested=dev)


def _launch(root: Path, out: Path, cmd: list[str], device: str, env: dict | None,
            requested: str | None = None) -> dict:
    me = os.getpid()
    record = {"pid": me, "create_time": create_time(me), "run": out.name, "path": str(out), "device": device,
              "started": time.time(), "command": cmd}
    acquire_lock(root, record)
    try:
        out.mkdir(parents=True, exist_ok=True)
        runfolder.clear_stop(out)  # an old request (e.g. before a force stop) must not stop this run
        with open(out / runfolder.CONSOLE, "ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, **popen_kwargs(),
                                    env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1",
                                         "PYTHONIOENCODING": "utf-8"})  # console.log is read as UTF-8
    except BaseException:
        release_lock(root)
        raise
    _CHILDREN[proc.pid] = proc
    record |= {"pid": proc.pid, "create_time": create_time(proc.pid), "requested_device": requested or "auto"}
    runfolder.write_launch(out, record)
    _write_lock(root, record)
    return record


def stop_training(run: str | Path, *, force: bool = False) -> str:
    """Stop a run. Normally: a stop request in the run folder; the trainer stops at its next step boundary,
    saves its state and writes status 'stopped' (resumable), on any OS. With force: kill the trainer and all its
    descendants (no checkpoint of the current epoch).

    Only a process identified as this run's trainer is killed (launch record: pid + creation time; else a
    status.json pid that runs train.fit). Returns what was done."""
    run = Path(run)
    info = run_info(run)
    if not info.alive:
        return f"{run.name} is not running"
    if not force:
        runfolder.request_stop(run, by="the app's Stop button")
        return f"asked {run.name} to stop (pid {info.pid}): it stops after its current training step"
    launch = runfolder.read_launch(run)
    created = launch.get("create_time") if launch.get("pid") == info.pid else create_time(info.pid)
    killed = kill_tree(info.pid, created)
    if not killed:
        return f"{run.name} had already exited"
    return f"killed {run.name} (pid {info.pid} and {len(killed) - 1} child process(es))"


def wait_for(run: str | Path, timeout: float = 60.0) -> bool:
    """Wait until the app-started process of run exits (True) or timeout (False); for tests and scripts."""
    launch = runfolder.read_launch(run)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not process_alive(launch.get("pid"), launch.get("create_time")):
            return True
        time.sleep(0.2)
    return False


# ------------------------------------------------------------------------------------------ runs
@dataclass
class RunInfo:
    name: str
    path: Path
    state: str                 # starting | running | stopping | finished | failed | stopped | interrupted | unknown
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
    cv: dict | None = None     # a cross-validation: {"folds": K, "fold": k being trained or None, "done": [...]},
    #                            and with nested: "pairs": P, "pair": [k, j] being trained or None, "pairs_done"

    def cv_progress(self) -> tuple[float, str] | None:
        """A cross-validation's share of member runs done (fold runs, then pair runs) and it in words; None for a
        single-split run."""
        if not self.cv:
            return None
        folds, pairs = int(self.cv.get("folds") or 0), int(self.cv.get("pairs") or 0)
        done, pairs_done = len(self.cv.get("done") or []), len(self.cv.get("pairs_done") or [])
        text = f"{done} of {folds} folds" + (f" and {pairs_done} of {pairs} pair runs" if pairs else "") + " done"
        return min(1.0, (done + pairs_done) / max(1, folds + pairs)), text

    def progress(self) -> str:
        """'fold 3/5, stage finetune, epoch 4/8': where the run is, in words (empty when nothing is known)."""
        parts = []
        cv = self.cv or {}
        if cv.get("fold") is not None:
            parts.append(f"fold {cv['fold'] + 1}/{cv.get('folds')}")
        elif cv.get("pair") is not None:
            k, j = cv["pair"]
            parts.append(f"pair run {len(cv.get('pairs_done') or []) + 1}/{cv.get('pairs')} (folds {k} and {j} "
                         "left out)")
        elif cv:
            parts.append(self.cv_progress()[1])
        if self.stage_name is not None or self.stage is not None:
            parts.append(f"stage {self.stage_name if self.stage_name is not None else self.stage}")
        if self.epoch is not None and self.epochs:
            parts.append(f"epoch {self.epoch + 1}/{self.epochs}")
        return ", ".join(parts)


def run_info(run: str | Path) -> RunInfo:
    """A run's state from its folder; 'running' whose process has gone becomes 'interrupted'."""
    run = Path(run)
    status = runfolder.read_status(run)
    launch = runfolder.read_launch(run)
    # The app's launch record names the process exactly (pid + creation time); a run started from a terminal
    # has only the pid in status.json.
    alive_pid = None
    if launch.get("pid") and process_alive(launch["pid"], launch.get("create_time")):
        alive_pid = launch["pid"]
    elif (status.get("pid") and status.get("pid") != launch.get("pid") and process_alive(status["pid"])
          and is_trainer(status["pid"])):
        alive_pid = status["pid"]
    alive = alive_pid is not None
    relaunched = bool(launch) and launch.get("started", 0) > status.get("updated", 0)
    state = status.get("state")
    if state is None or relaunched:  # (re)started by the app, no status update since
        state = ("starting" if alive else "failed") if launch else "unknown"
    elif state == "running" and not alive:
        state = "interrupted"
    elif alive and (state in ("stopped", "failed", "finished") or runfolder.stop_requested(run)):
        state = "stopping"  # asked to stop, or it wrote its final state and is exiting
    error = status.get("error") if state == "failed" else None
    if state == "failed" and not error and (not status or relaunched):
        error = f"exited before training started; see {runfolder.CONSOLE}"
    return RunInfo(name=run.name, path=run, state=state, stage=status.get("stage"),
                   stage_name=status.get("stage_name"), epoch=status.get("epoch"), epochs=status.get("epochs"),
                   updated=status.get("updated"), pid=alive_pid or status.get("pid") or launch.get("pid"),
                   alive=alive, error=error, has_bundle=runfolder.has_bundle(run),
                   resumable=runfolder.holds_run(run) and state in ("stopped", "interrupted", "failed"),
                   cv=status.get("cv") if isinstance(status.get("cv"), dict) else None)


def list_runs(root: str | Path | None = None) -> list[RunInfo]:
    """Run folders under root (those with status.json, launch.json or config.yaml), newest first."""
    root = Path(root) if root is not None else runs_dir()
    if not root.is_dir():
        return []
    runs = [run_info(d) for d in root.iterdir() if runfolder.is_run_folder(d)]
    return sorted(runs, key=lambda r: -(r.updated or _mtime(r.path)))


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def runs_table(runs: list[RunInfo]) -> pd.DataFrame:
    rows = []
    for r in runs:
        m = runfolder.read_metrics(r.path)
        auc = m["val_roc_auc"].dropna() if "val_roc_auc" in m else pd.Series(dtype=float)
        stage = r.stage_name if r.stage_name is not None else (r.stage if r.stage is not None else "")
        if r.cv:
            fold = r.cv.get("fold")
            stage = (f"fold {fold + 1}/{r.cv.get('folds')}" if fold is not None else
                     f"{len(r.cv.get('done') or [])}/{r.cv.get('folds')} folds") + (f": {stage}" if stage != "" else "")
        rows.append({"run": r.name, "state": r.state, "stage": stage,
                     "epoch": f"{r.epoch + 1}/{r.epochs}" if r.epoch is not None and r.epochs else "",
                     "best val AUC": round(float(auc.max()), 3) if len(auc) else None,
                     "model": "yes" if r.has_bundle else "",
                     "updated": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.updated)) if r.updated else "",
                     "note": r.error or ""})
    return pd.DataFrame(rows, columns=["run", "state", "stage", "epoch", "best val AUC", "model", "updated",
                                       "note"])
