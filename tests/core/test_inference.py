"""Tests for core.inference.Predictor: fast preprocessing equals the reference transform, one forward gives the
probability and the heat-map, the reduced-precision decision, batch and thread consistency."""
from __future__ import annotations

import io
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import core.inference as inf
from core.backbones import get_spec
from core.bundle import load_bundle, save_bundle
from core.gradcam import reference_cam
from core.images import load_image
from core.inference import Prediction, Predictor
from core.model import HeadConfig, LesionClassifier
from tests.conftest import small_model, spread_logits

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")






@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    return save_bundle(small_model(), folder, threshold={"value": 0.4, "rule": "fixed"},
                       provenance={"run_name": "unit-test", "validation_metrics": {"roc_auc": 0.5}})


def photo_bytes(size=(400, 300), seed=0, fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1] // 10 + 1, size[0] // 10 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(a).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(400, 300), (300, 400), (73, 200), (210, 180), (97, 61)])
def test_fast_preprocessing_equals_eval_transform(bundle_dir, size):
    p = Predictor(load_bundle(bundle_dir), device="cpu")
    img = Image.open(io.BytesIO(photo_bytes(size, fmt="PNG"))).convert("RGB")
    x, rgb = p.prepare(img)
    ref = p.prepare_reference(img)
    assert x.shape == ref.shape == (1, 3, SIZE, SIZE)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x, ref, atol=1e-5)
    assert rgb.dtype == np.uint8 and rgb.shape == (SIZE, SIZE, 3)


def test_large_non_jpeg_is_reduced_first_but_stays_close(bundle_dir):
    p = Predictor(load_bundle(bundle_dir), device="cpu")
    img = Image.open(io.BytesIO(photo_bytes((1600, 1200), fmt="PNG"))).convert("RGB")
    x, _ = p.prepare(img)
    ref = p.prepare_reference(img)
    assert float((x - ref).abs().mean()) < 0.02  # normalised units; reducing_gap=3 is near-identical


def test_predict_source_gives_probability_heatmap_and_provenance(bundle_dir):
    p = Predictor(load_bundle(bundle_dir), device="cpu")
    pred = p.predict_source(photo_bytes(), name="upload.jpg")
    assert isinstance(pred, Prediction)
    assert 0.0 <= pred.prob <= 1.0 and pred.threshold == 0.4 and pred.malignant == (pred.prob >= 0.4)
    assert pred.model_input.shape == (SIZE, SIZE, 3) and pred.model_input.dtype == np.uint8
    assert pred.cam.shape == (SIZE, SIZE) and 0.0 <= pred.cam.min() and pred.cam.max() <= 1.0
    assert pred.cam_method == "gradcam"
    assert pred.model["run"] == "unit-test" and pred.model["validation_metrics"] == {"roc_auc": 0.5}
    assert set(pred.timings_ms) == {"decode", "preprocess", "model"}
    assert all(v >= 0 for v in pred.timings_ms.values())


def test_fast_and_fp32_paths_agree_and_cam_matches_pytorch_grad_cam(bundle_dir):
    data = photo_bytes(seed=3)
    fast = Predictor(load_bundle(bundle_dir), device="cpu", fast=True).predict_source(data)
    slow_p = Predictor(load_bundle(bundle_dir), device="cpu", fast=False)
    slow = slow_p.predict_source(data)
    assert abs(fast.prob - slow.prob) < 0.01
    assert np.corrcoef(fast.cam.ravel(), slow.cam.ravel())[0, 1] > 0.98
    # the head-only Grad-CAM equals the hook-based reference on the same layer (fp32)
    x, _ = slow_p.prepare(load_image(data, **slow_p.decode_kw))
    ref = reference_cam(slow_p.model, x.contiguous())[0]
    assert np.corrcoef(slow.cam.ravel(), ref.ravel())[0, 1] > 0.99


def test_gradcam_plus_plus_matches_pytorch_grad_cam(bundle_dir):
    data = photo_bytes(seed=0)
    slow_p = Predictor(load_bundle(bundle_dir), device="cpu", fast=False)
    ours = slow_p.predict_source(data, cam_method="gradcam++").cam
    fast = Predictor(load_bundle(bundle_dir), device="cpu", fast=True).predict_source(data, cam_method="gradcam++")
    x, _ = slow_p.prepare(load_image(data, **slow_p.decode_kw))
    ref = reference_cam(slow_p.model, x.contiguous(), method="gradcam++")[0]  # pytorch-grad-cam's GradCAMPlusPlus
    assert ours.shape == ref.shape == (SIZE, SIZE)
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.999
    assert np.abs(ours - ref).max() < 1e-3  # measured 1.4e-6: the same closed form, in fp32 on one layer
    assert np.corrcoef(fast.cam.ravel(), ref.ravel())[0, 1] > 0.98
    # and it is not plain Grad-CAM (which differs visibly on this model: correlation 0.88)
    plain = reference_cam(slow_p.model, x.contiguous(), method="gradcam")[0]
    assert np.corrcoef(ours.ravel(), plain.ravel())[0, 1] < 0.95


