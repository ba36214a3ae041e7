"""Tests for core.engine: the PyTorch / ONNX Runtime choice (speed and accuracy simulated), the graph's disk cache,
the overrides, and that both engines give the same probabilities, heat-maps and embeddings."""
from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch

import core.engine as eng
import core.inference as inf
from core.bundle import load_bundle, save_bundle
from core.embeddings import embed
from core.images import load_image
from core.inference import Predictor
from tests.conftest import make_images, shared_path, small_model

SIZE = 64
pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return save_bundle(small_model(), tmp_path_factory.mktemp("bundle"), threshold={"value": 0.5, "rule": "fixed"},
                       provenance={"run_name": "engine-test"})


@pytest.fixture(scope="module")
def graph(bundle_dir):
    """Export this bundle's graph once (into the session's private user cache); later loads reuse it."""
    b = load_bundle(bundle_dir)
    return eng.load_features(b.model, b.spec.preprocessing).path


def clock(pytorch_s: float, ort_s: float):
    """A fake timer for measure_ms: each timed call starts at 0 and ends after the engine's simulated time
    (PyTorch's call is timed first in every round)."""
    return itertools.cycle([0.0, pytorch_s, 0.0, ort_s]).__next__


def fp32_predictor(bundle_dir, monkeypatch) -> Predictor:
    monkeypatch.setenv("SKINSCREEN_FP32", "1")  # the plain fp32 PyTorch fast path, also on bf16 CPUs
    p = Predictor(load_bundle(bundle_dir), device="cpu", engine="pytorch")
    monkeypatch.delenv("SKINSCREEN_FP32")
    return p


def test_preference_reads_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv(eng.ENV, raising=False)
    assert eng.preference() == "auto"
    monkeypatch.setenv(eng.ENV, "OnnxRuntime ")
    assert eng.preference() == "onnxruntime"
    assert eng.preference("pytorch") == "pytorch"  # an explicit argument wins over the environment
    monkeypatch.setenv(eng.ENV, "tensorrt")
    with pytest.raises(ValueError, match="SKINSCREEN_ENGINE='tensorrt'"):
        eng.preference()
    with pytest.raises(ValueError, match="engine='gpu'"):
        eng.preference("gpu")


def test_pytorch_override_and_non_cpu_devices_build_no_graph(bundle_dir, monkeypatch):
    def no_export(*a, **k):
        raise AssertionError("no graph may be exported")
    monkeypatch.setattr(eng, "export_graph", no_export)
    p = Predictor(load_bundle(bundle_dir), device="cpu", engine="pytorch")
    assert p.engine["engine"] == "pytorch" and "asked for" in p.engine["reason"]
    assert p._features[0] is p.model or not isinstance(p._features[0], eng.OrtFeatures)
    m = small_model()
    features, rec = eng.choose_engine(m, m.spec.preprocessing, torch.device("cuda"), m, None, engine="onnxruntime")
    assert features is m and rec["engine"] == "pytorch" and "CPU devices only" in rec["reason"]
    assert Predictor(load_bundle(bundle_dir), device="cpu", fast=False).engine["engine"] == "pytorch"


@pytest.mark.slow  # the module's graph export takes seconds (then cached)
def test_environment_variable_selects_onnxruntime(bundle_dir, graph, monkeypatch):
    monkeypatch.setenv(eng.ENV, "onnxruntime")
    p = Predictor(load_bundle(bundle_dir), device="cpu")
    assert isinstance(p._features[0], eng.OrtFeatures) and p.engine["engine"] == "onnxruntime"
    assert p.dtype is None  # the graph is fp32: no autocast on its path
    assert p.engine["feature_rel_err"] < 1e-4 and p.engine["max_abs_prob_diff"] < 1e-4  # measured, not assumed


