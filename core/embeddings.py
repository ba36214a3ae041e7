"""Frozen-backbone embeddings with a per-image disk cache keyed by model identity, image content, crop and preprocessing.

Cache layout: ``<root>/<model identity>/<key[:2]>/<key>.npy``, one float32 vector per image, where
``key = sha256(model identity, image file sha256, crop box, preprocessing)``. A changed image file has a
new content hash and so a new key: only that image is recomputed (its old vector is left as an orphan
file; deleting the cache folder is always safe). Files are written to a temporary name and renamed, so
a killed run never leaves a half-written vector that a later run would trust.

Model identity (``model_identity``):

* a bundle: sha256 of its ``model.safetensors`` plus the backbone name;
* a backbone with a weights file: spec + sha256 of the file;
* a backbone with ``'imagenet'``: spec (its timm name pins the pretrained tag) + ``'imagenet'``;
* a backbone with ``'none'`` (random weights): only cacheable with a seed; the identity then holds the
  seed and the torch/timm versions (initialisation code can change between versions). Without a seed
  the weights are not reproducible, the identity is None and nothing is cached.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from core.backbones import BackboneSpec, Preprocessing, build_backbone, get_spec
from core.dataset import DECODE_VERSION, ManifestDataset
from core.device import ieee_fp32
from core.fileio import atomic_write
from core.manifest import crop_of, file_sha256
from core.transforms import eval_transform


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()


def _spec_fields(spec: BackboneSpec) -> dict:
    # Preprocessing is keyed per image, so only the fields that shape the network go in here.
    return {"name": spec.name, "timm_name": spec.timm_name, "model_kwargs": spec.model_kwargs}


def model_identity(*, spec: BackboneSpec | None = None, weights: str = "none", seed: int | None = None,
                   bundle: str | Path | None = None) -> str | None:
    """A stable hash of the network's weights, or None when they are not reproducible (unseeded random)."""
    if bundle is not None:
        from core.bundle import WEIGHTS_FILE, read_meta
        meta = read_meta(bundle)
        blob = meta.folder / WEIGHTS_FILE
        return _digest({"bundle": file_sha256(blob), "backbone": meta.backbone["name"]})
    if spec is None:
        raise ValueError("model_identity needs a spec (with weights) or a bundle")
    if weights == "none":
        if seed is None:
            return None
        import timm
        source = {"random": int(seed), "torch": torch.__version__, "timm": timm.__version__}
    elif weights == "imagenet":
        source = "imagenet"
    else:
        source = {"file_sha256": file_sha256(weights)}
    return _digest({"spec": _spec_fields(spec), "weights": source})


@dataclass
class Embedder:
    """A pooled-feature network plus what decides its output: preprocessing and identity (None: uncacheable)."""
    module: nn.Module
    preprocessing: Preprocessing
    identity: str | None
    description: dict


def load_embedder(*, run: str | Path | None = None, backbone: str | None = None, weights: str = "none",
                  seed: int | None = 0, input_size: int | None = None) -> Embedder:
    """Build the feature extractor from a run/bundle folder or a registry backbone (+ weights)."""
    if run is not None:
        from core.bundle import load_bundle
        b = load_bundle(run)
        pp = b.spec.preprocessing
        desc = {"source": "run", "run": str(run), "run_name": b.meta.provenance.run_name,
                "backbone": b.spec.name}
        ident = model_identity(bundle=b.path)
        module = b.model.backbone
    else:
        spec = get_spec(backbone)
        with torch.random.fork_rng(devices=[]):  # seeding must not disturb the caller's random stream
            if seed is not None:
                torch.manual_seed(seed)
            module = build_backbone(spec, weights)
        pp = spec.preprocessing
        desc = {"source": "backbone", "backbone": spec.name, "timm_name": spec.timm_name,
                "weights": str(weights), "seed": seed if weights == "none" else None}
        ident = model_identity(spec=spec, weights=weights, seed=seed)
    if input_size is not None:
        pp = Preprocessing(**{**asdict(pp), "input_size": int(input_size)})
    desc.update(identity=ident, preprocessing=asdict(pp))
    return Embedder(module.eval(), pp, ident, desc)


