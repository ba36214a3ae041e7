"""Run configuration: frozen dataclasses for a chain of training stages, built from plain dicts (YAML at the CLI edge)."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.backbones import BACKBONES
from core.metrics import THRESHOLD_RULES, selection_metrics
from core.model import HeadConfig
from core.splits import SplitConfig
from core.transforms import AUGMENTATIONS

SCHEDULERS = ("none", "plateau", "cosine")
IMPORTERS = ("pad_ufes", "isic", "midas")
# 'auto' (core.device.fabric_precision) or a Lightning Fabric precision; anything else fails only in the run
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
              "32", "16", "bf16", "64")  # the short names Fabric still maps onto the long ones
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A run configuration that cannot be run, with the offending key."""


@dataclass(frozen=True)
class DataSource:
    """A manifest CSV, a labelled CSV + image folder imported on the fly (column names as in `train.data csv`), or a
    named dataset's metadata + images through its importer (`importer: pad_ufes|isic|midas`, with its context
    columns)."""
    manifest: str | None = None
    csv: str | None = None
    metadata: str | None = None
    importer: str | None = None
    images: str | None = None
    domain: str | None = None
    image_col: str = "image"
    label_col: str = "label"
    patient_col: str = "patient_id"

    def __post_init__(self):
        if sum(bool(x) for x in (self.manifest, self.csv, self.metadata)) != 1:
            raise ConfigError("a data source names exactly one of 'manifest', 'csv' or 'metadata'")
        if (self.csv or self.metadata) and not self.images:
            raise ConfigError(f"data source {self.csv or self.metadata!r} needs 'images' (the image folder)")
        if bool(self.metadata) != bool(self.importer) or (self.importer and self.importer not in IMPORTERS):
            raise ConfigError(f"'metadata' goes with 'importer' (one of {', '.join(IMPORTERS)}), "
                              f"got importer={self.importer!r}")


@dataclass(frozen=True)
class StageConfig:
    name: str
    data: tuple[DataSource, ...]
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 1e-5
    dropout: float = 0.5
    freeze_backbone: bool = False
    scheduler: str = "none"
    augment: str = "smartphone"
    batch_size: int = 32

    def __post_init__(self):
        for key, value, allowed in (("scheduler", self.scheduler, SCHEDULERS),
                                    ("augment", self.augment, AUGMENTATIONS)):
            if value not in allowed:
                raise ConfigError(f"stage {self.name!r}: {key} must be one of {allowed}, not {value!r}")
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ConfigError(f"stage {self.name!r}: epochs, lr and batch_size must be positive")
        if not 0 <= self.dropout < 1 or self.weight_decay < 0:
            raise ConfigError(f"stage {self.name!r}: dropout must be in [0, 1) and weight_decay >= 0, not "
                              f"{self.dropout} and {self.weight_decay}")
        if not self.data:
            raise ConfigError(f"stage {self.name!r} names no data")


@dataclass(frozen=True)
class ThresholdConfig:
    rule: str = "sensitivity"   # a name in core.metrics.THRESHOLD_RULES
    target: float | None = None  # None: the rule's default (0.90 sensitivity for 'sensitivity', 0.5 for 'fixed')

    def __post_init__(self):
        if self.rule not in THRESHOLD_RULES:
            raise ConfigError(f"threshold.rule must be one of {', '.join(THRESHOLD_RULES)}, not {self.rule!r}")
        if self.target is None:
            object.__setattr__(self, "target", THRESHOLD_RULES[self.rule].default_target)
        if self.target is not None and not 0.0 <= float(self.target) <= 1.0:
            raise ConfigError(f"threshold.target must be in [0, 1], not {self.target}")


@dataclass(frozen=True)
class ContextConfig:
    """The optional context stage (core.context): which answer fields it may use; fitted after the image model."""
    fields: tuple[str, ...] = ("age", "sex", "site", "itch", "grew", "hurt", "changed", "bleed", "elevation",
                               "diameter_mm")

    def __post_init__(self):
        from core.context import ContextError, check_fields
        object.__setattr__(self, "fields", tuple(self.fields))
        try:
            check_fields(self.fields)
        except ContextError as e:
            raise ConfigError(f"context.fields: {e}") from None


