"""Run configuration: frozen dataclasses for a chain of training stages, built from plain dicts (YAML at the CLI edge)."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.backbones import BACKBONES
from core.metrics import THRESHOLD_RULES, selection_metrics
from core.model import HeadConfig
from core.splits import SplitConfig
from core.transforms import AUGMENTATIONS

SCHEDULERS = ("none", "plateau", "cosine")
IMPORTERS = ("pad_ufes", "isic", "midas")


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
    precision: str = "auto"       # 'auto' = bf16-mixed on GPUs, fp32 on CPUs; or any Fabric precision
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
    data_help: str | None = None  # where the recipe's data comes from: said when a data path is missing

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {self.backbone!r}; known: {', '.join(BACKBONES)}")
        if self.select_metric not in selection_metrics():
            raise ConfigError(f"select_metric must be one of {', '.join(selection_metrics())}, "
                              f"not {self.select_metric!r}")
        if not self.stages:
            raise ConfigError("a run needs at least one stage")
        if not 0 < self.split.val < 1 or not 0 <= self.split.test < 1 or self.split.val + self.split.test >= 1:
            raise ConfigError("split: val must be > 0 (epochs and the threshold are chosen on it), test >= 0, "
                              "and val + test < 1")
        if self.report_test and self.split.test == 0:
            raise ConfigError("report_test needs a test split (split.test > 0)")

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, raw: dict, where: str):
    """Instantiate a frozen dataclass from a dict, naming unknown keys instead of a TypeError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for f in dataclasses.fields(cls):
        if f.name in raw and isinstance(raw[f.name], str) and f.type in ("float", "int"):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                raw = {**raw, f.name: float(raw[f.name]) if f.type == "float" else int(raw[f.name])}
            except ValueError:
                raise ConfigError(f"{where}.{f.name}: expected a number, got {raw[f.name]!r}") from None
    try:
        return cls(**raw)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


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
    nested = {"head": HeadConfig, "split": SplitConfig, "threshold": ThresholdConfig, "context": ContextConfig}
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
    """Apply one `a.b.0.c=value` override in place (value parsed as YAML: numbers, booleans, lists)."""
    import yaml
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} must look like key.path=value")
    path, value = dotted.split("=", 1)
    keys = path.split(".")
    node = raw
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    last = keys[-1]
    parsed = yaml.safe_load(value)
    if isinstance(node, list):
        node[int(last)] = parsed
    else:
        node[last] = parsed
