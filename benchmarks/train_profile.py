"""Where the time goes in a CPU fine-tune epoch of a recipe (default: the shared demo), and which loader set-up is fastest.

    python benchmarks/train_profile.py --json benchmarks/results/train_profile_<cpu>.json
    python benchmarks/train_profile.py --images 64 --setups plain memory --policies default --epoch-batches 4

Three parts, all on the recipe's own data, split, model, precision and augmentation (`core.training`'s loaders):
- per image (the last stage's training photos): decode (EXIF, crop, JPEG draft), resize to the training short side,
  a decode-cache hit instead of both, and each step of the training transform (resize, random crop, flip,
  to-tensor, normalise), medians in ms;
- per batch (batch_size of the stage, real transformed photos, channels-last, under Fabric with the recipe's
  precision): forward, backward, optimiser step, for the frozen-backbone and the unfrozen stage;
- per epoch (real passes over the last stage's training split, unfrozen, workers kept between epochs as in training):
  wall time split into data-loader wait (time spent in next(loader)) and compute, for several loader set-ups
  (workers, torch threads, decode caches: SETUPS), each in a fresh process under each OpenMP wait policy asked for
  (libgomp's default spins a while before sleeping; PASSIVE sleeps at once, as train.fit now asks).
Everything but the epoch set-ups runs with the recipe's default thread count and the caller's OMP_WAIT_POLICY. The
machine may be shared: the load average is recorded around every measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, finish, load_avg, machine_info, usable_cores

SETUPS = {  # name: (workers: None = core.device.dataloader_workers, torch threads: None = default, cache)
    "plain": (None, None, None),                     # train.fit before core.cache.MemoryCache: decode every epoch
    "plain_workers0": (0, None, None),               # the same, decoding in the training process
    "threads_minus_workers": (None, -1, None),       # default workers, torch threads = cores - workers
    "disk_cache_workers0": (0, None, "disk"),        # decode_cache: DIR (warm after the first epoch), no worker
    "memory": (None, None, "memory"),                # core.cache.MemoryCache, default workers
    "memory_workers0": (0, None, "memory"),          # MemoryCache, no worker
}


def load(config: str, overrides: list[str]):
    from train.fit import build_parser, load_raw
    from core.config import run_config_from_dict
    from core.training import run_data
    args = build_parser().parse_args(["--config", config, *sum((["--set", s] for s in overrides), [])])
    cfg = run_config_from_dict(load_raw(args))
    stages, how = run_data(cfg)
    return cfg, stages


def ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3) if samples else float("nan")


def per_image(df, pp, augment: str, n: int, cache_dir: Path) -> dict:
    from core.cache import DecodeCache
    from core.dataset import decode_limits
    from core.images import load_image
    from core.manifest import crop_of
    from core.transforms import resize_short, train_transform
    rows = list(df.itertuples(index=False))[:n]
    tf = train_transform(pp, augment)
    steps = {type(t).__name__: [] for t in tf.transforms}
    dec, rs, hit, total_aug = [], [], [], []
    cache = DecodeCache(cache_dir)
    short = pp.resize_to
    torch.manual_seed(0)
    for r in rows:
        crop = crop_of(r._asdict())
        t0 = time.perf_counter()
        img = load_image(r.image, crop=crop, **decode_limits(short))
        t1 = time.perf_counter()
        if min(img.size) > short:
            img = resize_short(img, short, pp.interpolation)
        t2 = time.perf_counter()
        dec.append(t1 - t0)
        rs.append(t2 - t1)
        cache.get(r.image, crop, short, pp.interpolation)  # fill
        t3 = time.perf_counter()
        img = cache.get(r.image, crop, short, pp.interpolation)
        hit.append(time.perf_counter() - t3)
        x = img
        t_aug = time.perf_counter()
        for t in tf.transforms:
            ts = time.perf_counter()
            x = t(x)
            steps[type(t).__name__].append(time.perf_counter() - ts)
        total_aug.append(time.perf_counter() - t_aug)
    return {"n_images": len(rows), "short_side": short, "decode_ms": ms(dec), "resize_ms": ms(rs),
            "decode_mean_ms": round(1e3 * sum(dec) / len(dec), 3), "resize_mean_ms": round(1e3 * sum(rs) / len(rs), 3),
            "cache_hit_ms": ms(hit), "augment_ms": ms(total_aug),
            "augment_mean_ms": round(1e3 * sum(total_aug) / len(total_aug), 3),
            "augment_steps_ms": {k: ms(v) for k, v in steps.items()}}


def make_fabric(cfg):
    from lightning_fabric import Fabric
    from core.device import fabric_precision
    precision = fabric_precision(cfg.precision, "cpu")
    return Fabric(accelerator="cpu", devices=1, precision=precision), precision


def build_model(cfg):
    from core.training import initial_model
    model, _ = initial_model(cfg)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def timed_step(wrapped, optimizer, fabric, x, y, loss_fn) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    logits = wrapped(x).squeeze(1)
    loss = loss_fn(logits.float(), y.float())
    t1 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    fabric.backward(loss)
    t2 = time.perf_counter()
    optimizer.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def per_batch(cfg, df, fabric, batches: int) -> dict:
    """Compute alone on a fixed batch of real transformed photos, for the frozen and the unfrozen set-up."""
    from core.dataset import ManifestDataset
    from core.transforms import train_transform
    stage = cfg.stages[-1]
    model = build_model(cfg)
    pp = model.spec.preprocessing
    ds = ManifestDataset(df, train_transform(pp, stage.augment), short_side=pp.resize_to,
                         interpolation=pp.interpolation)
    n = min(stage.batch_size, len(ds))
    x = torch.stack([ds[i][0] for i in range(n)])
    y = torch.tensor([ds[i][1] for i in range(n)])
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    out = {"batch_size": n}
    for name, frozen in (("frozen_backbone", True), ("unfrozen", False)):
        model.freeze_backbone(frozen)
        model.set_dropout(stage.dropout)
        optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-6)
        wrapped, optimizer = fabric.setup(model, optimizer)
        wrapped.train()
        timed_step(wrapped, optimizer, fabric, x, y, loss_fn)  # warm-up (oneDNN kernel choice)
        parts = [timed_step(wrapped, optimizer, fabric, x, y, loss_fn) for _ in range(batches)]
        f, b, s = ([p[i] for p in parts] for i in range(3))
        step = ms([sum(p) for p in parts])
        out[name] = {"forward_ms": ms(f), "backward_ms": ms(b), "optimizer_ms": ms(s), "step_ms": step,
                     "images_per_s": round(n / (step / 1e3), 2)}
    return out


def make_cache(kind: str | None, root: Path):
    import core.cache
    if kind == "disk":
        return core.cache.DecodeCache(root)
    if kind == "memory":
        return core.cache.MemoryCache()
    return None


def epochs(cfg, df, fabric, setup: str, cache_root: Path, n_epochs: int, max_batches: int | None) -> dict:
    """n real passes over the training split through core.training's loaders (workers kept between epochs, as in
    training), timing next(loader) against the training step."""
    from core.device import dataloader_workers
    from core.training import _loaders, seed_epoch
    workers, threads, kind = SETUPS[setup]
    workers = dataloader_workers(cfg.devices) if workers is None else workers
    before = torch.get_num_threads()
    cores = usable_cores()
    if threads == -1:
        torch.set_num_threads(max(1, cores - workers))
    elif threads is not None:
        torch.set_num_threads(threads)
    try:
        stage = cfg.stages[-1]
        model = build_model(cfg)
        model.freeze_backbone(stage.freeze_backbone)
        model.set_dropout(stage.dropout)
        optimizer = torch.optim.Adam(model.trainable_parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
        wrapped, optimizer = fabric.setup(model, optimizer)
        cache = make_cache(kind, cache_root / setup)
        (train_dl, _), train_df, _ = _loaders(fabric, df, stage, model.spec.preprocessing, workers, cache, 0)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        wrapped.train()
        rows = []
        for e in range(n_epochs):
            seed_epoch(fabric, train_dl, cfg.seed, len(cfg.stages) - 1, e)
            load0 = load_avg()
            waits, comps, n = [], [], 0
            t_start = time.perf_counter()
            it = iter(train_dl)
            while max_batches is None or len(comps) < max_batches:
                t0 = time.perf_counter()
                try:
                    x, y, _ = next(it)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                timed_step(wrapped, optimizer, fabric, x, y, loss_fn)
                waits.append(t1 - t0)
                comps.append(time.perf_counter() - t1)
                n += len(y)
            wall = time.perf_counter() - t_start
            del it
            rows.append({"epoch": e, "batches": len(comps), "images": n, "wall_s": round(wall, 2),
                         "loader_wait_s": round(sum(waits), 2),
                         "first_batch_wait_s": round(waits[0], 2) if waits else None,
                         "compute_s": round(sum(comps), 2), "images_per_s": round(n / wall, 2),
                         "load_avg_1min": [round(load0, 2), round(load_avg(), 2)]})
        del train_dl
        return {"workers": workers, "torch_threads": torch.get_num_threads(), "cache": kind, "epochs": rows}
    finally:
        torch.set_num_threads(before)


def run_setup(args, setup: str, policy: str, path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--epochs", str(args.epochs),
           "--epoch-batches", str(args.epoch_batches), "--one-setup", setup, str(path),
           *sum((["--set", s] for s in args.set), [])]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return {"omp_wait_policy": policy, **json.loads(path.read_text(encoding="utf-8"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "train" / "configs" / "shared_demo.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (as train.fit)")
    p.add_argument("--json", help="write results here")
    p.add_argument("--images", type=int, default=0, help="photos for the per-image part; 0 = the whole training split")
    p.add_argument("--batches", type=int, default=3, help="timed batches per compute set-up (after 1 warm-up)")
    p.add_argument("--epoch-batches", type=int, default=0, help="batches per epoch; 0 = the whole epoch")
    p.add_argument("--epochs", type=int, default=2, help="epochs per set-up (the first fills any cache); 0 = none")
    p.add_argument("--setups", nargs="+", default=None, choices=list(SETUPS),
                   help="default: all (those with 'memory' only where core.cache has MemoryCache)")
    p.add_argument("--policies", nargs="+", default=["default", "PASSIVE"],
                   help="OMP_WAIT_POLICY for the epoch set-ups ('default' = unset: libgomp spins a while)")
    p.add_argument("--one-setup", nargs=2, metavar=("SETUP", "JSON"), help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    os.chdir(ROOT)  # recipes name their data relative to the repository root
    info = machine_info()
    cfg, stages = load(args.config, args.set)
    df = stages[-1][0]
    train_df = df[df["split"] == "train"]
    fabric, precision = make_fabric(cfg)
    if args.one_setup:  # a child: one loader set-up under this process's OpenMP wait policy
        setup, path = args.one_setup
        with tempfile.TemporaryDirectory() as tmp:
            r = epochs(cfg, df, fabric, setup, Path(tmp), args.epochs, args.epoch_batches or None)
        Path(path).write_text(json.dumps(r), encoding="utf-8")
        return 0
    from core.device import dataloader_workers
    out = {"machine": info, "settings": {"config": os.path.relpath(args.config, ROOT), "overrides": args.set,
                                         "precision": precision, "torch_threads": torch.get_num_threads(),
                                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                                         "epochs_per_setup": args.epochs, "epoch_batches": args.epoch_batches,
                                         "default_workers": dataloader_workers(cfg.devices),
                                         "train_images": int(len(train_df)), "stage": cfg.stages[-1].name}}
    print(f"{info['cpu']} | {info['cores']} cores ({', '.join(info.get('isa', []))}) | torch {info['torch']} | "
          f"threads {torch.get_num_threads()} | {precision} | load {info['load_avg_1min_at_start']}", flush=True)
    pp = build_model(cfg).spec.preprocessing
    with tempfile.TemporaryDirectory() as tmp:
        n = args.images or len(train_df)
        img = per_image(train_df, pp, cfg.stages[-1].augment, n, Path(tmp) / "img_cache")
        out["per_image"] = img
        steps = " + ".join(f"{k} {v:.2f}" for k, v in img["augment_steps_ms"].items())
        print(f"per image (median of {img['n_images']}): decode {img['decode_ms']:.2f} ms, resize {img['resize_ms']:.2f}"
              f" ms (means {img['decode_mean_ms']:.2f} / {img['resize_mean_ms']:.2f}), cache hit "
              f"{img['cache_hit_ms']:.2f} ms; augmentation {img['augment_ms']:.2f} ms = {steps}", flush=True)
        out["per_batch"] = per_batch(cfg, train_df, fabric, args.batches)
        for k in ("frozen_backbone", "unfrozen"):
            b = out["per_batch"][k]
            print(f"batch of {out['per_batch']['batch_size']}, {k}: forward {b['forward_ms']:.0f} ms, backward "
                  f"{b['backward_ms']:.0f} ms, optimizer {b['optimizer_ms']:.0f} ms = {b['images_per_s']:.1f} img/s",
                  flush=True)
        import core.cache
        setups = args.setups or [k for k, v in SETUPS.items() if v[2] != "memory" or hasattr(core.cache, "MemoryCache")]
        out["epochs"] = {}
        print(f"{'set-up':22} {'OMP wait':8} {'workers':>7} {'threads':>7} {'cache':>6} {'epoch':>5} {'wall s':>7} "
              f"{'wait s':>7} {'compute s':>9} {'img/s':>6}  load")
        for policy in args.policies if args.epochs > 0 else []:  # a fresh process per set-up: libgomp reads
            for setup in setups:                                    # its wait policy once
                r = run_setup(args, setup, policy, Path(tmp) / f"{setup}_{policy}.json")
                out["epochs"][f"{setup}/{policy}"] = r
                for e in r["epochs"]:
                    print(f"{setup:22} {policy:8} {r['workers']:7} {r['torch_threads']:7} {str(r['cache']):>6} "
                          f"{e['epoch']:5} {e['wall_s']:7.1f} {e['loader_wait_s']:7.1f} {e['compute_s']:9.1f} "
                          f"{e['images_per_s']:6.1f}  {e['load_avg_1min']}", flush=True)
    return finish(out, args.json)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
