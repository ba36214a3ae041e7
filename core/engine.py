"""The CPU inference engine for feature maps: PyTorch or ONNX Runtime, chosen by measurement at load.

ONNX Runtime computes only the backbone's last feature map (``model.feature_map(x)``, an ONNX graph with a dynamic
batch); pooling, the head and the Grad-CAM gradient stay in PyTorch, so ``OrtFeatures`` drops in wherever the
Predictor uses its feature module (``core.gradcam.map_and_grads(features=...)``). The graph is exported once per
backbone and input size and cached in the per-user cache (``core.userdirs``), keyed by the SHA-256 of the
backbone's weights, its architecture and the onnxruntime/torch versions; a cached graph is checked against fp32
PyTorch every time it is loaded and rebuilt when it cannot be read or does not reproduce the features.

Which engine runs is decided per model (``choose_engine``), on CPU devices only: the current PyTorch feature path
(fp32, or the bf16 copy the precision check kept) and ONNX Runtime are timed on a single photo-like input, and ONNX
Runtime is used only when it is at least ``MARGIN`` faster and its features and probabilities are within the
precision check's tolerances of fp32 PyTorch. ``$SKINSCREEN_ENGINE`` (or ``Predictor(engine=...)``) = ``auto``
(default), ``pytorch`` or ``onnxruntime`` overrides the timing, never the accuracy check. Batch jobs (embeddings)
use ``BatchFeatures``, which times the two engines on their first real batches instead.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

ENV = "SKINSCREEN_ENGINE"
CHOICES = ("auto", "pytorch", "onnxruntime")
MARGIN = 0.10        # ONNX Runtime must take at most 90% of PyTorch's time: noise must not flip the choice
WARMUP, REPS = 2, 5  # single-photo calls per engine at load: first calls select kernels, the median of the rest counts
GRAPH_FORMAT = 1     # bump when what the cached graph computes changes (its inputs, outputs or export settings)
CACHE_KIND = "engines"
MIN_BATCHES = 6      # a batch job shorter than this never pays for the export and the measurement
TRIAL_BATCHES = 2    # timed batches per engine in a batch job (after one warm-up batch each)


class EngineError(RuntimeError):
    """The ONNX graph could not be exported, loaded or made to reproduce PyTorch's features."""


def preference(engine: str | None = None) -> str:
    """The engine asked for: the argument, else $SKINSCREEN_ENGINE, else 'auto'."""
    source = "engine" if engine is not None else ENV
    value = (engine if engine is not None else os.environ.get(ENV, "")).strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{source}={value!r}: the inference engine must be one of {', '.join(CHOICES)}")
    return value


def record(engine: str, reason: str, **measured) -> dict:
    """The decision as stored on the Predictor (Predictor.engine) and in screening provenance."""
    return {"engine": engine, "reason": reason, "ms": measured.pop("ms", {}),
            "feature_rel_err": measured.pop("feature_rel_err", None),
            "max_abs_prob_diff": measured.pop("max_abs_prob_diff", None), **measured}


