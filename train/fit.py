"""Command line: train a run from a YAML recipe (`python -m train.fit --config train/configs/X.yaml`)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

# Before torch is imported (libgomp reads it once): OpenMP threads that finish a parallel region early sleep instead
# of spinning. On a CPU shared with other work a spinning thread burns the core its partner needs, and a fine-tune
# epoch runs far slower (benchmarks/README.md, "Training throughput on a CPU"). Results are unchanged: the work is
# split the same way. An OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from core import runfolder  # noqa: E402
from core.config import ConfigError, apply_override, run_config_from_dict  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.fit", description=__doc__)
    p.add_argument("--config", help="YAML recipe (train/configs/*.yaml); with --resume, defaults to the run's own")
    p.add_argument("--out", help="run folder to write (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue a killed or stopped run in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stages.1.lr=1e-4 (repeatable)")
    for flag in ("name", "backbone", "weights", "init_from", "device", "precision"):
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, help=f"override '{flag}'")
    p.add_argument("--data-root", dest="data_root", help="folder the recipe's relative data paths live in "
                                                           "(overrides the recipe's data_root)")
    p.add_argument("--epochs", type=int, help="override every stage's epochs")
    p.add_argument("--folds", type=int, help="cross-validation: K >= 2 patient-grouped folds of the non-test "
                                             "patients, one run per fold, their models saved as one ensemble "
                                             "(overrides the recipe's cv.folds; 0 = one validation split)")
    p.add_argument("--nested", action=argparse.BooleanOptionalAction, default=None,
                   help="nested cross-validation (needs >= 3 folds): one more run per pair of folds, so the "
                        "ensemble's threshold and calibration are fitted on scores of ensembles that never trained "
                        "on the photo (overrides the recipe's cv.nested)")
    p.add_argument("--check", action="store_true",
                   help="build the config and look up every data file, the weights and the run to start from, "
                        "name every problem, then exit without training (the Train page runs this first)")
    p.add_argument("--devices", type=int, help="GPUs (or CPU processes) per node")
    p.add_argument("--num-nodes", type=int, dest="num_nodes")
    return p


def load_raw(args) -> dict:
    config = args.config
    if args.resume and not config and args.out:
        config = str(Path(args.out) / runfolder.CONFIG)
    if not config:
        raise ConfigError("--config is required (or --resume --out RUN)")
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML in UTF-8 ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of settings (name:, backbone:, stages: ...), not a "
                          f"{type(raw).__name__}")
    if args.resume and not args.config:
        raw = _as_recipe(raw)
    if args.init_from:  # starting from a run replaces the recipe's own starting model
        for key in ("weights", "head", "input_size"):
            raw.pop(key, None)
    for key in ("name", "backbone", "weights", "init_from", "device", "precision", "devices", "num_nodes",
                "data_root"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    if args.epochs is not None:
        for s in raw.get("stages", []):
            s["epochs"] = args.epochs
    if args.folds is not None:
        raw["cv"] = {**(raw.get("cv") or {}), "folds": args.folds}
    if args.nested is not None:
        raw["cv"] = {**(raw.get("cv") or {}), "nested": args.nested}
    for item in args.set:
        apply_override(raw, item)
    raw.setdefault("name", path.stem)
    return raw


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from core.backbones import WeightsError
    from core.bundle import BundleError
    from core.images import ImageLoadError
    from core.manifest import ManifestError
    from core.runfolder import CheckpointError
    from core.training import Stopped, fit
    try:
        cfg = run_config_from_dict(load_raw(args))
        out = Path(args.out or Path("runs") / cfg.name)
        from core.cv import is_main_process
        # (the ranks a DDP launch starts later find rank 0's files already there: only rank 0 checks)
        if not args.resume and runfolder.holds_run(out) and is_main_process():
            raise ConfigError(f"{out} already holds a run; use --resume to continue it or pick another --out")
        if args.resume and runfolder.is_cv_run(out) != cfg.cv.enabled and runfolder.holds_run(out):
            kind = "a cross-validation" if runfolder.is_cv_run(out) else "a single-split"
            raise ConfigError(f"{out} holds {kind} run: resume it with its own config (without changing --folds)")
        if args.resume and (changed := _changed_on_resume(out, cfg)):
            raise ConfigError(f"{out} was started with another config ({', '.join(changed[:8])} differ"
                              f"{', ...' if len(changed) > 8 else ''}); a run resumes with the config it started with: "
                              f"python -m train.fit --resume --out {out} (device and precision may change), or start "
                              "a new run with the new config")
        if args.check:
            return _report_check(cfg)
        _check_device(cfg.device)
        if cfg.cv.enabled:
            from core.cv import fit_cv
            bundle = fit_cv(cfg, out, resume=args.resume)
        else:
            bundle = fit(cfg, out, resume=args.resume)
    except (ConfigError, ManifestError, WeightsError, BundleError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImageLoadError as e:  # a photo damaged after the pre-check decoded it, found when a batch reads it
        print(f"error: {e}. Put a good copy of that photo in its place and continue with --resume (the run keeps "
              "its last checkpoint and its splits), or leave it out of the data and start a new run",
              file=sys.stderr)
        return 2
    except (Stopped, KeyboardInterrupt):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank:  # a non-zero exit here makes Lightning's launcher SIGKILL rank 0 while it saves its state
            print(f"rank {local_rank}: stopped with the run", file=sys.stderr)
            return 0
        print("stopped; continue with --resume", file=sys.stderr)
        return 130
    print(f"bundle: {bundle}")
    return 0


def _check_device(preference: str) -> None:
    """A device asked for that this machine lacks, as a config error (not a traceback from inside the run)."""
    from core.device import pick_device
    try:
        pick_device(preference)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None


def _as_recipe(saved: dict) -> dict:
    """A run's config.yaml read back as a recipe. A transfer run's model settings (weights, head, input size) come
    from the run it started from, and a recipe with init_from must leave them out: the Train page's Resume of such
    a run was refused ('init_from fixes the model')."""
    if saved.get("init_from"):
        return {k: v for k, v in saved.items() if k not in ("weights", "head", "input_size")}
    return saved


def _changed_on_resume(out: Path, cfg) -> list[str]:
    """What a resume's config would change in the run's own (config.yaml), beyond device and precision. The saved
    config is rebuilt first, so a key added to the tool after the run started counts as its default, not a change."""
    from core.config import changed_settings
    started = runfolder.read_config(out)
    if not started:
        return []
    try:
        started = run_config_from_dict(_as_recipe(started)).to_dict()
    except (TypeError, ValueError):  # ConfigError too: a config an older version wrote that no longer builds
        pass
    return changed_settings(started, cfg.to_dict())


def _report_check(cfg) -> int:
    """--check: every missing input named on stderr (exit 2), or 'ok' (exit 0)."""
    from core.training import input_problems
    problems = input_problems(cfg)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(f"ok: {cfg.name} can start ({len(cfg.stages)} stage(s))")
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