@dataclass(frozen=True)
class CVConfig:
    """Cross-validation (core.cv): 0 = one train/validation split (split.val); K >= 2 = K patient-grouped folds of
    the non-test patients, one fold run per fold, the K models averaged into one ensemble bundle.

    nested: also train one model per pair of folds (K(K-1)/2 more runs, core.nested), so that every non-test photo
    is scored by a (K-1)-model ensemble that never trained on it; the ensemble's threshold and calibration are then
    fitted on those ensemble scores instead of the single fold models' out-of-fold scores."""
    folds: int = 0
    nested: bool = False

    def __post_init__(self):
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"cv.folds must be 0 (one validation split) or at least 2, not {self.folds}: one fold "
                              "would leave nothing to train on")
        if not isinstance(self.nested, bool):
            raise ConfigError(f"cv.nested must be true or false, not {self.nested!r}")
        if self.nested and self.folds < 3:
            raise ConfigError(f"cv.nested needs at least 3 folds, not {self.folds}: a pair model leaves out two folds "
                              "and trains on the rest")

    @property
    def enabled(self) -> bool:
        return self.folds >= 2


@dataclass(frozen=True)
class RunConfig:
    name: str
    stages: tuple[StageConfig, ...]
    backbone: str = "convnext_tiny"
    weights: str = "imagenet"     # 'imagenet' (timm download), 'none' (random), or a local weights file
    head: HeadConfig = field(default_factory=HeadConfig)
    input_size: int | None = None  # None: the weights' own input size (tests use small images for speed)
    init_from: str | None = None  # a previous run folder whose bundle starts this run
    seed: int = 0
    split: SplitConfig = field(default_factory=SplitConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    select_metric: str = "roc_auc"  # best epoch on validation; recall breaks ties
    precision: str = "auto"       # 'auto': bf16-mixed on CUDA and on CPUs with native bf16, else fp32 (core.device)
    device: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    num_workers: int | None = None  # None: sized to the machine
    decode_cache: str | None = None  # folder for decoded, downsized photos (core.cache.DecodeCache); None: off
    grad_checkpointing: bool = False
    channels_last: bool = True
    report_test: bool = False     # after selection, evaluate the chosen model once on the last stage's test split
    n_boot: int = 1000
    context: ContextConfig | None = None  # a context stage over the image logit + clinical answers (issue 14)
    # K-fold cross-validation: split.val is then not used (each fold validates one fold run), and split.test may
    # be 0 when the user has an outside test set (the out-of-fold metrics are then the only internal estimate)
    cv: CVConfig = field(default_factory=CVConfig)
    data_help: str | None = None  # where the recipe's data comes from: said when a data path is missing

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {self.backbone!r}; known: {', '.join(BACKBONES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if not DEVICE_RE.match(str(self.device)):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}")
        if self.input_size is not None and not 16 <= self.input_size <= 4096:  # what a bundle can record
            raise ConfigError(f"input_size must be 16-4096 pixels (or left out), not {self.input_size}")
        if self.head.kind == "mlp" and self.head.hidden < 1:
            raise ConfigError(f"head.hidden must be a positive number of units, not {self.head.hidden}")
        if self.select_metric not in selection_metrics():
            raise ConfigError(f"select_metric must be one of {', '.join(selection_metrics())}, "
                              f"not {self.select_metric!r}")
        if not self.stages:
            raise ConfigError("a run needs at least one stage")
        if self.cv.enabled:
            if not 0 <= self.split.test < 1:
                raise ConfigError("split: test must be >= 0 and < 1 (split.val is not used with cv)")
        elif not 0 < self.split.val < 1 or not 0 <= self.split.test < 1 or self.split.val + self.split.test >= 1:
            raise ConfigError("split: val must be > 0 (epochs and the threshold are chosen on it), test >= 0, "
                              "and val + test < 1")
        if self.report_test and self.split.test == 0:
            raise ConfigError("report_test needs a test split (split.test > 0)")

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, raw: dict, where: str):
    """Instantiate a frozen dataclass from a dict, naming unknown keys and mistyped values instead of a TypeError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    prefix = "" if where == "run" else f"{where}."
    raw = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    try:
        return cls(**raw)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # e.g. HeadConfig's own checks raise ValueError
        raise ConfigError(f"{where}: {e}") from e


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(value, hint, key: str):
    """`value` as the field's declared type (float, int, bool, str, Optional, tuple), or a ConfigError naming
    the key, the value and the type. YAML 1.1 reads 1e-4 (no dot) as text and `no` as False: both are caught
    here, when the config is read, not after training."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            if isinstance(value, str) and value.strip().lower() in ("none", "null") and inner[0] is not str:
                return None
            return _coerce(value, inner[0], key)
        return value
    if typing.get_origin(hint) in (tuple, list) and isinstance(value, (list, tuple)):
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)) if args else tuple(value)
    if hint not in (float, int, bool, str):
        return value  # nested dataclasses are built by their own _build call
    try:
        return _SCALARS[hint](value)
    except (TypeError, ValueError, OverflowError):
        hint_name = {float: "a finite number (float)", int: "a whole number (int)", bool: "true or false (bool)",
                     str: "text (str)"}[hint]
        extra = " (YAML reads yes/no/on/off as booleans: quote the value)" if hint is str and isinstance(value, bool) \
            else ""
        raise ConfigError(f"{key}: expected {hint_name}, got {value!r}{extra}") from None


