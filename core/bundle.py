"""The model bundle: model.safetensors + model.json; the one module that writes and reads that description.

model.json is the JSON form of BundleMeta (threshold and provenance are typed parts of it). Everyone else
reads a bundle through read_meta/load_bundle and uses attributes, never dict keys.

Versions: this tool writes format version 2 (version 1 plus `weights_sha256`, the SHA-256 of
model.safetensors, which load_bundle checks). Version-1 bundles still load; their `weights_sha256` reads as
None ("not recorded"). Any other version is refused, naming both.

Unknown keys: at the top level and in `threshold` they are refused (they can change what a prediction means,
e.g. a section written by a newer tool, and silently dropping them would be wrong); in `provenance`, a record
that never affects a prediction, they are kept in `Provenance.extra` and written back.

Adding an optional section (an OOD gate, a calibration map, ...) is one field on BundleMeta with default None:
a frozen dataclass with to_dict/from_dict (or plain JSON data); older bundles read it as None, and a None
section is not written, so bundles without it stay readable by tools that predate it.

Trust sections (issue 10), each optional: `ood_gate` (core.ood: the out-of-distribution gate), `calibration`
(core.calibration: the map to calibrated probabilities) and `similar_cases` (core.similar: the index of training
and validation photos). Their arrays (the gate's descriptor, the float16 embeddings) live in `trust.safetensors`
beside the weights (the similar-case records as JSON in its metadata), its SHA-256 in `trust_arrays`, checked
like the weights. A bundle without them still loads; `Bundle.lacks()` says what it cannot do.

Ensembles (issue 11): an `ensemble` section (EnsembleInfo) says the weights file holds K members of the one
described architecture (keys `members.<k>.*`), loaded as a core.model.EnsembleClassifier; its gate is a
core.ood.EnsembleGate (arrays `gate.<k>.*`). Tools that predate the section refuse such a bundle by its unknown key.
"""
from __future__ import annotations

import copy
import json
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from core import calibration as calibration_mod
from core import ood, similar as similar_mod
from core.backbones import BackboneSpec, Preprocessing
from core.context import ContextModel
from core.fileio import atomic_write, atomic_write_json
from core.manifest import file_sha256
from core.runfolder import BUNDLE
from core.model import EnsembleClassifier, HeadConfig, LesionClassifier

FORMAT = "skinscreen-model-bundle"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)   # 1: before the weights hash; read with weights_sha256 = None
META_FILE, WEIGHTS_FILE, TRUST_FILE = "model.json", "model.safetensors", "trust.safetensors"
LABELS = {"0": "benign", "1": "malignant"}
OUTPUT = "one logit; sigmoid = P(malignant)"
INTENDED_USE = ("Research tool, not a diagnostic device. It estimates the probability that a skin lesion in a "
                "photo is malignant, for research and demonstration by clinician-researchers. It must not be "
                "used to make or rule out a diagnosis; any concerning lesion needs a clinician's examination.")


class BundleError(ValueError):
    """A folder that is not a loadable model bundle of this format, with the reason."""


def _check_keys(cls, d, where: str, extra_ok: bool = False) -> dict:
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected a JSON object, found {type(d).__name__}")
    known = {f.name for f in fields(cls)} - {"extra", "folder"}
    unknown = sorted(set(d) - known)
    if unknown and not extra_ok:
        raise BundleError(f"{where}: unknown key(s) {', '.join(unknown)} (written by a newer version of the "
                          f"tool?); this tool knows {', '.join(sorted(known))}")
    return {k: v for k, v in d.items() if k in known}


@dataclass(frozen=True)
class Threshold:
    """The decision threshold on P(malignant) and how it was chosen (on validation data, or on a cross-validated
    run's out-of-fold predictions: `population` says which)."""
    value: float
    rule: str | None = None              # a rule name from core.metrics' threshold-rule registry
    target: float | None = None          # the rule's target (e.g. the sensitivity to reach)
    chosen_on: str | None = None
    val_sensitivity: dict | None = None  # {"value": v, "ci95": [lo, hi]} at this threshold, on validation
    val_specificity: dict | None = None
    n_val: int | None = None
    n_val_malignant: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def population(self) -> str:
        """The photos it was chosen on, in one word for the app: "out-of-fold" or "validation"."""
        return "out-of-fold" if (self.chosen_on or "").startswith("out-of-fold") else "validation"

    @classmethod
    def from_dict(cls, d: dict, where: str = "threshold") -> "Threshold":
        known = _check_keys(cls, d, where)
        value = known.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise BundleError(f"{where}: 'value' must be a number in [0, 1], found {value!r}")
        return cls(**{**known, "value": float(value)})


