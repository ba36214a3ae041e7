"""One readable training loop: a chain of stages under Lightning Fabric, best epoch on validation, resumable."""
from __future__ import annotations

import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from lightning_fabric import Fabric
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler

from core import metrics
from core.backbones import BACKBONES, get_spec
from core.cache import DecodeCache, MemoryCache
from core.bundle import BundleError, BundleMeta, Provenance, Threshold, load_bundle, read_meta, save_bundle
from core.config import ConfigError, DataSource, RunConfig, StageConfig
from core.context_fit import fit_context
from core.dataset import ManifestDataset, check_images
from core.scores import sigmoid
from core.device import dataloader_workers, fabric_precision, hardware_record, pick_device
from core.evaluation import build_report
from core.fileio import atomic_write, atomic_write_json, report_data
from core.manifest import file_sha256, import_csv, read_manifest, write_manifest
from core.model import LesionClassifier
from core.runfolder import BUNDLE, CHECKPOINT, TEST_REPORT, VAL_REPORT, RunFolder
from core.splits import FixedSplit, assign_splits, split_counts
from core.trust import attach, features_and_logits, fit_trust, quality_of, summary_lines, trust_report
from core.transforms import eval_transform, train_transform


class Stopped(Exception):
    """The run was asked to stop: a stop request in the run folder (the app's Stop button), SIGTERM or Ctrl-C."""


# ---------------------------------------------------------------- data
def load_source(src: DataSource) -> tuple[pd.DataFrame, dict]:
    """A stage's data source as manifest rows, plus its provenance (path and content hash)."""
    if src.manifest:
        df = read_manifest(src.manifest)
        prov = {"manifest": src.manifest, "sha256": file_sha256(src.manifest)}
    elif src.metadata:
        from core import sources
        importer = {"pad_ufes": sources.import_pad_ufes, "isic": sources.import_isic,
                    "midas": sources.import_midas}[src.importer]
        df, report = importer(src.metadata, src.images)
        prov = {"metadata": src.metadata, "importer": src.importer, "images": src.images,
                "sha256": file_sha256(src.metadata), **_dropped(report)}
    else:
        df, report = import_csv(src.csv, src.images, image_col=src.image_col, label_col=src.label_col,
                                patient_col=src.patient_col)
        prov = {"csv": src.csv, "images": src.images, "sha256": file_sha256(src.csv), **_dropped(report)}
    if src.domain:
        df["domain"] = src.domain
    prov.update(images=int(len(df)), malignant=int(df["label"].sum()), domain=src.domain)
    return df, prov


def _dropped(report, keep: int = 20) -> dict:
    """An import's drops for the provenance and the log: counts per reason and up to `keep` names each (the run
    log names them; `python -m train.data` writes the whole list)."""
    named: dict[str, list[str]] = {}
    for what, reason in report.named:
        if len(named.setdefault(reason, [])) < keep:
            named[reason].append(what)
    return {"dropped": report.dropped, "dropped_named": named}


def dropped_lines(sources: list[dict]) -> list[str]:
    """One log line per reason a stage's sources dropped files or rows, naming them (up to 20)."""
    lines = []
    for src in sources:
        where = Path(str(src.get("csv") or src.get("metadata") or src.get("manifest") or "?")).name
        for reason, n in (src.get("dropped") or {}).items():
            names = (src.get("dropped_named") or {}).get(reason, [])
            more = f" and {n - len(names)} more" if n > len(names) else ""
            named = f": {', '.join(map(str, names))}{more}" if names else ""
            lines.append(f"  {where}: dropped {n}, {reason}{named}")
    return lines


def check_source_exists(src: DataSource, data_help: str | None) -> None:
    """A missing data file or folder is named with where to get it, before any import starts."""
    for key in ("manifest", "csv", "metadata", "images"):
        path = getattr(src, key)
        if path and not Path(path).exists():
            hint = f" {data_help}" if data_help else ""
            raise ConfigError(f"data {key} not found: {path} (from {Path.cwd()}).{hint} Point the recipe at your "
                              f"copy with --data-root DIR (or the Train page's data folder).")


