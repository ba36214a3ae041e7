"""The run-folder contract: the one module that names, writes and reads a training run's files.

The trainer (core.training, any rank) and the app (core.jobs) both go through here, so they cannot disagree about
a file name or format. A run folder holds:

  config.yaml        the resolved recipe (written once; a resumed run keeps it)
  status.json        state (running/stopped/failed/finished), stage, epoch, pid, error; merged on every update
  train.log          timestamped progress lines
  metrics.csv        one row per finished epoch, across stages
  checkpoint.pt      what --resume needs (model, optimizer, scheduler, loop state); loaded with weights_only=True
  best_stage<i>.safetensors   the best validation epoch of stage i
  splits/<i>_<stage>.csv       each stage's patient-level split
  val_report.json, test_report.json, bundle/   the results
  stop.request       a stop request (the app's Stop button, or any tool): the trainer stops at its next step
  launch.json, console.log     how the app started the process, and that process's stdout/stderr

A cross-validated run (core.cv) holds, instead of the checkpoint, splits and val_report.json:

  folds.csv                    the fold of every photo (-1: a test photo), written once: a resume reuses it
  folds/fold_<k>/              fold k's own run folder (all of the above; its status and log lines are mirrored
                               into the top folder's, and a stop request in the top folder stops it too)
  oof_predictions.csv          every non-test photo's out-of-fold probability and logit
  cv_report.json               per-fold and out-of-fold metrics (an evaluation report of the out-of-fold rows)
  test_report.json, bundle/    the ensemble of the fold models, evaluated once on the test patients

Every write is atomic (core.fileio), so a reader polling the folder never sees half a file.
"""
from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from core.fileio import atomic_write, atomic_write_json, atomic_write_text, read_json_or_none, to_jsonable

CONFIG = "config.yaml"
STATUS = "status.json"
LOG = "train.log"
METRICS = "metrics.csv"
CHECKPOINT = "checkpoint.pt"
SPLITS = "splits"
VAL_REPORT = "val_report.json"
TEST_REPORT = "test_report.json"
BUNDLE = "bundle"
STOP = "stop.request"
LAUNCH = "launch.json"
CONSOLE = "console.log"
FOLDS = "folds.csv"
FOLD_RUNS = "folds"
OOF = "oof_predictions.csv"
PAIR_RUNS = "nested"                     # a nested cross-validation's pair runs (core.nested)
NESTED_OOF = "nested_oof_predictions.csv"
CV_REPORT = "cv_report.json"
MARKERS = (STATUS, LAUNCH, CONFIG)  # a folder holding any of these is a run folder


def best_path(run: str | Path, stage: int) -> Path:
    return Path(run) / f"best_stage{stage}.safetensors"


def split_path(run: str | Path, stage: int, name: str) -> Path:
    return Path(run) / SPLITS / f"{stage}_{name}.csv"


def is_run_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and not path.name.startswith(".") and any((path / f).exists() for f in MARKERS)


def has_bundle(run: str | Path) -> bool:
    from core.bundle import META_FILE  # here, not at the top: core.bundle imports this module (BUNDLE)
    return (Path(run) / BUNDLE / META_FILE).is_file()


def has_checkpoint(run: str | Path) -> bool:
    return (Path(run) / CHECKPOINT).is_file()


# ---------------------------------------------------------------- cross-validation
def fold_path(run: str | Path, k: int) -> Path:
    return Path(run) / FOLD_RUNS / f"fold_{k}"


def pair_path(run: str | Path, k: int, j: int) -> Path:
    """The run of the model that leaves out folds k and j (k < j) of a nested cross-validation."""
    return Path(run) / PAIR_RUNS / f"pair_{k}_{j}"


def is_cv_run(run: str | Path) -> bool:
    return (Path(run) / FOLDS).is_file()


def holds_run(run: str | Path) -> bool:
    """Training started here and can be resumed: a checkpoint, or a cross-validation's fold assignment."""
    return has_checkpoint(run) or is_cv_run(run)


def write_folds(run: str | Path, df: pd.DataFrame) -> None:
    """The fold assignment (image, label, group columns, split, fold), written once so a resume reuses it."""
    keep = [c for c in ("image", "label", "patient_id", "lesion_id", "split", "fold") if c in df]
    atomic_write(Path(run) / FOLDS, lambda tmp: df[keep].to_csv(tmp, index=False))


def read_folds(run: str | Path) -> pd.DataFrame | None:
    path = Path(run) / FOLDS
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"image": str, "patient_id": str, "lesion_id": str, "split": str})