# ---------------------------------------------------------------------------------------------- the ORT module
class OrtFeatures:
    """A backbone's last feature map from ONNX Runtime's CPU provider: `.feature_map(x)` -> fp32 CPU tensor."""

    def __init__(self, path: Path, backbone: nn.Module, threads: int, source: str):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)  # the same cores PyTorch was given, no more
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # idle threads sleep instead of spinning: the head, Grad-CAM, the decode workers and other programs need
        # these cores between runs (measured on 2 busy cores: ConvNeXt-Tiny 242 ms without spinning, 360 ms with)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.backbone = backbone  # pooling for .pooled() stays in PyTorch
        self.path, self.threads, self.source = Path(path), threads, source

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()  # NCHW, as exported
        return torch.from_numpy(self.session.run(None, {self.input: arr})[0])

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D), what the head sees (timm's forward_head with pre_logits)."""
        return self.backbone.forward_head(self.feature_map(x), pre_logits=True).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooled(x)


class _FeatureMap(nn.Module):
    """The graph exported: image batch -> the backbone's last feature map."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(image)


def backbone_of(model: nn.Module) -> nn.Module | None:
    """The timm backbone whose forward_features is the feature map (a LesionClassifier's or the module itself)."""
    bb = getattr(model, "backbone", model)
    return bb if hasattr(bb, "forward_features") and hasattr(bb, "forward_head") else None


def state_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, values in logical order; not memory format)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def graph_key(backbone: nn.Module, input_size: int) -> str:
    """What the cached graph depends on: the backbone's weights (hashed from its state dict, not the bundle's file:
    the graph holds the backbone alone, so a bundle, an ensemble member and an embedding job with the same backbone
    share one graph; 0.13 s for ConvNeXt-Tiny), its architecture (its repr names every layer and its settings),
    the input size (the spatial size is fixed in the graph) and the exporter/runtime versions."""
    import onnxruntime as ort
    ident = {"format": GRAPH_FORMAT, "weights": state_sha256(backbone),
             "architecture": hashlib.sha256(repr(backbone).encode()).hexdigest(), "input_size": int(input_size),
             "onnxruntime": ort.__version__, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def export_graph(backbone: nn.Module, input_size: int, path: Path) -> None:
    """Write the feature-map graph of `backbone` (fp32, NCHW input `image`, dynamic batch) to `path` atomically."""
    from core.fileio import atomic_write
    model = _FeatureMap(copy.deepcopy(backbone).float().cpu().eval().to(memory_format=torch.contiguous_format))
    g = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, input_size, input_size, generator=g)  # a batch of 1 would fix the batch size
    batch = torch.export.Dim("batch", min=1, max=4096)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), input_names=["image"], output_names=["feature_map"],
                              dynamic_shapes={"image": {0: batch}}, dynamo=True, external_data=False,
                              verbose=False)
    try:
        atomic_write(path, write)
    except Exception as e:  # the exporter raises many types; all mean "no graph"
        raise EngineError(f"ONNX export failed: {type(e).__name__}: {str(e)[:300]}") from e