def input_problems(cfg: RunConfig) -> list[str]:
    """Every input a run reads before its first epoch that is missing or unusable, each in words: data files and
    folders (with where to get them), the initial weights file, the run to start from; [] when all are there."""
    problems, seen = [], set()
    for source in (src for stage in cfg.stages for src in stage.data):
        if source not in seen:
            seen.add(source)
            try:
                check_source_exists(source, None)
            except ConfigError as e:
                problems.append(str(e))
    if cfg.init_from:
        try:
            meta = read_meta(cfg.init_from)
            if meta.backbone.get("name") != cfg.backbone:
                problems.append(f"init_from {cfg.init_from} is a {meta.backbone.get('name')} model but the config "
                                f"asks for {cfg.backbone}")
        except BundleError as e:
            problems.append(f"init_from {cfg.init_from}: {e}")
    elif cfg.weights not in ("imagenet", "none") and not Path(cfg.weights).is_file():
        problems.append(f"weights file not found: {cfg.weights} (use 'imagenet', 'none' or a file path)")
    elif cfg.weights == "imagenet" and not BACKBONES[cfg.backbone].downloadable:
        problems.append(BACKBONES[cfg.backbone].no_download_reason())
    try:
        pick_device(cfg.device)
    except RuntimeError as e:  # 'cuda' on a machine without one
        problems.append(str(e))
    if problems and cfg.data_help and any(p.startswith("data ") for p in problems):
        problems.append(f"where to get the data: {cfg.data_help}")
    return problems


def stage_rows(cfg: RunConfig) -> tuple[list[tuple[pd.DataFrame, list[dict]]], pd.DataFrame]:
    """Every stage's rows and sources, imported (a shared source once), and their union (each image once)."""
    loaded: dict[DataSource, tuple[pd.DataFrame, dict]] = {}  # stages often share a source: import it once
    stages = []
    for stage in cfg.stages:
        for source in stage.data:
            if source not in loaded:
                check_source_exists(source, cfg.data_help)
                loaded[source] = load_source(source)
        parts = [loaded[source] for source in stage.data]
        stages.append((pd.concat([p[0] for p in parts], ignore_index=True), [p[1] for p in parts]))
    union = pd.concat([df for df, _ in stages], ignore_index=True).drop_duplicates("image", ignore_index=True)
    return stages, union


def run_data(cfg: RunConfig, split: FixedSplit | None = None) -> tuple[list[tuple[pd.DataFrame, list[dict]]], str]:
    """Every stage's rows, split once for the whole run: a patient held out for validation or test in the
    last stage was never trained on in an earlier stage either. `split` (a cross-validation fold) replaces the
    split made here from cfg.split."""
    stages, union = stage_rows(cfg)
    union, how = split.apply(union) if split is not None else assign_splits(union, cfg.split)
    check_images(union)
    split_of = dict(zip(union["image"], union["split"]))
    return [(df.assign(split=df["image"].map(split_of)), sources) for df, sources in stages], how


# ---------------------------------------------------------------- run folder state
@dataclass
class RunState:
    """What a killed run needs to resume; saved after every epoch (core.runfolder's checkpoint)."""
    stage: int = 0
    epoch: int = -1                 # last completed epoch of `stage`
    best_score: list = field(default_factory=lambda: [-np.inf, -np.inf])
    best_epoch: int = -1
    history: list = field(default_factory=list)
    stage_prov: list = field(default_factory=list)
    hardware: list = field(default_factory=list)  # core.device.hardware_record of each machine the run trained on




# ---------------------------------------------------------------- the loop
def _score(m: dict, select: str) -> list[float]:
    """Selection key: the chosen validation metric, recall as tie-break; undefined counts as worst."""
    return [metrics.selection_score(m, select), metrics.selection_score(m, "recall")]


def _make_scheduler(optimizer, stage: StageConfig):
    if stage.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=1)
    if stage.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=stage.epochs)
    return None


def _progress(iterable, total, desc, fabric):
    if sys.stderr.isatty() and fabric.is_global_zero:
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False)
    return iterable