def write_oof(run: str | Path, df: pd.DataFrame) -> None:
    atomic_write(Path(run) / OOF, lambda tmp: df.to_csv(tmp, index=False))


def read_oof(run: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run) / OOF, dtype={"image": str, "patient_id": str})


def write_nested_oof(run: str | Path, df: pd.DataFrame) -> None:
    atomic_write(Path(run) / NESTED_OOF, lambda tmp: df.to_csv(tmp, index=False))


def read_nested_oof(run: str | Path) -> pd.DataFrame | None:
    path = Path(run) / NESTED_OOF
    return pd.read_csv(path, dtype={"image": str, "patient_id": str}) if path.is_file() else None


# ---------------------------------------------------------------- status
def read_status(run: str | Path) -> dict:
    """status.json, or {} when there is none yet (or it is unreadable)."""
    status = read_json_or_none(Path(run) / STATUS)
    return status if isinstance(status, dict) else {}


def update_status(run: str | Path, **fields) -> dict:
    """Merge fields into status.json, stamping the time and this process's pid; a state other than 'failed'
    drops an earlier error (a resumed run must not keep showing the failure it recovered from)."""
    status = read_status(run)
    status.update(fields, updated=time.time(), pid=os.getpid())
    if status.get("state") != "failed":
        status.pop("error", None)
    atomic_write_json(Path(run) / STATUS, status, indent=1)
    return status


