"""Export a bundle's model to ONNX (dynamic batch), check it with onnxruntime, and describe it in a sidecar JSON.

The ONNX graph takes the normalised image batch `image` (float32, N x 3 x S x S, RGB, NCHW) and returns `logit`
(N x 1), `prob_malignant` (N x 1, the sigmoid: the raw score), `features` (the pooled features) and, when the
bundle has them, `prob_calibrated` (the calibration map applied) and `ood_score` (the out-of-distribution gate's
distance, its reference arrays inside the graph); the sidecar carries the gate's threshold, the calibration map,
the quality-refusal limits and the verdict rule, so an outside user reproduces the app's verdicts. Preprocessing
is not in the graph: `<file>.onnx.json` says
how to do it (resize the short side to resize_to with the named filter, centre-crop input_size, scale to [0, 1],
subtract mean, divide by std), and carries the decision threshold and the model's provenance, so the exported
file is never used without the threshold and validation numbers it was chosen with.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from core.bundle import WEIGHTS_FILE, Bundle
from core.fileio import atomic_write, atomic_write_json
from core.manifest import file_sha256

SIDECAR_FORMAT = "skinscreen-onnx-model"
DEFAULT_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The export failed, or the exported graph does not reproduce PyTorch's probabilities."""


class _GateScore(nn.Module):
    """One core.ood.OODGate's distance as graph operations (its reference arrays as constants)."""

    def __init__(self, gate):
        super().__init__()
        self.method, self.k = gate.method, int(gate.k or 1)
        for name, value in gate.arrays.items():
            self.register_buffer(f"gate_{name}", torch.as_tensor(np.asarray(value, np.float32)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.method == "knn":
            xn = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
            sims = xn @ self.gate_reference.T
            return 1.0 - torch.topk(sims, self.k, dim=1).values[:, -1:]
        d = feats - self.gate_mean
        proj = d @ self.gate_basis
        inside = (proj ** 2 / self.gate_eigenvalues).sum(dim=1, keepdim=True)
        outside = ((d ** 2).sum(dim=1, keepdim=True) - (proj ** 2).sum(dim=1, keepdim=True)).clamp_min(0)
        return torch.sqrt(inside + outside / self.gate_isotropic)


class _EnsembleGateScore(nn.Module):
    """core.ood.EnsembleGate: each member's distance over its threshold, then the lower median over members."""

    def __init__(self, gate):
        super().__init__()
        self.parts = nn.ModuleList(_GateScore(g) for g in gate.gates)
        self.dims = [g.dim for g in gate.gates]
        self.register_buffer("limits", torch.tensor([g.threshold for g in gate.gates], dtype=torch.float32))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(feats, self.dims, dim=1)
        ratios = torch.cat([part(f) for part, f in zip(self.parts, chunks)], dim=1) / self.limits
        return torch.sort(ratios, dim=1).values[:, (len(self.dims) - 1) // 2:(len(self.dims) - 1) // 2 + 1]


class _ProbModel(nn.Module):
    """The classifier plus, when the bundle has them, its out-of-distribution score and calibrated probability
    (the same maths as core.ood and core.calibration, so an outside user gets the app's numbers); an ensemble
    also returns each member's raw score."""

    def __init__(self, model: nn.Module, gate=None, calibration=None):
        super().__init__()
        from core.model import EnsembleClassifier
        from core.ood import EnsembleGate
        self.model = model
        self.ensemble = isinstance(model, EnsembleClassifier)
        self.gate = None if gate is None else (_EnsembleGateScore if isinstance(gate, EnsembleGate)
                                               else _GateScore)(gate)
        self.calibrated = calibration is not None
        if calibration is not None:
            self.register_buffer("cal", torch.tensor([calibration.slope, calibration.intercept], dtype=torch.float32))

    def output_names(self) -> list[str]:
        return (["logit", "prob_malignant", "features"] + (["prob_calibrated"] if self.calibrated else [])
                + (["ood_score"] if self.gate is not None else []) + (["member_probs"] if self.ensemble else []))

    def forward(self, image: torch.Tensor):
        feats = self.model.backbone(image)
        logit = self.model.head(feats)
        out = [logit, torch.sigmoid(logit), feats]
        if self.calibrated:
            out.append(torch.sigmoid(self.cal[0] * logit + self.cal[1]))
        if self.gate is not None:
            out.append(self.gate(feats))
        if self.ensemble:
            parts = feats.chunk(len(self.model.members), dim=1)
            out.append(torch.sigmoid(torch.cat([m.head(f) for m, f in zip(self.model.members, parts)], dim=1)))
        return tuple(out)


def sidecar_path(onnx_path: str | Path) -> Path:
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def example_inputs(size: int, n: int, seed: int) -> torch.Tensor:
    """Photo-like normalised inputs (smooth colour fields plus noise) rather than pure noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (x + 0.2 * torch.randn(n, 3, size, size, generator=g)).contiguous()


def export_onnx(bundle: Bundle, onnx_path: str | Path, *, opset: int | None = None, example_batch: int = 2,
                check_batch: int = 3, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Write `onnx_path` and its sidecar; return the sidecar dict. Raises ExportError when the check fails.

    The example batch must have at least 2 images (a batch of 1 specialises the batch dimension to 1), and the
    onnxruntime check runs on a batch of another size, so a graph that silently fixed the batch would fail."""
    if example_batch < 2:
        raise ValueError("example_batch must be >= 2: torch.export specialises a batch dimension of 1")
    if check_batch == example_batch:
        raise ValueError("check_batch must differ from example_batch, or a fixed batch size would go unnoticed")
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(bundle.model).float().cpu().eval().to(memory_format=torch.contiguous_format)
    wrapper = _ProbModel(model, bundle.gate, bundle.calibration).eval()
    pp = bundle.spec.preprocessing
    s = pp.input_size
    example = example_inputs(s, example_batch, seed=0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    kwargs = {} if opset is None else {"opset_version": opset}
    t0 = time.time()
    done = {}

    def write(tmp: Path) -> None:  # into place only once checked: a failed export keeps the last good file
        try:
            done["program"] = torch.onnx.export(wrapper, (example,), str(tmp), input_names=["image"],
                                                output_names=wrapper.output_names(),
                                                dynamic_shapes={"image": {0: batch}}, dynamo=True,
                                                external_data=False, **kwargs)
        except Exception as e:  # the exporter raises many types; all mean "no usable file"
            raise ExportError(f"ONNX export of {bundle.spec.name} failed: {type(e).__name__}: {str(e)[:500]}") from e
        done["seconds"] = time.time() - t0
        done["check"] = verify_onnx(tmp, wrapper, s, check_batch, tolerance, name=onnx_path)
        done["opset"] = _opset_of(tmp)
        if opset is not None and done["opset"] != opset:
            raise ExportError(f"opset {opset} was asked for, but the exporter (torch {torch.__version__}) wrote opset "
                              f"{done['opset']}; nothing was written (leave out --opset for its default)")
    atomic_write(onnx_path, write)
    program, export_s, check, opset_used = done["program"], done["seconds"], done["check"], done["opset"]
    meta = bundle.meta
    weights = Path(bundle.path) / WEIGHTS_FILE if bundle.path else None
    sidecar = {
        "format": SIDECAR_FORMAT, "format_version": 1,
        "onnx_file": onnx_path.name, "onnx_sha256": file_sha256(onnx_path), "opset": opset_used,
        "inputs": {"image": {"dtype": "float32", "shape": ["batch", 3, s, s], "layout": "NCHW", "colour": "RGB",
                             "normalisation": "(pixel / 255 - mean) / std"}},
        "outputs": _output_docs(wrapper),
        "verdict_rule": VERDICT_RULE, "ood_gate": _gate_doc(meta), "calibration": meta.calibration,
        "quality_refusals": quality_refusal_limits(), "lacks": bundle.lacks(),
        "preprocessing": {**asdict(pp), "resize_to": pp.resize_to,
                          "steps": ["decode to RGB, apply EXIF orientation, crop to the lesion if a box is given",
                                    f"resize the short side to {pp.resize_to} ({pp.interpolation})",
                                    f"centre-crop {s}x{s}", "scale to [0, 1], subtract mean, divide by std"]},
        "threshold": meta.threshold.to_dict(), "labels": meta.labels, "intended_use": meta.intended_use,
        # The clinical-context stage is not in the graph: plain numbers applied to the graph's logit (formula inside).
        "context_stage": meta.context.to_dict() if meta.context else None,
        # An ensemble is one graph: every member runs inside it and the outputs are already combined.
        "ensemble": meta.ensemble.to_dict() if meta.ensemble else None,
        "provenance": {**meta.summary(), "bundle": str(bundle.path) if bundle.path else None,
                       # hashed here too: a version-1 bundle records none, and this names what was exported
                       "weights_sha256": file_sha256(weights) if weights and weights.is_file() else None,
                       "backbone_spec": meta.backbone, "head": meta.head},
        "verification": check,
        "exported": {"torch": torch.__version__, "exporter": "torch.onnx.export(dynamo=True)",
                     "seconds": round(export_s, 1), "program": type(program).__name__,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    atomic_write_json(sidecar_path(onnx_path), sidecar, indent=1)
    return sidecar


def verify_onnx(onnx_path: Path, wrapper: nn.Module, size: int, batch: int, tolerance: float,
                name: str | Path | None = None) -> dict:
    """Run the file in onnxruntime on a batch of `batch` images; compare every output with PyTorch. Errors name
    the file as `name` (the file being written, not its temporary copy)."""
    import onnxruntime as ort
    name = name or onnx_path
    x = example_inputs(size, batch, seed=1)
    names = wrapper.output_names()
    with torch.no_grad():
        ref = dict(zip(names, (t.numpy() for t in wrapper(x))))
    ref_logit, ref_prob = ref["logit"], ref["prob_malignant"]
    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = dict(zip(names, sess.run(names, {"image": x.numpy()})))
        logit, prob = got["logit"], got["prob_malignant"]
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportError(f"{name}: onnxruntime could not run the exported model on a batch of {batch}: "
                          f"{type(e).__name__}: {str(e)[:500]}") from e
    if prob.shape != ref_prob.shape:
        raise ExportError(f"{name}: output shape {prob.shape} for a batch of {batch}, expected {ref_prob.shape}")
    diff = float(np.abs(prob - ref_prob).max())
    result = {"runtime": f"onnxruntime {ort.__version__} (CPU)", "batch": batch,
              "max_abs_prob_diff": diff, "max_abs_logit_diff": float(np.abs(logit - ref_logit).max()),
              "tolerance": tolerance, "passed": diff <= tolerance}
    if "prob_calibrated" in got:
        result["max_abs_prob_calibrated_diff"] = float(np.abs(got["prob_calibrated"] - ref["prob_calibrated"]).max())
        diff = max(diff, result["max_abs_prob_calibrated_diff"])
    if "member_probs" in got:
        result["max_abs_member_prob_diff"] = float(np.abs(got["member_probs"] - ref["member_probs"]).max())
        diff = max(diff, result["max_abs_member_prob_diff"])
    if "ood_score" in got:  # relative: a Mahalanobis distance can be in the tens
        rel = np.abs(got["ood_score"] - ref["ood_score"]) / np.maximum(np.abs(ref["ood_score"]), 1.0)
        result["max_rel_ood_score_diff"] = float(rel.max())
        diff = max(diff, result["max_rel_ood_score_diff"])
    result["passed"] = diff <= tolerance
    if not diff <= tolerance:  # also catches NaN
        raise ExportError(f"{name}: onnxruntime probabilities differ from PyTorch by {diff:.3g} "
                          f"(> {tolerance:g}) on a batch of {batch}")
    return result


VERDICT_RULE = ("1. quality refusals (quality_refusals) -> not assessed; 2. ood_score > ood_gate.threshold -> not "
                "assessed (the photo is unlike the training photos); 3. prob_malignant >= threshold.value -> "
                "flagged, else not flagged (equivalently prob_calibrated >= calibration.threshold_calibrated). A "
                "screening flag, not a diagnosis.")


def _output_docs(wrapper: _ProbModel) -> dict:
    docs = {"logit": "N x 1 malignancy logit", "prob_malignant": "N x 1 sigmoid(logit): the raw score (the threshold "
            "applies to it); not a calibrated probability", "features": "N x D pooled backbone features",
            "prob_calibrated": "N x 1 calibrated probability: sigmoid(slope * logit + intercept), see calibration",
            "ood_score": "N x 1 distance from the training photos; refuse when > ood_gate.threshold (an ensemble: the "
                         "lower median over its models of distance / that model's limit, so the threshold is 1)",
            "member_probs": "N x K each ensemble member's raw score; prob_malignant is their mean (ensemble.combine)"}
    return {k: docs[k] for k in wrapper.output_names()}


def _gate_doc(meta) -> dict | None:
    if meta.ood_gate is None:
        return None
    return {k: v for k, v in meta.ood_gate.items() if k != "arrays"} | {
        "applied_in_graph": "output ood_score; the reference arrays are constants inside the graph"}


def quality_refusal_limits() -> dict:
    from core import quality as q
    return {"mean_luma_below": q.REFUSE_DARK, "mean_luma_above": q.REFUSE_BRIGHT,
            "max_channel_std_below": q.REFUSE_CONTRAST, "short_side_below_px": q.REFUSE_SIDE,
            "mean_colourfulness_below": q.REFUSE_CHROMA,
            "measured_on": f"the photo downscaled to a long side of {q.WORK_LONG_SIDE} px (core/quality.py)"}


def _opset_of(onnx_path: Path) -> int | None:
    import onnx
    m = onnx.load(str(onnx_path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