@dataclass(frozen=True)
class Provenance:
    """Where the model came from: run, initial weights, data, splits, recipe, validation metrics, parent run."""
    run_name: str | None = None
    weights: str | None = None           # initial weights ('imagenet', a file, 'init_from <run>')
    data: list | None = None             # per stage: the data sources (manifest, sha256, counts)
    stages: list | None = None
    split_counts: dict | None = None
    seed: int | None = None
    recipe: dict | None = None
    validation_metrics: dict | None = None
    parent: Provenance | None = None     # the init_from run's provenance
    parent_weights_sha256: str | None = None
    train_seconds: float | None = None
    created: str | None = None
    trained_on: list | None = None       # core.device.hardware_record per machine (a resumed run may have moved)
    # a cross-validated bundle: its threshold rules tried on new patients, each fold judged at the threshold chosen
    # on the other folds (core.cv.new_patients_record); the threshold's own numbers above are in-sample
    threshold_on_new_patients: dict | None = None
    versions: dict | None = None
    extra: dict = field(default_factory=dict)  # keys this tool does not know, kept as read

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d["parent"] = self.parent.to_dict() if self.parent else None
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "provenance") -> "Provenance":
        if d is None:
            return cls()
        known = _check_keys(cls, d, where, extra_ok=True)
        parent = known.get("parent")
        if parent is not None:
            known["parent"] = cls.from_dict(parent, f"{where}.parent")
        return cls(**known, extra={k: v for k, v in d.items() if k not in known})


@dataclass(frozen=True)
class EnsembleInfo:
    """An ensemble bundle's members (core.model.EnsembleClassifier): how many, how they are combined, and each
    member's record (its fold, its run, its validation numbers, its own weights' hash)."""
    members: int
    combine: str = "mean_prob"
    member_info: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "ensemble") -> "EnsembleInfo":
        from core.model import COMBINE_RULES
        known = _check_keys(cls, d, where)
        n = known.get("members")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise BundleError(f"{where}: 'members' must be a positive whole number, found {n!r}")
        if known.get("combine", "mean_prob") not in COMBINE_RULES:
            raise BundleError(f"{where}: 'combine' must be one of {', '.join(COMBINE_RULES)}, found "
                              f"{known.get('combine')!r}")
        return cls(**known)