def train_epoch(fabric, model, optimizer, loader, channels_last: bool, desc: str) -> float:
    model.train()
    total, n = 0.0, 0
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for x, y, _ in _progress(loader, len(loader), desc, fabric):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x).squeeze(1)
        loss = loss_fn(logits.float(), y.float())
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        optimizer.step()
        total += float(loss.detach()) * len(y)
        n += len(y)
        check_stop(fabric)
    return float(fabric.all_reduce(torch.tensor(total / max(n, 1)), reduce_op="mean"))


@torch.no_grad()
def predict_loader(fabric, model, loader, n: int, channels_last: bool) -> tuple[np.ndarray, float]:
    """Probabilities in dataset order (gathered across ranks; the distributed sampler's padding is dropped)."""
    model.eval()
    probs, idxs, losses = [], [], []
    for x, y, idx in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x).squeeze(1).float()
        losses.append(torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float(), reduction="sum"))
        probs.append(torch.sigmoid(logits))
        idxs.append(idx.to(logits.device))
    p, i = fabric.all_gather(torch.cat(probs)), fabric.all_gather(torch.cat(idxs))
    loss = fabric.all_reduce(torch.stack(losses).sum(), reduce_op="sum")
    out = np.full(n, np.nan)
    out[i.reshape(-1).cpu().numpy()] = p.reshape(-1).cpu().numpy()
    return out, float(loss) / n


def _loaders(fabric, df, stage, pp, workers, cache=None, seed: int = 0):
    """Training and validation loaders. Nothing in the training loader draws from the global RNG (that would make
    a resumed run's dropout masks differ): its shuffle is a DistributedSampler, also for one process, ordered by
    (seed, epoch); its augmentations are seeded per item (ManifestDataset.set_augment_seed); the workers' base
    seed comes from a private generator. Both keep their workers between epochs."""
    train_df, val_df = df[df["split"] == "train"], df[df["split"] == "val"]
    mk = lambda part, tf, **kw: DataLoader(  # noqa: E731
        ManifestDataset(part, tf, short_side=pp.resize_to, cache=cache, interpolation=pp.interpolation),
        batch_size=stage.batch_size, num_workers=workers, persistent_workers=workers > 0, **kw)
    sampler = DistributedSampler(range(len(train_df)), num_replicas=fabric.world_size, rank=fabric.global_rank,
                                 shuffle=True, seed=seed)
    train = mk(train_df, train_transform(pp, stage.augment), sampler=sampler, generator=torch.Generator(),
               drop_last=len(train_df) > stage.batch_size * fabric.world_size)
    val = mk(val_df, eval_transform(pp))
    train = fabric.setup_dataloaders(train, use_distributed_sampler=False)
    val = fabric.setup_dataloaders(val)  # Fabric shards validation across ranks (predict_loader gathers it)
    return (train, val), train_df, val_df


def seed_epoch(fabric, loader, seed: int, stage: int, epoch: int) -> None:
    """Seed every RNG from (seed, stage, epoch) alone, so a resumed run draws the same shuffle, augmentations and
    dropout masks as an uninterrupted one (seeding once per process would replay epoch 0's after a resume)."""
    epoch_seed = int(np.random.SeedSequence([seed, stage, epoch]).generate_state(1)[0])
    fabric.seed_everything(epoch_seed, verbose=False)
    if hasattr(getattr(loader, "dataset", None), "set_augment_seed"):
        loader.dataset.set_augment_seed(epoch_seed)
    if hasattr(loader, "_num_iter_calls"):
        # Fabric passes its own count of iterations over this loader to DistributedSampler.set_epoch; that count
        # restarts with every process, so set it to the run's epoch (lightning-fabric 2.6 keeps it here).
        loader._num_iter_calls = epoch


