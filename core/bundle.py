"""The model bundle: model.safetensors + a self-describing model.json; loading never executes code."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.backbones import BackboneSpec
from core.model import HeadConfig, LesionClassifier

FORMAT = "skinscreen-model-bundle"
FORMAT_VERSION = 1
LABELS = {"0": "benign", "1": "malignant"}
INTENDED_USE = ("Research tool, not a diagnostic device. It estimates the probability that a skin lesion in a "
                "photo is malignant, for research and demonstration by clinician-researchers. It must not be "
                "used to make or rule out a diagnosis; any concerning lesion needs a clinician's examination.")


class BundleError(ValueError):
    """A folder that is not a loadable model bundle of this format, with the reason."""


@dataclass
class Bundle:
    model: LesionClassifier
    meta: dict
    path: Path | None = None

    @property
    def spec(self) -> BackboneSpec:
        return self.model.spec

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"]["value"])


def save_bundle(model: LesionClassifier, folder: str | Path, *, threshold: dict, provenance: dict,
                context: dict | None = None) -> Path:
    """Write the weights and the description; the json is written last, so a half-written bundle never loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").unlink(missing_ok=True)  # overwriting: no moment where old json meets new weights
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "backbone": model.spec.to_dict(), "head": model.head_cfg.to_dict(),
            "preprocessing": asdict(model.spec.preprocessing),
            "threshold": threshold, "labels": LABELS, "output": "one logit; sigmoid = P(malignant)",
            "intended_use": INTENDED_USE, "provenance": provenance}
    if context is not None:  # the optional clinical-context stage (core.context.ContextModel.to_dict())
        meta["context"] = context
    tmp = folder / "model.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=_jsonable))
    os.replace(tmp, folder / "model.json")
    return folder


def _jsonable(o):
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_meta(folder: str | Path) -> dict:
    """Read and check a bundle's description without touching the weights."""
    folder = Path(folder)
    if (folder / "bundle").is_dir() and not (folder / "model.json").exists():
        folder = folder / "bundle"  # a run folder: its bundle lives in bundle/
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise BundleError(f"{folder}: no model.json (not a model bundle or run folder)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{meta_path}: not valid JSON ({e})") from e
    if meta.get("format") != FORMAT:
        raise BundleError(f"{meta_path}: not a {FORMAT} (format={meta.get('format')!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{meta_path}: bundle format version {version} but this tool reads version "
                          f"{FORMAT_VERSION}; re-export it with a matching version of the tool")
    meta["_folder"] = str(folder)
    return meta


def load_bundle(folder: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the classifier from its description and load the weights (safetensors: no code runs)."""
    meta = read_meta(folder)
    folder = Path(meta["_folder"])
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise BundleError(f"{folder}: model.json present but model.safetensors is missing")
    try:
        spec = BackboneSpec.from_dict(meta["backbone"])
        model = LesionClassifier(spec, HeadConfig(**meta["head"]), weights="none")
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (KeyError, TypeError, RuntimeError) as e:
        raise BundleError(f"{folder}: weights do not match the described model ({str(e)[:300]})") from e
    model.eval().to(device)
    return Bundle(model=model, meta=meta, path=folder)