@dataclass(frozen=True)
class BundleMeta:
    """The content of model.json. `folder` (where it was read from) is not written."""
    backbone: dict                        # BackboneSpec.to_dict(): rebuilds the network
    threshold: Threshold
    head: dict | None = None              # HeadConfig.to_dict()
    preprocessing: dict | None = None     # the spec's preprocessing, spelled out for readers of the file
    provenance: Provenance = field(default_factory=Provenance)
    weights_sha256: str | None = None     # SHA-256 of model.safetensors; None: a version-1 bundle
    labels: dict = field(default_factory=lambda: dict(LABELS))
    output: str = OUTPUT
    intended_use: str = INTENDED_USE
    format_version: int = FORMAT_VERSION  # as read; saving always writes FORMAT_VERSION
    folder: Path | None = field(default=None, compare=False)
    # optional sections go here, each `name: Type | None = None`
    ood_gate: dict | None = None          # core.ood.OODGate.to_meta(); arrays in TRUST_FILE ("gate.*")
    calibration: dict | None = None       # core.calibration.Calibration.to_meta() + threshold_calibrated
    similar_cases: dict | None = None     # core.similar.SimilarIndex summary; embeddings + records in TRUST_FILE
    trust_arrays: dict | None = None      # {"file": TRUST_FILE, "sha256": ...}
    context: ContextModel | None = None   # the clinical-context stage (core.context): answers fused with the photo
    ensemble: EnsembleInfo | None = None  # K members of one architecture in one weights file (core.model)

    @property
    def spec(self) -> BackboneSpec:
        return BackboneSpec.from_dict(self.backbone)

    @property
    def head_config(self) -> HeadConfig:
        return HeadConfig(**(self.head or {}))

    @property
    def short_hash(self) -> str | None:
        """The first 12 hex digits of the weights' SHA-256: enough to trace a result to the exact weights."""
        return self.weights_sha256[:12] if self.weights_sha256 else None

    def summary(self) -> dict:
        """The provenance block every report, prediction and export carries: what model, trained on what,
        validated how, and which exact weights."""
        p = self.provenance
        return {"run": p.run_name, "backbone": self.backbone.get("name"), "weights": p.weights,
                "weights_sha256": self.weights_sha256, "training_data": p.data, "split_counts": p.split_counts,
                "threshold": self.threshold.to_dict(), "validation_metrics": p.validation_metrics,
                "trained_on": p.trained_on, "threshold_on_new_patients": p.threshold_on_new_patients,
                "intended_use": self.intended_use}

    def to_dict(self) -> dict:
        out = {"format": FORMAT, "format_version": FORMAT_VERSION}
        for f in fields(self):
            if f.name in ("format_version", "folder"):
                continue
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue  # an absent optional section: not written, so older tools can still read the file
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = META_FILE) -> "BundleMeta":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise BundleError(f"{where}: not a {FORMAT} (format={found!r})")
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            raise BundleError(f"{where}: bundle format version {version!r} but this tool reads version "
                              f"{FORMAT_VERSION} (and the older {', '.join(map(str, READABLE_VERSIONS[:-1]))}); "
                              f"re-export it with a matching version of the tool")
        body = {k: v for k, v in d.items() if k != "format"}
        known = _check_keys(cls, body, where)
        if version >= 2 and not known.get("weights_sha256"):
            raise BundleError(f"{where}: a version-{version} bundle must record weights_sha256")
        if version == 1 and "weights_sha256" in known:
            raise BundleError(f"{where}: a version-1 bundle cannot carry weights_sha256 (edited by hand?)")
        for key in ("backbone", "threshold"):
            if key not in known:
                raise BundleError(f"{where}: no {key!r} entry")
        hints = typing.get_type_hints(cls)
        for name, value in known.items():
            section = _section_type(hints[name])
            if section is not None and value is not None:
                known[name] = _read_section(section, value, where, name)
        _readable(lambda: BackboneSpec.from_dict(known["backbone"]), where, "backbone")  # it builds the model later
        if known.get("preprocessing") is not None:
            _readable(lambda: Preprocessing.from_dict(known["preprocessing"]), where, "preprocessing")
        return cls(**known)


def _read_section(section, value, where: str, name: str):
    """One typed section; its own error type (e.g. core.context.ContextError) becomes a BundleError naming the file
    and section, so a reader that skips unusable bundles (the app's model list) skips this one too."""
    return _readable(lambda: section.from_dict(value, f"{where} {name}"), where, name)


def _readable(build, where: str, name: str):
    try:
        return build()
    except BundleError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise BundleError(f"{where}: section {name!r} unreadable ({type(e).__name__}: {e})") from e


def _section_type(hint):
    """The typed part (a class with from_dict) behind a field's annotation, e.g. Threshold in `Threshold | None`."""
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and hasattr(t, "from_dict"):
            return t
    return None


@dataclass
class Bundle:
    model: LesionClassifier
    meta: BundleMeta
    path: Path | None = None
    gate: ood.OODGate | None = None
    calibration: calibration_mod.Calibration | None = None
    similar: similar_mod.SimilarIndex | None = None

    def lacks(self) -> list[str]:
        """What this bundle cannot do, in words (an older bundle, trained before the trust features)."""
        out = []
        if self.gate is None:
            out.append("no out-of-distribution gate: every decodable photo gets a score, even one unlike the "
                       "training photos")
        if self.calibration is None:
            out.append("no calibration map: the score is the model's raw output, not a calibrated probability")
        if self.similar is None:
            out.append("no similar-case index: no examples from the training data can be shown")
        return out

    @property
    def spec(self) -> BackboneSpec:
        return self.model.spec

    @property
    def threshold(self) -> float:
        return self.meta.threshold.value