def run_stage(fabric, rf: RunFolder, cfg: RunConfig, model: LesionClassifier, i: int, state: RunState,
              data, resume_blob=None) -> None:
    stage = cfg.stages[i]
    (df, sources), how = data[0][i], data[1]
    if fabric.is_global_zero:
        write_manifest(df, rf.split_path(i, stage.name), relative=False)  # the run folder may move
    counts = split_counts(df)
    rf.log(f"stage {i} '{stage.name}': {len(df)} images; split {how}; {counts}"
           + "".join(f"\n{line}" for line in dropped_lines(sources)))
    model.freeze_backbone(stage.freeze_backbone)
    model.set_dropout(stage.dropout)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
    wrapped, optimizer = fabric.setup(model, optimizer)  # re-set up each stage: the trainable set changed
    scheduler = _make_scheduler(optimizer, stage)
    if resume_blob is not None:  # after setup: load_state_dict puts Adam's state on the parameters' device
        optimizer.load_state_dict(resume_blob["optimizer"])
        if scheduler:
            scheduler.load_state_dict(resume_blob["scheduler"])
    workers = cfg.num_workers if cfg.num_workers is not None else dataloader_workers(cfg.devices)
    cache = MemoryCache(DecodeCache(cfg.decode_cache) if cfg.decode_cache else None)  # decode once per stage
    stage_seed = int(np.random.SeedSequence([cfg.seed, i]).generate_state(1)[0])
    (train_dl, val_dl), _, val_df = _loaders(fabric, df, stage, model.spec.preprocessing, workers, cache,
                                             stage_seed)
    best_path = rf.best_path(i)
    if len(state.stage_prov) <= i:
        state.stage_prov.append({"name": stage.name, "data": sources, "split": how, "split_counts": counts,
                                 "recipe": asdict(stage)})
    y_val = val_df["label"].to_numpy()
    for epoch in range(state.epoch + 1, stage.epochs):
        t0 = time.time()
        rf.status(state="running", stage=i, stage_name=stage.name, epoch=epoch, epochs=stage.epochs)
        seed_epoch(fabric, train_dl, cfg.seed, i, epoch)
        loss = train_epoch(fabric, wrapped, optimizer, train_dl, cfg.channels_last, f"{stage.name} {epoch}")
        probs, val_loss = predict_loader(fabric, wrapped, val_dl, len(val_df), cfg.channels_last)
        m = metrics.point_metrics(y_val, probs, 0.5) | {"loss": val_loss}
        score = _score(m, cfg.select_metric)
        if scheduler is not None:
            scheduler.step(score[0]) if stage.scheduler == "plateau" else scheduler.step()
        row = {"stage": i, "stage_name": stage.name, "epoch": epoch, "train_loss": loss, "val_loss": val_loss,
               **{f"val_{k}": m[k] for k in ("roc_auc", "recall", "specificity", "accuracy")},
               "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1)}
        state.history.append(row)
        if score > state.best_score or state.best_epoch < 0:  # an undefined score still keeps the first epoch
            state.best_score, state.best_epoch = score, epoch
            if fabric.is_global_zero:  # atomic: a kill mid-write must not leave a truncated best file
                weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                atomic_write(best_path, lambda tmp: save_file(weights, str(tmp)))
        state.epoch = epoch
        rf.save_checkpoint(model, optimizer, scheduler, asdict(state))
        rf.write_metrics(state.history)  # after the checkpoint: an epoch in metrics.csv is one a resume keeps
        rf.log(f"stage {i} epoch {epoch}: train_loss {loss:.4f} val_loss {val_loss:.4f} "
               f"val_auc {_fmt(m['roc_auc'])} val_recall {_fmt(m['recall'])} ({row['seconds']}s)")
        check_stop(fabric)  # a request during validation: stop after this epoch's checkpoint
    fabric.barrier()
    model.load_state_dict(rf.load_best(i))  # the stage ends on its best validation epoch
    state.stage_prov[i]["best_epoch"] = state.best_epoch
    rf.log(f"stage {i} done: best epoch {state.best_epoch} (validation {cfg.select_metric})")


def _fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def initial_model(cfg: RunConfig, resuming: bool = False) -> tuple[LesionClassifier, BundleMeta | None]:
    """The starting model: a previous run's bundle, or the backbone with its weights (random when resuming,
    since the checkpoint replaces them: an offline resume must not need a download)."""
    if cfg.init_from:
        b = load_bundle(cfg.init_from)
        if b.spec.name != cfg.backbone:
            raise ValueError(f"init_from {cfg.init_from} is a {b.spec.name} model but the config asks for "
                             f"{cfg.backbone}")
        return b.model, b.meta
    spec = get_spec(cfg.backbone)
    if cfg.input_size:
        spec = replace(spec, preprocessing=replace(spec.preprocessing, input_size=cfg.input_size))
    return LesionClassifier(spec, cfg.head, weights="none" if resuming else cfg.weights), None


_STOP_SIGNALS: list[int] = []  # signals received under DDP, not yet acted on (see check_stop)
_STOP_RUN: list[RunFolder] = []  # the run whose folder check_stop looks in for a stop request


def _install_stop_handler(distributed: bool) -> None:
    """SIGTERM (SLURM, `kill`) stops the run. One process raises Stopped at once; under DDP the signal is only
    recorded, and every rank stops together at the next check_stop. The app does not signal: it writes a stop
    request into the run folder (core.runfolder.request_stop), which works the same on Linux, macOS and Windows."""
    _STOP_SIGNALS.clear()

    def handler(signum, frame):
        if not distributed:
            raise Stopped(f"signal {signum}")
        _STOP_SIGNALS.append(signum)
    signal.signal(signal.SIGTERM, handler)
    if distributed:  # Ctrl-C reaches every rank at a different point: treat it the same way
        signal.signal(signal.SIGINT, handler)


def _watch_stop_requests(rf: RunFolder) -> None:
    """Make check_stop look in rf's folder; drop a stop request older than this process (one left by a run that
    was killed before it could act on it must not stop this one)."""
    import psutil
    rf.clear_stop(older_than=psutil.Process().create_time())
    _STOP_RUN[:] = [rf]


def _stop_reason() -> str | None:
    if _STOP_SIGNALS:
        return f"signal {_STOP_SIGNALS[0]}"
    folder = _STOP_RUN[0].stop_folder() if _STOP_RUN else None
    if folder is not None:
        return f"stop requested in the run folder ({folder.name})"
    return None


def check_stop(fabric) -> None:
    """Raise Stopped at a step boundary once a stop was requested: after data import, after every training step
    and after each epoch's checkpoint. Under DDP every rank raises at the same step once any rank saw a request (a
    signal, or the stop file: each rank looks, ranks on other nodes may see it a step later). A rank that left on
    its own would leave the others blocked in a collective (gloo fails with "connection closed", NCCL waits for
    its timeout)."""
    reason = _stop_reason()
    if fabric.world_size == 1:
        if reason:
            raise Stopped(reason)
        return
    flag = torch.tensor(float(reason is not None), device=fabric.device)
    if float(fabric.all_reduce(flag, reduce_op="sum")) > 0:
        raise Stopped(reason or "stop requested on another rank")


def fit(cfg: RunConfig, out: str | Path, resume: bool = False, *, split: FixedSplit | None = None,
        parent: str | Path | None = None) -> Path:
    """Train every stage, choose the threshold on validation, write the bundle and the validation report.

    A cross-validation (core.cv) runs each fold through here: `split` is the fold's split, `parent` the top run
    folder (its stop requests stop this run too; log lines and progress are mirrored there)."""
    accelerator = pick_device(cfg.device).type
    precision = fabric_precision(cfg.precision, accelerator)
    fabric = Fabric(accelerator=accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, precision=precision)
    fabric.launch()
    rf = RunFolder(out, is_main=fabric.is_global_zero, parent=parent)  # after launch: only rank 0 writes
    fabric.barrier()  # the folder exists before any rank reads from it
    fabric.seed_everything(cfg.seed)
    _install_stop_handler(distributed=fabric.world_size > 1)
    _watch_stop_requests(rf)
    if not resume:  # a resumed run keeps the config it started with
        rf.write_config(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    # what 'auto' resolved to: timings (and the last digits of results) differ between bf16 and fp32 machines
    rf.log(f"device {accelerator} x {fabric.world_size}, precision {precision}" +
           (" (auto)" if cfg.precision == "auto" else ""))
    t_start = time.time()
    try:
        data = run_data(cfg, split)
        model, parent_meta = initial_model(cfg, resuming=resume and rf.has_checkpoint())
        if cfg.grad_checkpointing:
            model.backbone.set_grad_checkpointing(True)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        state, blob = RunState(), None
        if resume and (blob := rf.load_checkpoint()):
            state = RunState(**blob["state"])
            model.load_state_dict(blob["model"])
            rf.log(f"resuming: stage {state.stage}, after epoch {state.epoch}")
        elif resume:  # killed before its first checkpoint, or the file was removed: said, not silently redone
            rf.log(f"resume: no {CHECKPOINT} in {out}, so the run starts again from its first epoch")
        here = hardware_record(accelerator, precision, cfg.precision, fabric.world_size)
        if not state.hardware or state.hardware[-1] != here:  # a run resumed on another machine records both
            state.hardware.append(here)
        rf.status(state="running", started=t_start)
        check_stop(fabric)  # a request during data import and set-up
        for i in range(state.stage, len(cfg.stages)):
            run_stage(fabric, rf, cfg, model, i, state, data, resume_blob=blob if i == state.stage else None)
            blob = None
            state.stage, state.epoch, state.best_score, state.best_epoch = i + 1, -1, [-np.inf, -np.inf], -1
        bundle = finish(fabric, rf, cfg, model, state, parent_meta, time.time() - t_start)
        if _stop_reason():
            rf.log("a stop was requested during the final report; the run finished first")
            rf.clear_stop()
        rf.status(state="finished", finished=time.time())
        return bundle
    except (Stopped, KeyboardInterrupt) as e:
        rf.log(f"stopped on request ({str(e) or type(e).__name__}); " + (
            "resume with --resume" if rf.has_checkpoint() else
            "no epoch of this run had finished, so nothing was saved to resume from"))  # a fold: its CV run resumes
        rf.status(state="stopped")
        rf.clear_stop()  # acted on: a resumed run starts clean
        raise
    except Exception as e:
        rf.log(f"failed: {type(e).__name__}: {e}")
        rf.status(state="failed", error=f"{type(e).__name__}: {e}")
        raise


def finish(fabric, rf, cfg, model, state, parent, seconds) -> Path:
    """Threshold and validation report from the last stage's validation split, then the bundle (rank 0).

    Validation probabilities here come from the same fp32 path as `train.evaluate`, so the stored
    threshold means the same thing wherever the model is evaluated."""
    fabric.barrier()
    if not fabric.is_global_zero:
        return rf.out / BUNDLE
    from core.evaluation import predict_probs
    last = len(cfg.stages) - 1
    df = read_manifest(rf.split_path(last, cfg.stages[last].name))
    val_df = df[df["split"] == "val"].reset_index(drop=True)
    model = model.to(memory_format=torch.contiguous_format)
    probs = predict_probs(model, val_df, device=fabric.device, num_workers=0)
    y = val_df["label"].to_numpy()
    t = cfg.threshold
    chosen = metrics.choose_threshold(y, probs, rule=t.rule, target=t.target)
    val_report = build_report(val_df, probs, chosen["threshold"], n_boot=cfg.n_boot, seed=cfg.seed, split="val")
    vm = val_report["metrics"]
    threshold = Threshold(value=float(chosen["threshold"]), rule=t.rule, target=t.target,
                          chosen_on="validation split of the last stage",
                          val_sensitivity=vm["recall"], val_specificity=vm["specificity"],
                          n_val=int(len(y)), n_val_malignant=int(y.sum()))
    provenance = _provenance(cfg, state, parent, vm, seconds)
    context = fit_context_stage(rf, cfg, val_report, fit_context, df[df["split"] == "train"], val_df,
                                probs) if cfg.context else None
    trust = fit_trust(model, df, device=fabric.device, seed=cfg.seed)  # gate, calibration, similar cases
    for note in trust.notes:
        rf.log(note)
    bundle = save_bundle(model, rf.out / BUNDLE, threshold=threshold, provenance=provenance, context=context,
                         gate=trust.gate, calibration=trust.calibration, similar=trust.similar)
    _log_trust(rf, trust)
    val_report["model"] = read_meta(bundle).summary()  # the same provenance block as every other report
    atomic_write_json(rf.out / VAL_REPORT, report_data(val_report), indent=1)
    rf.log("validation (last stage, chosen model, threshold from validation):\n" +
           metrics.format_table([(f"{cfg.name} (val)", vm)]))
    rf.log(f"trained in {seconds / 60:.1f} min; bundle: {bundle}")
    if cfg.report_test:
        report_test(rf, cfg, bundle, df)
    return bundle


def _log_trust(rf, trust) -> None:
    if trust.gate is not None:
        g = trust.gate
        rf.log(f"out-of-distribution gate: {g.method} (k={g.k}) on {g.n_reference} training photos; threshold "
               f"{g.threshold:.4g} accepts {g.accept_quantile:.1%} of {g.n_validation} validation photos")
    if trust.calibration is not None:
        c = trust.calibration
        rf.log(f"calibration: {c.method} (slope {c.slope:.3f}, intercept {c.intercept:.3f}) on {c.n} validation "
               f"photos; {c.chosen_by}")


def report_test(rf, cfg, bundle_path, df) -> None:
    """The chosen model, evaluated once on held-out patients (selection and threshold were fixed before)."""
    b = load_bundle(bundle_path)
    test_df = df[df["split"] == "test"].reset_index(drop=True)
    feats, logits = features_and_logits(b.model, test_df)
    probs = sigmoid(logits)
    report = build_report(test_df, probs, b.threshold, n_boot=cfg.n_boot, seed=cfg.seed,
                          model_meta=b.meta, split="test")
    attach(report, trust_report(test_df, logits, feats, b, quality_lists=quality_of(test_df, b.spec.preprocessing),
                                n_boot=cfg.n_boot, seed=cfg.seed))
    stage = b.meta.context
    if stage is not None:
        from core.context_report import context_report, format_context_table
        report["context"] = context_report(test_df, probs, b.threshold, stage, n_boot=cfg.n_boot, seed=cfg.seed)
    atomic_write_json(rf.out / TEST_REPORT, report_data(report), indent=1)
    rows = [(f"{cfg.name} (test)", report["metrics"])]
    if "accepted_metrics" in report["trust"]:
        rows.append((f"{cfg.name} (test, assessed only)", report["trust"]["accepted_metrics"]["metrics"]))
    rf.log("test (held-out patients):\n" + metrics.format_table(rows) + "\n" + "\n".join(summary_lines(report["trust"])))
    if stage is not None:
        rf.log("test, clinical context (held-out patients):\n" +
               format_context_table(report["context"], f"{cfg.name} (test)"))


def fit_context_stage(rf, cfg, report: dict, fit, *rows):
    """The optional context stage, `fit(*rows, fields, rule=..., ...)` (core.context_fit: fit_context on a single
    split, fit_context_cv on out-of-fold scores) with the recipe's fields and threshold rule.

    None when it cannot be fitted (no field with enough answers, a bad answer, one class): the run's image model is
    still saved, without the stage, and the log and the report (its `notes`) say why."""
    from core.context import ContextError
    t = cfg.threshold
    try:
        stage = fit(*rows, cfg.context.fields, rule=t.rule, target=t.target, n_boot=cfg.n_boot, seed=cfg.seed)
    except ContextError as e:
        note = f"context stage not fitted, the bundle has none (image model only): {e}"
        rf.log(note)
        report.setdefault("notes", []).append(note)
        return None
    th = stage.threshold
    rf.log(f"context stage: fields {', '.join(stage.fields)}; missing answers: {stage.missing_rule}; fused "
           f"threshold {th['value']:.3f} chosen on the {th['chosen_on']}: sensitivity "
           f"{th['val_sensitivity']['value']:.2f}, specificity {th['val_specificity']['value']:.2f}, ROC-AUC "
           f"{th['val_roc_auc']['value']:.3f}" + "".join(f"\n  left out {f}: {why}" for f, why in stage.excluded.items()))
    return stage


def _provenance(cfg, state, parent: BundleMeta | None, val_metrics, seconds) -> Provenance:
    import platform

    import timm
    return Provenance(
        run_name=cfg.name, weights=cfg.weights if not cfg.init_from else f"init_from {cfg.init_from}",
        data=[s["data"] for s in state.stage_prov], stages=state.stage_prov,
        split_counts=state.stage_prov[-1]["split_counts"], seed=cfg.seed, recipe=cfg.to_dict(),
        validation_metrics=val_metrics, parent=parent.provenance if parent else None,
        parent_weights_sha256=parent.weights_sha256 if parent else None, train_seconds=round(seconds, 1),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), trained_on=list(state.hardware),
        versions={"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__})