def _to_float(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TypeError
    out = float(v)
    if not math.isfinite(out):
        raise ValueError
    return out


def _to_int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TypeError
    if isinstance(v, int):
        return v
    f = float(v)
    if not f.is_integer():
        raise ValueError
    return int(f)


def _to_bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise ValueError


def _to_str(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)  # YAML turned e.g. a run name 2024 into a number
    raise TypeError


_SCALARS = {float: _to_float, int: _to_int, bool: _to_bool, str: _to_str}


def run_config_from_dict(raw: dict) -> RunConfig:
    raw = dict(raw)
    data_root = raw.pop("data_root", None)  # resolved into the paths here, so a resumed run never joins twice
    ignored = [k for k in ("weights", "head", "input_size") if raw.get("init_from") and k in raw]
    if ignored:  # the parent bundle fixes these; silently ignoring them would misdescribe the run
        raise ConfigError(f"init_from {raw['init_from']!r} fixes the model: remove {', '.join(ignored)}")
    stages = []
    for i, s in enumerate(raw.pop("stages", None) or []):
        s = dict(s)
        data = tuple(_build(DataSource, _under(data_root, d), f"stages[{i}].data") for d in (s.pop("data", None) or []))
        stages.append(_build(StageConfig, {**s, "data": data}, f"stages[{i}]"))
    if "cv" in raw and raw["cv"] is None:
        raw.pop("cv")  # `cv:` with nothing under it: no cross-validation
    nested = {"head": HeadConfig, "split": SplitConfig, "threshold": ThresholdConfig, "context": ContextConfig,
              "cv": CVConfig}
    for key, cls in nested.items():
        if raw.get(key) is not None:
            raw[key] = _build(cls, raw[key], key)
    return _build(RunConfig, {**raw, "stages": tuple(stages)}, "run")


def _under(root: str | None, source: dict) -> dict:
    """A data source's relative paths taken under the recipe's data_root (absolute paths are kept)."""
    if not root or not isinstance(source, dict):
        return source
    return {k: str(Path(root) / v) if k in ("manifest", "csv", "metadata", "images") and v and not Path(v).is_absolute() else v
            for k, v in source.items()}


def apply_override(raw: dict, dotted: str) -> None:
    """Apply one `a.b.0.c=value` override in place (value parsed as YAML: numbers, booleans, lists).

    Types are checked when the config is built (run_config_from_dict), before anything runs."""
    import yaml
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} must look like key.path=value")
    path, value = dotted.split("=", 1)
    keys = path.strip().split(".")
    node = raw
    for depth, k in enumerate(keys):
        where = ".".join(keys[:depth + 1])
        if isinstance(node, list):
            if not k.lstrip("-").isdigit() or not -len(node) <= int(k) < len(node):
                raise ConfigError(f"override {dotted!r}: {where} is not an index of a list of {len(node)}")
            k = int(k)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:depth])} is a value, not a section")
        if depth == len(keys) - 1:
            break
        node = node[k] if isinstance(node, list) else node.setdefault(k, {})
    try:
        node[k] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {dotted!r}: the value is not valid YAML ({e})") from None


# What a resumed run may change: where and how fast it trains, not what it learns; and cv.nested, which adds the
# pair runs to a finished cross-validation (core.cv).
RESUME_MAY_CHANGE = ("name", "precision", "device", "devices", "num_nodes", "num_workers", "decode_cache",
                     "grad_checkpointing", "channels_last", "data_help", "cv.nested")


def changed_settings(started: dict, now: dict) -> list[str]:
    """The settings (dotted keys, e.g. stages.0.lr) in which `now` differs from the config a run `started` with,
    leaving aside RESUME_MAY_CHANGE."""
    def walk(a, b, prefix: str):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if f"{prefix}{k}" not in RESUME_MAY_CHANGE:
                    yield from walk(a.get(k), b.get(k), f"{prefix}{k}.")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                yield from walk(x, y, f"{prefix}{i}.")
        elif a != b:
            yield prefix.rstrip(".")
    plain = lambda d: json.loads(json.dumps(d, default=str))  # noqa: E731  (tuples, lists compare alike)
    return list(walk(plain(started), plain(now), ""))