def test_without_cam_and_with_gradcam_plus_plus(bundle_dir):
    p = Predictor(load_bundle(bundle_dir), device="cpu")
    data = photo_bytes(seed=4)
    plain = p.predict_source(data, cam_method=None)
    pp = p.predict_source(data, cam_method="gradcam++")
    assert plain.cam is None and plain.cam_method is None
    assert pp.cam.shape == (SIZE, SIZE) and abs(pp.prob - plain.prob) < 1e-6
    with pytest.raises(ValueError, match="CAM method"):
        p.predict_source(data, cam_method="eigencam")


def test_draft_decoding_does_not_make_a_large_photo_look_small(bundle_dir):
    # the model needs only ~73 px: by the 1.4x margin alone a 1000x750 JPEG would be drafted to 1/4 (250x187);
    # the floors (quality's MIN_SIDE and working size) keep it at 1/2 (500x375), a photo of normal size
    p = Predictor(load_bundle(bundle_dir), device="cpu")
    pred = p.predict_source(photo_bytes((1000, 750), seed=8))
    assert "too_small" not in [w.code for w in pred.quality]
    small = p.predict_source(photo_bytes((200, 150), seed=8))
    assert "too_small" in [w.code for w in small.quality]


def test_crop_reaches_the_model(bundle_dir):
    p = Predictor(load_bundle(bundle_dir), device="cpu")
    data = photo_bytes((400, 300), seed=5)
    whole = p.predict_source(data)
    part = p.predict_source(data, crop={"left": 0, "top": 0, "width": 150, "height": 150})
    assert not np.array_equal(whole.model_input, part.model_input)


def test_reduced_precision_is_accepted_or_rejected_by_the_measured_check(bundle_dir, monkeypatch):
    # bf16 is emulated (slowly) on CPUs without native support, so the decision logic runs everywhere
    monkeypatch.setattr(inf, "fast_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(inf, "PRECISION_TOLERANCE", 1.0)  # everything passes
    monkeypatch.setattr(inf, "FEATURE_TOLERANCE", 1.0)
    bundle = load_bundle(bundle_dir)
    ok = Predictor(bundle, device="cpu")
    assert ok.dtype == torch.bfloat16 and ok.precision["dtype"] == "bfloat16"
    assert 0 < ok.precision["max_abs_prob_diff"] < 0.1 and 0 < ok.precision["feature_rel_err"] < 0.5  # measured
    # the reduced copy is private: the bundle's own model stays fp32
    assert all(t.dtype == torch.float32 for t in bundle.model.state_dict().values() if t.is_floating_point())
    assert any(t.dtype == torch.bfloat16 for t in ok._features[0].state_dict().values())

    monkeypatch.setattr(inf, "PRECISION_TOLERANCE", -1.0)  # nothing passes: must fall back to fp32
    strict = Predictor(load_bundle(bundle_dir), device="cpu")
    assert strict.dtype is None and strict.precision["dtype"] == "float32"
    assert "rejected" in strict.precision["reason"]
    assert strict._features == [strict.model]
    data = photo_bytes(seed=6)
    fp32 = Predictor(load_bundle(bundle_dir), device="cpu", fast=False).predict_source(data).prob
    assert strict.predict_source(data).prob == pytest.approx(fp32, abs=1e-5)


def test_batch_probs_equal_single_predictions(bundle_dir):
    p = Predictor(load_bundle(bundle_dir), device="cpu")
    imgs = [load_image(photo_bytes(seed=s), **p.decode_kw) for s in range(4)]
    batch = p.probs(p.to_input(np.stack([p.crop(im) for im in imgs])))
    single = [p.predict_image(im, cam_method=None).prob for im in imgs]
    assert batch.shape == (4,)
    assert np.allclose(batch, single, atol=2e-3)  # reduced precision may block differently per batch size


def test_concurrent_calls_give_the_sequential_answers(bundle_dir):
    p = Predictor(load_bundle(bundle_dir), device="cpu")
    sources = [photo_bytes(seed=s) for s in range(6)]
    expected = [p.predict_source(s).prob for s in sources]
    got = [None] * len(sources)

    def work(i):
        got[i] = p.predict_source(sources[i]).prob

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(sources))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_app_path_sees_the_pixels_evaluation_saw(tmp_path, interpolation):
    """The threshold is chosen on train.evaluate's probabilities: the app's Predictor must reproduce them
    (fp32) on photos of awkward aspect ratios, large PNGs (box-reduced first) and JPEGs (draft-decoded)."""
    import pandas as pd

    from core.backbones import Preprocessing
    from core.evaluation import predict_probs
    pp = Preprocessing(input_size=SIZE, crop_pct=0.875, interpolation=interpolation, mean=(0.5,) * 3, std=(0.5,) * 3)
    spec = replace(get_spec("mobilenetv2_100"), preprocessing=pp)
    torch.manual_seed(0)
    model = LesionClassifier(spec, HeadConfig(), weights="none").eval()
    spread_logits(model)
    folder = save_bundle(model, tmp_path / "b", threshold={"value": 0.5, "rule": "fixed"}, provenance={})
    paths = []
    for i, (size, fmt) in enumerate([((1024, 683), "JPEG"), ((683, 1024), "PNG"), ((300, 211), "PNG"),
                                     ((640, 480), "JPEG"), ((50, 90), "PNG")]):
        path = tmp_path / f"p{i}.{fmt.lower()}"
        path.write_bytes(photo_bytes(size, seed=i, fmt=fmt))
        paths.append(str(path))
    df = pd.DataFrame({"image": paths, "label": [0, 1, 0, 1, 0]})
    evaluated = predict_probs(load_bundle(folder).model, df, num_workers=0)
    predictor = Predictor(load_bundle(folder), device="cpu", fast=False)
    app = [predictor.predict_source(p, cam_method=None).prob for p in paths]
    np.testing.assert_allclose(app, evaluated, atol=1e-5)