def save_bundle(model: LesionClassifier, folder: str | Path, *, threshold: Threshold | dict,
                provenance: Provenance | dict | None = None, gate: ood.OODGate | None = None,
                calibration: calibration_mod.Calibration | None = None,
                similar: similar_mod.SimilarIndex | None = None, **sections) -> Path:
    """Write the weights, then the description with their hash; the json comes last, so a half-written bundle
    never loads. threshold/provenance may be given in their dict form (checked as a read would be);
    `sections` are BundleMeta's optional sections; gate/calibration/similar are the trust parts."""
    folder = Path(folder)
    if isinstance(sections.get("ensemble"), dict):
        sections["ensemble"] = EnsembleInfo.from_dict(sections["ensemble"])
    _check_ensemble(model, sections.get("ensemble"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).unlink(missing_ok=True)  # overwriting: no moment where old json meets new weights
    (folder / TRUST_FILE).unlink(missing_ok=True)  # and no stale trust arrays beside new weights
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    raw_threshold = threshold["value"] if isinstance(threshold, dict) else threshold.value
    sections.update(_trust_sections(folder, gate, calibration, similar, raw_threshold))
    if isinstance(threshold, dict):
        threshold = Threshold.from_dict(threshold)
    if not isinstance(provenance, Provenance):
        provenance = Provenance.from_dict(provenance)
    meta = BundleMeta(backbone=model.spec.to_dict(), head=model.head_cfg.to_dict(),
                      preprocessing=asdict(model.spec.preprocessing), threshold=threshold, provenance=provenance,
                      weights_sha256=file_sha256(weights), **sections)
    atomic_write_json(folder / META_FILE, meta.to_dict())
    return folder


def _check_ensemble(model, info) -> None:
    """An ensemble model is saved with its ensemble section, a single model without one (else it would not load)."""
    members = len(model.members) if isinstance(model, EnsembleClassifier) else None
    described = (info.members if isinstance(info, EnsembleInfo) else info.get("members")) if info else None
    if members != described:
        raise BundleError(f"the model has {members or 'no'} ensemble members but the ensemble section describes "
                          f"{described or 'none'}")


def _trust_sections(folder: Path, gate, calibration, similar, raw_threshold: float) -> dict:
    """Write TRUST_FILE (when there are arrays) and return the BundleMeta sections that describe the parts."""
    out = {}
    if calibration is not None:
        out["calibration"] = {**calibration.to_meta(), "threshold_calibrated": calibration.threshold(raw_threshold)}
    arrays, metadata = {}, {}
    if gate is not None:
        out["ood_gate"] = gate.to_meta()
        arrays.update({f"gate.{k}": np.ascontiguousarray(v) for k, v in gate.arrays.items()})
    if similar is not None:
        meta = similar.to_meta()
        metadata["similar_records"] = json.dumps(meta.pop("records"))
        out["similar_cases"] = meta
        arrays["similar.embeddings"] = np.ascontiguousarray(similar.embeddings)
    if arrays:
        from safetensors.numpy import save_file as save_np
        path = atomic_write(folder / TRUST_FILE, lambda tmp: save_np(arrays, str(tmp), metadata=metadata))
        out["trust_arrays"] = {"file": TRUST_FILE, "sha256": file_sha256(path)}
    return out


def _load_trust(meta: BundleMeta) -> dict:
    """The trust parts a bundle records (gate, calibration, similar); absent ones are None."""
    parts = {"gate": None, "calibration": None, "similar": None}
    try:
        if meta.calibration is not None:
            parts["calibration"] = calibration_mod.Calibration.from_meta(meta.calibration)
        if meta.trust_arrays is None:
            if meta.ood_gate is not None or meta.similar_cases is not None:
                raise BundleError(f"{meta.folder}: {META_FILE} describes a gate or similar cases but records no "
                                  f"{TRUST_FILE}")
            return parts
        path = verify_trust(meta)
        from safetensors import safe_open
        with safe_open(str(path), framework="np") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
        if meta.ood_gate is not None:
            gate_arrays = {k.removeprefix("gate."): v for k, v in arrays.items() if k.startswith("gate.")}
            parts["gate"] = ood.gate_from_meta(meta.ood_gate, gate_arrays)
        if meta.similar_cases is not None:
            records = json.loads(metadata.get("similar_records", "[]"))
            parts["similar"] = similar_mod.SimilarIndex.from_meta({"records": records}, arrays["similar.embeddings"],
                                                                  base=meta.folder)
    except (ood.GateError, calibration_mod.CalibrationError, similar_mod.SimilarError, KeyError, ValueError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{meta.folder}: trust sections unreadable ({type(e).__name__}: {e})") from e
    return parts


def bundle_folder(folder: str | Path) -> Path:
    """A bundle folder, or a run folder whose bundle lives in bundle/ (core.runfolder owns that name)."""
    folder = Path(folder)
    if (folder / BUNDLE).is_dir() and not (folder / META_FILE).exists():
        return folder / BUNDLE
    return folder


def read_meta(folder: str | Path) -> BundleMeta:
    """Read and check a bundle's description without touching the weights."""
    if not Path(folder).exists():
        raise BundleError(f"{folder}: not found (give a run folder, a bundle folder or 'demo')")
    folder = bundle_folder(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise BundleError(f"{folder}: no {META_FILE} (not a model bundle or run folder)")
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        raise BundleError(f"{meta_path}: not valid JSON in UTF-8 ({e})") from e
    return replace(BundleMeta.from_dict(raw, str(meta_path)), folder=folder)


def verify_weights(meta: BundleMeta) -> None:
    """Refuse weights whose SHA-256 differs from the one recorded (a swapped or corrupted file)."""
    weights = meta.folder / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{meta.folder}: {META_FILE} present but {WEIGHTS_FILE} is missing")
    if meta.weights_sha256 is None:
        return  # a version-1 bundle: nothing recorded to check against
    actual = file_sha256(weights)
    if actual != meta.weights_sha256:
        raise BundleError(f"{weights}: SHA-256 {actual} but {META_FILE} records {meta.weights_sha256}; the "
                          f"weights were replaced or corrupted after the bundle was written")


def verify_trust(meta: BundleMeta) -> Path | None:
    """The trust-arrays file model.json records, checked (present, SHA-256 as recorded); None when it records none."""
    if meta.trust_arrays is None:
        return None
    path = meta.folder / meta.trust_arrays.get("file", TRUST_FILE)
    if not path.is_file():
        raise BundleError(f"{meta.folder}: {META_FILE} records {path.name} but it is missing")
    if file_sha256(path) != meta.trust_arrays.get("sha256"):
        raise BundleError(f"{path}: SHA-256 differs from the one {META_FILE} records (replaced or corrupted)")
    return path


def _empty_model(meta: BundleMeta) -> LesionClassifier | EnsembleClassifier:
    """The described network with random weights (the checked weights are loaded next)."""
    if meta.ensemble is None:
        return LesionClassifier(meta.spec, meta.head_config, weights="none")
    members = [LesionClassifier(meta.spec, meta.head_config, weights="none") for _ in range(meta.ensemble.members)]
    return EnsembleClassifier(members, meta.ensemble.combine)


def load_bundle(folder: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the classifier from its description and load the checked weights (safetensors: no code runs)."""
    from safetensors import SafetensorError
    meta = read_meta(folder)
    verify_weights(meta)
    try:
        model = _empty_model(meta)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # e.g. a backbone name this tool does not know
        raise BundleError(f"{meta.folder}: {META_FILE} describes a model this tool cannot build ({str(e)[:300]})"
                          ) from e
    try:
        weights = load_file(str(meta.folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:  # a format-1 bundle has no hash to catch a truncated file first
        raise BundleError(f"{meta.folder / WEIGHTS_FILE}: not a readable weights file, damaged or truncated "
                          f"({str(e)[:200]})") from e
    try:
        model.load_state_dict(weights, strict=True)
    except (KeyError, TypeError, RuntimeError) as e:
        raise BundleError(f"{meta.folder}: weights do not match the described model ({str(e)[:300]})") from e
    model.eval().to(device)
    return Bundle(model=model, meta=meta, path=meta.folder, **_load_trust(meta))



# save_bundle writes these itself (from the model, its arguments and the trust parts); repack passes the rest on.
_WRITTEN_BY_SAVE = {"backbone", "head", "preprocessing", "threshold", "provenance", "weights_sha256", "format_version",
                    "folder", "calibration", "ood_gate", "similar_cases", "trust_arrays"}


def other_sections(meta: BundleMeta) -> dict:
    """The optional sections save_bundle does not write itself (e.g. the context stage): pass them on whenever a
    bundle is saved again, or they are lost."""
    return {f.name: getattr(meta, f.name) for f in fields(BundleMeta) if f.name not in _WRITTEN_BY_SAVE}


def repack(bundle: Bundle, folder: str | Path, *, weights_dtype: torch.dtype | None = None,
           relative_images: bool = False) -> Path:
    """Save a loaded bundle again under the same description: weights optionally stored in another dtype (loading
    casts them back into the float32 model), similar-case image references optionally made relative to the new
    folder. Hashes are recomputed."""
    folder = Path(folder)
    model = bundle.model
    if weights_dtype is not None:
        model = copy.deepcopy(model).to(weights_dtype)
    similar = bundle.similar.relative_to(folder) if (bundle.similar is not None and relative_images) \
        else bundle.similar
    return save_bundle(model, folder, threshold=bundle.meta.threshold, provenance=bundle.meta.provenance,
                       gate=bundle.gate, calibration=bundle.calibration, similar=similar, **other_sections(bundle.meta))