def _cache_folder() -> tuple[Path, str | None]:
    """The per-user engine cache, or a temporary folder (and why) when it cannot be written."""
    from core import userdirs
    folder = userdirs.cache_dir(CACHE_KIND)
    problem = userdirs.writable(folder)
    if problem is None:
        return folder, None
    return Path(tempfile.mkdtemp(prefix="skinscreen-engine-")), f"cache {folder} not writable ({problem})"


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-sample ||a - ref|| / ||ref|| (the precision check's feature error)."""
    a, ref = a.float().flatten(1), ref.float().flatten(1)
    return float(((a - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)).max())


def load_features(model: nn.Module, pp, *, reference=None) -> OrtFeatures:
    """The ONNX Runtime feature module for `model`, from the disk cache or exported now.

    `reference`: (x, fp32 PyTorch feature map of x), default 2 check inputs. A cached graph that cannot be loaded
    or whose features differ from the reference by more than the precision check's FEATURE_TOLERANCE is rebuilt
    once: a cache is never trusted blindly. Raises ImportError without onnxruntime, EngineError when no usable
    graph can be made."""
    import onnxruntime  # noqa: F401 - fail early and clearly when it is not installed
    backbone = backbone_of(model)
    if backbone is None:
        raise EngineError(f"{type(model).__name__} has no timm forward_features/forward_head to export")
    if reference is None:
        from core.inference import check_inputs
        x = check_inputs(pp, "cpu", n=2)
        with torch.no_grad():
            reference = x, backbone.forward_features(x).float()
    folder, note = _cache_folder()
    path = folder / f"{graph_key(backbone, pp.input_size)[:40]}.onnx"
    threads = torch.get_num_threads()
    problem = None
    if path.is_file():
        try:
            feats = OrtFeatures(path, backbone, threads, "disk cache")
            problem = _fidelity_problem(feats, reference)
            if problem is None:
                return feats
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for a damaged file
            problem = f"{type(e).__name__}: {str(e)[:200]}"
    t0 = time.perf_counter()
    export_graph(backbone, pp.input_size, path)
    took = time.perf_counter() - t0
    source = f"exported in {took:.1f} s" + (f" (cached graph rebuilt: {problem})" if problem else "") + \
        (f"; {note}" if note else "")
    try:
        feats = OrtFeatures(path, backbone, threads, source)
    except Exception as e:  # noqa: BLE001
        raise EngineError(f"onnxruntime could not load the exported graph: {type(e).__name__}: {str(e)[:300]}") from e
    problem = _fidelity_problem(feats, reference)
    if problem is not None:
        raise EngineError(f"the exported graph does not reproduce PyTorch: {problem}")
    return feats


def _fidelity_problem(feats: OrtFeatures, reference) -> str | None:
    """None when the graph's feature maps are within FEATURE_TOLERANCE of the fp32 reference, else why not."""
    from core.inference import FEATURE_TOLERANCE
    x, ref = reference
    got = feats.feature_map(x)
    if got.shape != ref.shape:
        return f"feature map shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    err = rel_error(got, ref.cpu())
    return None if err <= FEATURE_TOLERANCE else f"feature error {err:.2%} (limit {FEATURE_TOLERANCE:.0%})"


# ---------------------------------------------------------------------------------------------- the choice
def measure_ms(fns: dict, x: torch.Tensor, timer, warmup: int = WARMUP, reps: int = REPS) -> dict:
    """Median wall time in ms of each fn(x) after `warmup` untimed calls; the calls alternate, so a change in the
    machine's load (other programs) falls on every engine alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn(x)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = timer()
            fn(x)
            times[name].append(timer() - t0)
    return {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()}


def choose_engine(model: nn.Module, pp, device: torch.device, current: nn.Module, dtype: torch.dtype | None, *,
                  engine: str | None = None, timer=time.perf_counter) -> tuple[object, dict]:
    """(feature module, record): `current` (the PyTorch path: `model` or its reduced-precision copy, run under
    autocast(dtype)) or an OrtFeatures, whichever the measurement picks; see the module docstring.

    With ONNX Runtime chosen the caller must run its features without autocast (dtype None): the graph is fp32."""
    from core.device import autocast
    from core.inference import FEATURE_TOLERANCE, PRECISION_TOLERANCE, check_inputs
    asked = preference(engine)
    torch_path = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    base = {"asked": asked, "pytorch_precision": torch_path}
    if device.type != "cpu":
        return current, record("pytorch", f"ONNX Runtime is tried on CPU devices only (this is {device.type})", **base)
    if asked == "pytorch":
        return current, record("pytorch", f"asked for (engine={asked!r})", **base)
    x = check_inputs(pp, device)
    with torch.no_grad():
        f32 = model.feature_map(x).float()
    try:
        ort_features = load_features(model, pp, reference=(x, f32))
    except ImportError as e:
        return current, record("pytorch", f"onnxruntime not usable: {e}", **base)
    except EngineError as e:
        return current, record("pytorch", f"onnxruntime not used: {e}", **base)
    import onnxruntime as ort
    base.update(graph=ort_features.source, onnxruntime=ort.__version__, threads=ort_features.threads)
    with torch.no_grad():
        got = ort_features.feature_map(x)
        p32 = torch.sigmoid(model.logit_from_map(f32).float())
        pgot = torch.sigmoid(model.logit_from_map(got).float())
    rel, diff = rel_error(got, f32), float((pgot - p32).abs().max())
    measured = {"feature_rel_err": rel, "max_abs_prob_diff": diff, **base}
    accuracy = f"feature error {rel:.2g} (limit {FEATURE_TOLERANCE:.0%}), max |dP| {diff:.2g} (limit " \
               f"{PRECISION_TOLERANCE:g})"
    if not (rel <= FEATURE_TOLERANCE and diff <= PRECISION_TOLERANCE):  # also catches NaN
        return current, record("pytorch", f"onnxruntime rejected: {accuracy}", **measured)
    if asked == "onnxruntime":
        return ort_features, record("onnxruntime", f"asked for (engine={asked!r}); {accuracy}", **measured)

    def torch_features(inp):
        with torch.no_grad(), autocast(device, dtype):
            return current.feature_map(inp)

    ms = measure_ms({"pytorch": torch_features, "onnxruntime": ort_features.feature_map}, x[:1], timer)
    speed = f"single photo {ms['onnxruntime']:.1f} ms vs PyTorch {torch_path} {ms['pytorch']:.1f} ms"
    if ms["onnxruntime"] <= (1 - MARGIN) * ms["pytorch"]:
        return ort_features, record("onnxruntime", f"faster: {speed}; {accuracy}", ms=ms, **measured)
    return current, record("pytorch", f"onnxruntime not faster by {MARGIN:.0%}: {speed}", ms=ms, **measured)


# ---------------------------------------------------------------------------------------------- batch jobs
class BatchFeatures:
    """Pooled fp32 features for a batch job (embeddings): PyTorch or ONNX Runtime, whichever is faster on the
    job's own first batches. Each engine gets one untimed warm-up batch, then TRIAL_BATCHES timed ones, in
    turn; afterwards the faster per image (ONNX Runtime by MARGIN) runs the rest. Every batch's result is used."""

    def __init__(self, module: nn.Module, ort_features: OrtFeatures | None, reason: str, *, timer=time.perf_counter):
        self.module, self.ort, self.timer = module, ort_features, timer
        self.chosen = None if ort_features is not None else "pytorch"
        self.record = record("pytorch", reason) if ort_features is None else None
        self._calls = 0
        self._times = {"pytorch": [], "onnxruntime": []}

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self.ort.pooled(x) if name == "onnxruntime" else self.module(x)).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.chosen is not None:
            return self._run(self.chosen, x)
        name = ("pytorch", "onnxruntime")[self._calls % 2]
        self._calls += 1
        if self._calls <= 2:  # the first batch of each engine is its warm-up
            return self._run(name, x)
        t0 = self.timer()
        out = self._run(name, x)
        self._times[name].append((self.timer() - t0) / max(1, len(x)))
        if self._calls >= 2 * (1 + TRIAL_BATCHES):
            self._decide()
        return out

    def _decide(self) -> None:
        ms = {k: round(statistics.median(v) * 1e3, 3) for k, v in self._times.items()}
        speed = f"{ms['onnxruntime']:.2f} vs {ms['pytorch']:.2f} ms per image (PyTorch fp32) on this job's batches"
        self.chosen = "onnxruntime" if ms["onnxruntime"] <= (1 - MARGIN) * ms["pytorch"] else "pytorch"
        why = "faster" if self.chosen == "onnxruntime" else f"onnxruntime not faster by {MARGIN:.0%}"
        self.record = record(self.chosen, f"{why}: {speed}", ms_per_image=ms, graph=self.ort.source)