def test_import_failure_falls_back_to_pytorch(bundle_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    p = Predictor(load_bundle(bundle_dir), device="cpu", engine="auto")
    assert p.engine["engine"] == "pytorch" and "onnxruntime not usable" in p.engine["reason"]
    assert not isinstance(p._features[0], eng.OrtFeatures)
    assert 0 <= p.predict_source(photo(0)).prob <= 1


@pytest.mark.slow  # the module's graph export takes seconds (then cached)
@pytest.mark.parametrize("pytorch_s, ort_s, expected", [(0.010, 0.0095, "pytorch"),   # 5% faster: not enough
                                                        (0.010, 0.012, "pytorch"),    # slower
                                                        (0.010, 0.005, "onnxruntime")])
def test_auto_choice_follows_the_measured_latency(bundle_dir, graph, pytorch_s, ort_s, expected):
    b = load_bundle(bundle_dir)
    m, pp = b.model, b.spec.preprocessing
    features, rec = eng.choose_engine(m, pp, torch.device("cpu"), m, None, engine="auto",
                                      timer=clock(pytorch_s, ort_s))
    assert rec["engine"] == expected, rec
    assert rec["ms"] == {"pytorch": pytorch_s * 1e3, "onnxruntime": ort_s * 1e3}
    assert isinstance(features, eng.OrtFeatures) == (expected == "onnxruntime")
    assert rec["feature_rel_err"] is not None and rec["max_abs_prob_diff"] is not None


@pytest.mark.slow  # the module's graph export takes seconds (then cached)
def test_outside_the_probability_tolerance_falls_back(bundle_dir, graph, monkeypatch):
    monkeypatch.setattr(inf, "PRECISION_TOLERANCE", -1.0)  # no |dP| passes, however small
    p = Predictor(load_bundle(bundle_dir), device="cpu", engine="onnxruntime")  # an override never skips accuracy
    assert p.engine["engine"] == "pytorch" and p.engine["reason"].startswith("onnxruntime rejected")
    assert not isinstance(p._features[0], eng.OrtFeatures)


@pytest.mark.slow  # the module's graph export takes seconds (then cached)
def test_perturbed_onnxruntime_output_is_not_used(bundle_dir, graph, monkeypatch):
    exports = []
    monkeypatch.setattr(eng, "export_graph", lambda bb, size, path: exports.append(path))  # the file stays valid
    real = eng.OrtFeatures.feature_map
    monkeypatch.setattr(eng.OrtFeatures, "feature_map", lambda self, x: real(self, x) * 1.05)  # 5% feature error
    p = Predictor(load_bundle(bundle_dir), device="cpu", engine="auto")
    assert p.engine["engine"] == "pytorch" and "feature error 5.00%" in p.engine["reason"]
    assert exports == [graph]  # a cached graph that disagrees is rebuilt once before it is given up
    assert not isinstance(p._features[0], eng.OrtFeatures)


@pytest.mark.slow  # the module's graph export takes seconds (then cached)
def test_second_load_reuses_the_cached_graph(bundle_dir, graph, monkeypatch):
    def no_export(*a, **k):
        raise AssertionError("the cached graph should have been used")
    monkeypatch.setattr(eng, "export_graph", no_export)
    p = Predictor(load_bundle(bundle_dir), device="cpu", engine="onnxruntime")
    assert p.engine["engine"] == "onnxruntime" and p.engine["graph"] == "disk cache"


@pytest.mark.slow  # the module's graph export takes seconds (then cached)
def test_corrupted_cache_file_is_rebuilt(bundle_dir, graph, monkeypatch):
    good = graph.read_bytes()
    graph.write_bytes(good[: len(good) // 3])  # e.g. a disk that filled up during an earlier write
    exports = []

    def export(backbone, size, path):  # what a real export writes (it took seconds; the fixture already ran one)
        exports.append(path)
        path.write_bytes(good)
    monkeypatch.setattr(eng, "export_graph", export)
    b = load_bundle(bundle_dir)
    feats = eng.load_features(b.model, b.spec.preprocessing)
    assert exports == [graph] and "rebuilt" in feats.source and "InvalidProtobuf" in feats.source
    assert graph.stat().st_size > len(good) // 2
    x = inf.check_inputs(b.spec.preprocessing, "cpu", n=3)  # another batch size than the export's example
    with torch.no_grad():
        assert eng.rel_error(feats.feature_map(x), b.model.feature_map(x)) < 1e-4


def photo(seed: int) -> bytes:
    import io

    from PIL import Image
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (31, 41, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).resize((400, 300), Image.BICUBIC).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.slow  # the module's graph export takes seconds (then cached)
def test_both_engines_agree_on_real_pad_photos(bundle_dir, graph, monkeypatch):
    folder = shared_path("data", "pad_ufes_20_subset", "images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:4]
    torch_p = fp32_predictor(bundle_dir, monkeypatch)
    ort_p = Predictor(load_bundle(bundle_dir), device="cpu", engine="onnxruntime")
    assert isinstance(ort_p._features[0], eng.OrtFeatures)
    probs = []
    for path in paths:
        a, b = torch_p.predict_source(str(path)), ort_p.predict_source(str(path))
        assert b.prob == pytest.approx(a.prob, abs=1e-4)
        assert np.abs(b.cam - a.cam).max() < 1e-3 and np.corrcoef(a.cam.ravel(), b.cam.ravel())[0, 1] > 0.9999
        c = ort_p.predict_source(str(path), cam_method="gradcam++")
        d = torch_p.predict_source(str(path), cam_method="gradcam++")
        assert np.abs(c.cam - d.cam).max() < 1e-3
        probs.append(b.prob)
    assert np.ptp(probs) > 0.01  # the photos are told apart: agreement is not two constant outputs
    # the batch path (train.screen) through the same graph
    x = ort_p.to_input(np.stack([ort_p.crop(load_image(str(p), **ort_p.decode_kw)) for p in paths]))
    np.testing.assert_allclose(ort_p.probs(x), torch_p.probs(x), atol=1e-4)


@pytest.mark.slow  # the module's graph export takes seconds (then cached)
def test_onnxruntime_replaces_the_bf16_path_and_its_autocast(bundle_dir, graph, monkeypatch):
    """On a CPU where bf16 passed the precision check, choosing ONNX Runtime must drop autocast (dtype None)."""
    monkeypatch.setattr(inf, "fast_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(inf, "FEATURE_TOLERANCE", 1.0)
    monkeypatch.setattr(inf, "PRECISION_TOLERANCE", 1.0)
    p = Predictor(load_bundle(bundle_dir), device="cpu", engine="onnxruntime")
    assert p.precision["dtype"] == "bfloat16" and p.engine["pytorch_precision"] == "bfloat16"
    assert p.engine["engine"] == "onnxruntime" and p.dtype is None
    monkeypatch.undo()
    ref = fp32_predictor(bundle_dir, monkeypatch)
    assert p.predict_source(photo(3)).prob == pytest.approx(ref.predict_source(photo(3)).prob, abs=1e-4)


# ------------------------------------------------------------------------------------------- batch jobs
@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    df = make_images(folder, n=14, size=(90, 72))
    return df.assign(image=[str(folder / name) for name in df["image"]])


@pytest.mark.slow  # the module's graph export takes seconds (then cached)
def test_embeddings_agree_across_engines(bundle_dir, graph, manifest):
    model = load_bundle(bundle_dir).model
    pp = model.spec.preprocessing
    rep = {}
    with_ort = embed(model, manifest, pp, engine="onnxruntime", batch_size=4, report=rep)
    assert rep["engine"]["engine"] == "onnxruntime"
    with_torch = embed(model, manifest, pp, engine="pytorch", batch_size=4)
    assert with_ort.dtype == np.float32 and with_ort.shape == with_torch.shape == (14, 1280)
    np.testing.assert_allclose(with_ort, with_torch, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # the module's graph export takes seconds (then cached)
@pytest.mark.parametrize("torch_s, ort_s, expected", [(1.0, 0.5, "onnxruntime"), (1.0, 0.95, "pytorch")])
def test_batch_job_keeps_the_engine_faster_on_its_own_batches(bundle_dir, graph, torch_s, ort_s, expected):
    model = load_bundle(bundle_dir).model
    pp = model.spec.preprocessing
    t = [0.0]
    job = eng.batch_features(model.backbone, pp, 10, "cpu", engine="auto", timer=lambda: t[0])
    ran = []
    real_module, real_ort = job.module, job.ort.pooled

    def torch_run(x):
        t[0] += torch_s * len(x)
        ran.append("pytorch")
        return real_module(x)

    def ort_run(x):
        t[0] += ort_s * len(x)
        ran.append("onnxruntime")
        return real_ort(x)
    job.module, job.ort.pooled = torch_run, ort_run
    x = inf.check_inputs(pp, "cpu", n=4)
    outs = [job(x) for _ in range(9)]
    assert ran[:6] == ["pytorch", "onnxruntime"] * 3 and set(ran[6:]) == {expected}
    assert job.record["engine"] == expected and job.record["ms_per_image"]["onnxruntime"] == ort_s * 1e3
    for out in outs[1:]:  # every batch, whichever engine ran it, gives the same fp32 features
        torch.testing.assert_close(out, outs[0], rtol=1e-4, atol=1e-5)


def test_short_batch_jobs_and_classifier_modules_stay_on_pytorch(bundle_dir, monkeypatch):
    monkeypatch.setattr(eng, "export_graph", lambda *a: pytest.fail("no graph for a short job"))
    model = load_bundle(bundle_dir).model
    pp = model.spec.preprocessing
    short = eng.batch_features(model.backbone, pp, eng.MIN_BATCHES - 1, "cpu", engine="auto")
    assert short.record["engine"] == "pytorch" and "too few" in short.record["reason"]
    import timm
    classifier = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=3)
    job = eng.batch_features(classifier, pp, 20, "cpu", engine="auto")
    assert job.record["engine"] == "pytorch" and "classifier head" in job.record["reason"]