@pytest.fixture
def bf16_anywhere(monkeypatch):
    """Run the bf16 fast path on any CPU: declare this one without native bf16 (as an AVX2-only laptop is), check
    that the real device logic then declines bf16, and force it anyway. torch computes bf16 on every CPU (slowly
    where it is emulated), so the precision check at load and the fp32 re-scoring are tested on every machine
    instead of being skipped where they matter most."""
    import core.device
    monkeypatch.setattr(core.device, "cpu_has_bf16", lambda: False)
    monkeypatch.delenv("SKINSCREEN_FP32", raising=False)
    assert core.device.fast_dtype(torch.device("cpu")) is None  # what an AVX2-only machine decides
    monkeypatch.setattr(inf, "fast_dtype", lambda device: torch.bfloat16)


def test_bf16_simulation_reaches_the_predictor(bf16_anywhere, bundle_dir):
    import core.device
    assert core.device.cpu_has_bf16() is False
    p = Predictor(load_bundle(bundle_dir), device="cpu")
    assert p.precision.get("feature_rel_err") is not None  # the load-time check ran in bf16
    assert p.precision["reason"].startswith(("feature error", "bfloat16 rejected"))


def predictor_at(model, folder, threshold: float, fast: bool) -> Predictor:
    """A CPU Predictor for `model` saved as a bundle with the given threshold."""
    bundle = save_bundle(model, folder, threshold={"value": threshold}, provenance={})
    return Predictor(load_bundle(bundle), device="cpu", fast=fast)


def test_near_the_threshold_the_verdict_comes_from_fp32(tmp_path, bf16_anywhere):
    """bf16 may move P by up to PRECISION_TOLERANCE: a photo that close to the threshold is re-scored in fp32."""
    model = small_model("resnet18")  # a backbone whose bf16 copy passes the load-time check
    data = photo_bytes((300, 220), seed=3)
    reference = predictor_at(model, tmp_path / "a", 0.5, fast=False).predict_source(data, cam_method=None).prob
    fast = predictor_at(model, tmp_path / "b", reference + 0.004, fast=True)
    assert fast.dtype == torch.bfloat16, fast.precision  # resnet18's bf16 copy passes the load-time check
    pred = fast.predict_source(data, cam_method="gradcam")
    assert pred.prob == pytest.approx(reference, abs=1e-5)
    assert pred.malignant is False and pred.cam is not None
    far_pred = predictor_at(model, tmp_path / "c", 0.999, fast=True).predict_source(data, cam_method=None)
    assert abs(far_pred.prob - reference) <= inf.PRECISION_TOLERANCE  # bf16 value, not re-scored