# ---------------------------------------------------------------- log
def append_log(run: str | Path, line: str) -> None:
    with open(Path(run) / LOG, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def log_tail(run: str | Path, name: str = LOG, lines: int = 30, max_bytes: int = 64_000) -> str:
    """The last lines of a log in the run folder (train.log, or console.log), reading at most max_bytes."""
    try:
        with open(Path(run) / name, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------- metrics
def write_metrics(run: str | Path, rows: list[dict]) -> None:
    """The whole per-epoch history (rewritten each epoch, atomically: the app polls this file)."""
    atomic_write(Path(run) / METRICS, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))


def read_metrics(run: str | Path) -> pd.DataFrame:
    """metrics.csv (one row per epoch, with `step` = epochs counted across stages), or an empty frame."""
    try:
        df = pd.read_csv(Path(run) / METRICS)
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return pd.DataFrame()
    if {"stage", "epoch"} <= set(df.columns):
        df["step"] = range(1, len(df) + 1)
    return df


def read_fold_metrics(run: str | Path) -> pd.DataFrame:
    """A cross-validation's fold runs' metrics.csv, one frame with a `fold` column (empty when there are none)."""
    parts = []
    for k in range(len(list((Path(run) / FOLD_RUNS).glob("fold_*")))):
        m = read_metrics(fold_path(run, k))
        if not m.empty:
            parts.append(m.assign(fold=k))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# ---------------------------------------------------------------- config
def write_config(run: str | Path, text: str) -> None:
    atomic_write_text(Path(run) / CONFIG, text)


def read_config(run: str | Path) -> dict:
    """config.yaml as a dict ({} when there is none or it is unreadable)."""
    try:
        raw = yaml.safe_load((Path(run) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, dict) else {}


# ---------------------------------------------------------------- checkpoint
class CheckpointError(ValueError):
    """A run's checkpoint that cannot be read back (a damaged disk or a copy cut short; writes are atomic)."""


def save_checkpoint(run: str | Path, model: dict, optimizer: dict, scheduler: dict, state: dict) -> None:
    """State dicts (tensors) plus the loop state as JSON text: loadable with weights_only=True."""
    blob = {"model": model, "optimizer": optimizer, "scheduler": scheduler,
            "state": json.dumps(state, default=to_jsonable)}
    atomic_write(Path(run) / CHECKPOINT, lambda tmp: torch.save(blob, tmp))


def load_checkpoint(run: str | Path) -> dict | None:
    """{'model', 'optimizer', 'scheduler', 'state' (a dict)} or None; never unpickles code."""
    path = Path(run) / CHECKPOINT
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return {**blob, "state": json.loads(blob["state"])}
    except pickle.UnpicklingError as e:  # weights_only refused it: it carries code, which is never run
        raise CheckpointError(f"{path}: refused, it holds more than tensors and plain data ({str(e)[:200]})") from e
    except Exception as e:  # noqa: BLE001 - a cut file raises RuntimeError, EOFError, KeyError... for one cause
        raise CheckpointError(f"{path}: damaged, it cannot be resumed ({type(e).__name__}: {str(e)[:200]}); start "
                              "the run again in a new --out") from e


def load_best(run: str | Path, stage: int) -> dict:
    """A stage's best-epoch weights (safetensors: never code), or CheckpointError naming the damaged file."""
    from safetensors.torch import load_file
    path = best_path(run, stage)
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a cut or missing file raises SafetensorError, OSError...: one cause
        raise CheckpointError(f"{path}: damaged or missing, the stage's best epoch cannot be read back "
                              f"({type(e).__name__}: {str(e)[:200]}); start the run again in a new --out") from e


# ---------------------------------------------------------------- stop requests
def request_stop(run: str | Path, by: str = "") -> None:
    """Ask the trainer to stop at its next step boundary (it saves its state first). Works on every OS and from
    any process that can write the folder; under DDP every rank sees it and they stop at the same step."""
    atomic_write_json(Path(run) / STOP, {"requested": time.time(), "by": by or f"pid {os.getpid()}"})


def stop_requested(run: str | Path) -> bool:
    return (Path(run) / STOP).exists()


def clear_stop(run: str | Path, older_than: float | None = None) -> None:
    """Remove the stop request (all of it, or only one made before `older_than`, e.g. this process's start:
    a request left by a run that was killed before it could act must not stop the next one)."""
    path = Path(run) / STOP
    if older_than is not None:
        try:
            if path.stat().st_mtime >= older_than:
                return
        except OSError:
            return
    path.unlink(missing_ok=True)


# ---------------------------------------------------------------- launch record (written by core.jobs)
def read_launch(run: str | Path) -> dict:
    launch = read_json_or_none(Path(run) / LAUNCH)
    return launch if isinstance(launch, dict) else {}


def write_launch(run: str | Path, record: dict[str, Any]) -> None:
    atomic_write_json(Path(run) / LAUNCH, record, indent=1)


# ---------------------------------------------------------------- the trainer's view
PROGRESS = ("stage", "stage_name", "epoch", "epochs")  # the status fields a fold run mirrors into its parent


class RunFolder:
    """The trainer's handle on its run folder. Under DDP only the global-zero process writes (is_main); the others
    only read (checkpoint) and look for stop requests.

    A fold run of a cross-validation has a `parent` (the top run folder): its log lines and its stage/epoch also go
    there, tagged, so the app watching the top folder sees them; a stop request in either folder stops it."""

    def __init__(self, out: str | Path, is_main: bool = True, parent: str | Path | None = None):
        self.out = Path(out)
        self.is_main = is_main
        self.parent = Path(parent) if parent is not None else None
        if is_main:
            (self.out / SPLITS).mkdir(parents=True, exist_ok=True)

    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        append_log(self.out, line)
        if self.parent is not None:
            line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{self.out.name}] {msg}"
            append_log(self.parent, line)
        print(line, flush=True)

    def status(self, **fields) -> None:
        if not self.is_main:
            return
        update_status(self.out, **fields)
        progress = {k: v for k, v in fields.items() if k in PROGRESS}
        if self.parent is not None and progress:
            update_status(self.parent, **progress)

    def write_config(self, text: str) -> None:
        if self.is_main:
            write_config(self.out, text)

    def write_metrics(self, rows: list[dict]) -> None:
        if not self.is_main:
            return
        try:
            write_metrics(self.out, rows)
        except PermissionError as e:  # Windows: metrics.csv open in Excel. The checkpoint has every epoch already.
            self.log(f"{METRICS} could not be written ({e.strerror or e}; is it open in another program?): the "
                     "training goes on, and the file is written again after the next epoch")

    def save_checkpoint(self, model, optimizer, scheduler, state: dict) -> None:
        if self.is_main:
            save_checkpoint(self.out, model.state_dict(), optimizer.state_dict(),
                            scheduler.state_dict() if scheduler else {}, state)

    def load_checkpoint(self) -> dict | None:
        return load_checkpoint(self.out)

    def has_checkpoint(self) -> bool:
        return has_checkpoint(self.out)

    def best_path(self, stage: int) -> Path:
        return best_path(self.out, stage)

    def load_best(self, stage: int) -> dict:
        return load_best(self.out, stage)

    def split_path(self, stage: int, name: str) -> Path:
        return split_path(self.out, stage, name)

    def stop_requested(self) -> bool:
        return self.stop_folder() is not None

    def stop_folder(self) -> Path | None:
        """The folder holding a stop request for this run (its own, else its parent's), or None."""
        return next((d for d in (self.out, self.parent) if d is not None and stop_requested(d)), None)

    def clear_stop(self, older_than: float | None = None) -> None:
        if self.is_main:
            clear_stop(self.out, older_than)