def batch_features(module: nn.Module, pp, n_batches: int, device, *, engine: str | None = None,
                   timer=time.perf_counter) -> BatchFeatures:
    """The feature function for a batch job of `n_batches` batches on `device` (see BatchFeatures)."""
    asked = preference(engine)
    if torch.device(device).type != "cpu":
        return BatchFeatures(module, None, f"ONNX Runtime is tried on CPU devices only (this is {device})")
    if asked == "pytorch":
        return BatchFeatures(module, None, f"asked for (engine={asked!r})")
    if asked == "auto" and n_batches < MIN_BATCHES:
        return BatchFeatures(module, None, f"{n_batches} batch(es): too few to pay for an ONNX graph")
    if getattr(backbone_of(module), "num_classes", 0):  # its forward gives logits, not the pooled features
        return BatchFeatures(module, None, "the module has a classifier head; ONNX Runtime gives pooled features")
    try:
        ort_features = load_features(module, pp)
    except ImportError as e:
        return BatchFeatures(module, None, f"onnxruntime not usable: {e}")
    except EngineError as e:
        return BatchFeatures(module, None, f"onnxruntime not used: {e}")
    out = BatchFeatures(module, ort_features, "", timer=timer)
    if asked == "onnxruntime":
        out.chosen, out.record = "onnxruntime", record("onnxruntime", f"asked for (engine={asked!r})",
                                                       graph=ort_features.source)
    return out


def describe(rec: dict | None, precision: dict | None = None) -> str:
    """One line for people: which engine and precision compute the features, and why (Predictor.engine/.precision)."""
    if not rec:
        return ""
    if rec["engine"] == "onnxruntime":
        name = "ONNX Runtime (float32)"
    else:
        name = f"PyTorch {(precision or {}).get('dtype') or rec.get('pytorch_precision') or ''}".strip()
    return f"Engine: {name}; {rec['reason']}."