def test_batch_scoring_also_rescores_near_the_threshold(tmp_path, bf16_anywhere):
    model = small_model("resnet18")  # a backbone whose bf16 copy passes the load-time check
    exact = predictor_at(model, tmp_path / "a", 0.5, fast=False)
    imgs = [load_image(photo_bytes((260, 200), seed=s)) for s in range(4)]
    x = torch.cat([exact.prepare(im)[0] for im in imgs])
    reference = exact.probs(x)
    fast = predictor_at(model, tmp_path / "b", float(reference[1]) + 0.003, fast=True)
    assert fast.dtype == torch.bfloat16, fast.precision  # resnet18's bf16 copy passes the load-time check
    got = fast.probs(x)
    assert got[1] == pytest.approx(reference[1], abs=1e-5)
    assert np.abs(got - reference).max() <= inf.PRECISION_TOLERANCE


# ---------------------------------------------------------------- ensembles
@pytest.fixture(scope="module")
def ensemble_dirs(tmp_path_factory):
    """Two single-model bundles of different weights and the ensemble bundle made of them."""
    from core.bundle import Threshold
    from core.ensemble import save_ensemble
    root = tmp_path_factory.mktemp("ensemble")
    singles = [save_bundle(small_model(seed=s), root / f"m{s}", threshold={"value": 0.4, "rule": "fixed"},
                           provenance={"run_name": f"fold {s}"}) for s in (0, 1)]
    ens = save_ensemble([load_bundle(f) for f in singles], root / "ens", threshold=Threshold(0.4, rule="fixed"),
                        provenance={"run_name": "cv"})
    return singles, ens


def test_ensemble_prediction_combines_the_members(ensemble_dirs):
    singles, ens = ensemble_dirs
    data = photo_bytes(seed=11)
    parts = [Predictor(load_bundle(f), device="cpu").predict_source(data) for f in singles]
    p = Predictor(load_bundle(ens), device="cpu")
    pred = p.predict_source(data)
    assert pred.prob == pytest.approx(np.mean([q.prob for q in parts]), abs=1e-5)  # mean of probabilities
    assert pred.disagreement.probs == pytest.approx([q.prob for q in parts], abs=1e-5)
    mean = inf.mean_cam([q.cam[None] for q in parts])[0]
    assert pred.cam.shape == parts[0].cam.shape and np.allclose(pred.cam, mean, atol=1e-4)
    assert not np.allclose(pred.cam, parts[0].cam, atol=1e-3)  # the members' maps differ: the mean is neither
    x = p.to_input(np.stack([pred.model_input]))
    batch = p.assess_batch(x)[0]
    assert batch.raw_prob == pytest.approx(pred.prob, abs=1e-5)
    assert batch.members.probs == pytest.approx(pred.disagreement.probs, abs=1e-5)


def test_ensemble_of_identical_members_predicts_like_the_single_model(tmp_path, bundle_dir):
    from core.bundle import Threshold
    from core.ensemble import save_ensemble
    save_ensemble([load_bundle(bundle_dir)] * 3, tmp_path / "ens", threshold=Threshold(0.4, rule="fixed"),
                  provenance={})
    data = photo_bytes(seed=12)
    one = Predictor(load_bundle(bundle_dir), device="cpu").predict_source(data)
    three = Predictor(load_bundle(tmp_path / "ens"), device="cpu").predict_source(data)
    assert three.prob == pytest.approx(one.prob, abs=1e-5)
    assert np.allclose(three.cam, one.cam, atol=1e-4)
    assert three.disagreement.sd == pytest.approx(0.0, abs=1e-6) and not three.disagreement.split
    assert one.disagreement is None


def test_reduced_precision_is_checked_for_every_member(ensemble_dirs, monkeypatch):
    monkeypatch.setattr(inf, "fast_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(inf, "PRECISION_TOLERANCE", 1.0)
    monkeypatch.setattr(inf, "FEATURE_TOLERANCE", 1.0)
    p = Predictor(load_bundle(ensemble_dirs[1]), device="cpu")
    assert p.dtype == torch.bfloat16 and len(p._features) == 2
    assert all(any(t.dtype == torch.bfloat16 for t in f.state_dict().values()) for f in p._features)


def test_a_heat_map_with_nothing_pushing_towards_malignant_is_flagged_empty(bundle_dir):
    from core.gradcam import cams
    fmap = torch.rand(1, 8, 7, 7) + 0.1                  # positive activations ...
    grads = -torch.rand(1, 8, 7, 7) - 0.1                # ... whose every weight lowers the malignant logit
    flat = cams(fmap, grads, (32, 32), "gradcam")
    assert flat.shape == (1, 32, 32) and flat.max() == 0  # ReLU leaves nothing: a uniform overlay
    pred = Predictor(load_bundle(bundle_dir), device="cpu").predict_source(photo_bytes(seed=4), cam_method="gradcam")
    assert not pred.cam_empty  # a real map
    pred.cam = flat[0]
    assert pred.cam_empty
    pred.cam = None  # no heat-map asked for: nothing to call empty
    assert not pred.cam_empty