class EmbeddingCache:
    """Per-image feature vectors on disk; counts hits and misses so callers can report what was reused."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = self.misses = 0
        self._sha: dict[tuple, str] = {}

    def image_sha(self, path: str) -> str:
        """Content hash of an image file, memoised per (path, size, mtime) within this process."""
        st = os.stat(path)
        memo = (path, st.st_size, st.st_mtime_ns)
        if memo not in self._sha:
            self._sha[memo] = file_sha256(path)
        return self._sha[memo]

    def key(self, identity: str, image: str, crop: dict | None, pp: Preprocessing) -> str:
        # the decoder's version too: a change in how photos are decoded changes every embedding
        return _digest({"model": identity, "image": self.image_sha(image), "crop": crop, "pp": asdict(pp),
                        "decode": DECODE_VERSION})

    def _path(self, identity: str, key: str) -> Path:
        return self.root / identity[:32] / key[:2] / f"{key}.npy"

    def get(self, identity: str, key: str) -> np.ndarray | None:
        path = self._path(identity, key)
        try:
            vec = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):  # damaged file (e.g. disk full): recompute and overwrite it
            return None
        return vec if vec.ndim == 1 else None

    def put(self, identity: str, key: str, vec: np.ndarray) -> None:
        data = np.asarray(vec, dtype=np.float32)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a bare path
                np.save(f, data)
        atomic_write(self._path(identity, key), write)  # readers see the old file or the whole new one


def _feature_module(model: nn.Module) -> nn.Module:
    """A classifier's pooled features (what its head sees; an ensemble's members' side by side); any other module
    is used as it is."""
    from core.model import EnsembleClassifier, LesionClassifier
    return model.backbone if isinstance(model, (LesionClassifier, EnsembleClassifier)) else model


@torch.no_grad()
def _forward(module: nn.Module, df: pd.DataFrame, pp: Preprocessing, device, batch_size: int,
             num_workers: int, engine: str | None = None, report: dict | None = None) -> np.ndarray:
    from core.engine import batch_features
    ds = ManifestDataset(df, eval_transform(pp), short_side=pp.resize_to, interpolation=pp.interpolation)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    # PyTorch or ONNX Runtime, whichever is faster on this job's first batches; both fp32 on purpose: cached
    # vectors must not depend on the device's reduced precision (IEEE fp32: no TF32 on a GPU either).
    out = None
    with ieee_fp32(torch.device(device)):
        features = batch_features(module, pp, len(loader), device, engine=engine)
        for x, _, idx in loader:
            feats = features(x.to(device)).float().cpu().numpy()
            if out is None:
                out = np.empty((len(ds), feats.shape[1]), dtype=np.float32)
            out[idx.numpy()] = feats
    if report is not None:
        report["engine"] = features.record
    return out


def embed(model: nn.Module, df: pd.DataFrame, preprocessing: Preprocessing, cache: EmbeddingCache | None = None,
          *, identity: str | None = None, device="cpu", batch_size: int = 32, num_workers: int = 0,
          engine: str | None = None, report: dict | None = None) -> np.ndarray:
    """Pooled features (N, D) float32 for every row of df, in row order; only cache misses run the network.

    Without a cache or an identity (unreproducible weights) every row is computed. `engine`: 'auto' (default:
    $SKINSCREEN_ENGINE, else auto), 'pytorch' or 'onnxruntime' (core.engine.batch_features); `report`, a dict,
    receives the engine decision under 'engine' when anything was computed.
    """
    module = _feature_module(model)
    use_cache = cache is not None and identity is not None
    rows = df.reset_index(drop=True)
    keys = [cache.key(identity, r["image"], crop_of(r), preprocessing) for _, r in rows.iterrows()] \
        if use_cache else [None] * len(rows)
    found = [cache.get(identity, k) for k in keys] if use_cache else [None] * len(rows)
    missing = [i for i, v in enumerate(found) if v is None]
    if use_cache:
        cache.hits += len(rows) - len(missing)
        cache.misses += len(missing)
    if missing:
        was_training = module.training
        module.eval().to(device)
        try:
            fresh = _forward(module, rows.iloc[missing], preprocessing, torch.device(device), batch_size,
                             num_workers, engine, report)
        finally:
            module.train(was_training)
        for j, i in enumerate(missing):
            found[i] = fresh[j]
            if use_cache:
                cache.put(identity, keys[i], fresh[j])
    if not found:
        return np.empty((0, 0), dtype=np.float32)
    return np.stack(found).astype(np.float32, copy=False)
