"""Ensembles: combining members, the members' gate, one-bundle round trip, disagreement, and clear refusals."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from core import ood
from core.backbones import get_spec
from core.bundle import BundleError, Threshold, load_bundle, read_meta, save_bundle
from core.ensemble import build_ensemble, disagreement, save_ensemble
from core.model import EnsembleClassifier, HeadConfig, LesionClassifier, combine_logits


def _spec(name="resnet18", size=64):
    spec = get_spec(name)
    return replace(spec, preprocessing=replace(spec.preprocessing, input_size=size))


def _members(n, seed=0, name="resnet18"):
    torch.manual_seed(seed)
    return [LesionClassifier(_spec(name), HeadConfig(), weights="none").eval() for _ in range(n)]


def _saved(tmp_path, models, gates=None):
    out = []
    for i, m in enumerate(models):
        save_bundle(m, tmp_path / f"m{i}", threshold=Threshold(0.5), gate=None if gates is None else gates[i])
        out.append(load_bundle(tmp_path / f"m{i}"))
    return out


@pytest.mark.parametrize("rule", ["mean_prob", "mean_logit"])
def test_identical_members_equal_the_single_model(rule):
    single = _members(1)[0]
    twin = EnsembleClassifier([single, single, single], rule).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(twin(x), single(x), atol=1e-5)


def test_mean_prob_is_the_mean_probability_even_at_extreme_logits():
    z = torch.tensor([[40.0, -40.0], [2.0, -1.0], [-60.0, -60.0]])
    out = combine_logits(z, "mean_prob")
    expected = torch.logit(torch.sigmoid(z.double()).mean(1, keepdim=True))
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:2].double(), expected[:2], atol=1e-5)
    assert abs(float(out[2]) + 60.0) < 1e-3  # both members at -60: the mean probability is theirs, not 0
    assert torch.allclose(combine_logits(z, "mean_logit"), z.mean(1, keepdim=True))


def test_members_of_different_architectures_are_refused():
    with pytest.raises(ValueError, match="one architecture"):
        EnsembleClassifier(_members(1) + _members(1, name="resnet50"))


def test_ensemble_bundle_round_trips_with_member_records(tmp_path):
    models = _members(3)
    bundles = _saved(tmp_path, models)
    save_ensemble(bundles, tmp_path / "ens", threshold=Threshold(0.4, chosen_on="out-of-fold"),
                  provenance={"run_name": "cv"}, member_info=[{"fold": k} for k in range(3)])
    loaded = load_bundle(tmp_path / "ens")
    assert isinstance(loaded.model, EnsembleClassifier) and len(loaded.model) == 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.logit(torch.stack([torch.sigmoid(m(x)) for m in models]).mean(0))
        assert torch.allclose(loaded.model(x), expected, atol=1e-5)
        for m, member in zip(models, loaded.model.members):  # each member is exactly its fold's model
            assert torch.equal(m(x), member(x))
        assert loaded.model.features(x).shape == (2, 3 * models[0].backbone.num_features)
        assert torch.allclose(loaded.model.head(loaded.model.backbone(x)), loaded.model(x))
    info = read_meta(tmp_path / "ens").ensemble
    assert [m["fold"] for m in info.member_info] == [0, 1, 2]
    assert [m["weights_sha256"] for m in info.member_info] == [b.meta.weights_sha256 for b in bundles]


def test_a_view_does_not_switch_the_ensemble_to_training_mode(tmp_path):
    ens = EnsembleClassifier(_members(2)).eval()
    view = ens.backbone
    was = view.training
    view.eval()
    view.train(was)
    assert not ens.training and not ens.members[0].head.training


def test_ensemble_section_must_match_the_model(tmp_path):
    single = _members(1)[0]
    with pytest.raises(BundleError, match="ensemble"):
        save_bundle(single, tmp_path / "x", threshold=Threshold(0.5), ensemble={"members": 2})
    with pytest.raises(BundleError, match="ensemble"):
        save_bundle(EnsembleClassifier(_members(2)), tmp_path / "y", threshold=Threshold(0.5))


def test_edited_member_count_is_refused_clearly(tmp_path):
    save_ensemble(_saved(tmp_path, _members(2)), tmp_path / "ens", threshold=Threshold(0.5), provenance={})
    meta = json.loads((tmp_path / "ens" / "model.json").read_text())
    meta["ensemble"]["members"] = 3
    (tmp_path / "ens" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="do not match"):
        load_bundle(tmp_path / "ens")
    meta["ensemble"]["members"] = 0
    (tmp_path / "ens" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="positive"):
        load_bundle(tmp_path / "ens")


def test_nested_ensembles_are_refused(tmp_path):
    save_ensemble(_saved(tmp_path, _members(2)), tmp_path / "ens", threshold=Threshold(0.5), provenance={})
    with pytest.raises(BundleError, match="itself an ensemble"):
        build_ensemble([load_bundle(tmp_path / "ens")])


def _gate(rng, dim, shift=0.0):
    train = rng.normal(shift, 1, (60, dim))
    return ood.fit_gate(train, rng.normal(shift, 1, (30, dim)))


def test_ensemble_gate_refuses_when_most_members_refuse():
    rng = np.random.default_rng(0)
    gates = tuple(_gate(rng, 8) for _ in range(3))
    eg = ood.EnsembleGate(gates)
    inside = rng.normal(0, 1, (1, 8))
    far = inside + 50
    # member 0 sees a far photo, members 1 and 2 a typical one: 1 of 3 refuses -> accepted
    one = np.concatenate([far, inside, inside], 1)
    two = np.concatenate([far, far, inside], 1)
    r1, r2 = eg.check(one)[0], eg.check(two)[0]
    assert r1.accepted and not r2.accepted
    assert "2 of the 3" in r2.reason
    ratios = eg.ratios(two)[0]
    assert r2.score == pytest.approx(np.sort(ratios)[1])
    assert (ratios[:2] > 1).all()


def test_ensemble_gate_round_trips_through_the_bundle(tmp_path):
    rng = np.random.default_rng(1)
    models = _members(2)
    dim = models[0].backbone.num_features
    gates = [_gate(rng, dim) for _ in models]
    save_ensemble(_saved(tmp_path, models, gates), tmp_path / "ens", threshold=Threshold(0.5), provenance={})
    b = load_bundle(tmp_path / "ens")
    assert isinstance(b.gate, ood.EnsembleGate) and b.gate.dim == 2 * dim
    feats = rng.normal(0, 1, (4, 2 * dim))
    assert np.allclose(b.gate.score(feats), ood.EnsembleGate(tuple(gates)).score(feats))


def test_members_without_a_gate_give_an_ensemble_without_one(tmp_path):
    rng = np.random.default_rng(2)
    models = _members(2)
    gates = [_gate(rng, models[0].backbone.num_features), None]
    save_ensemble(_saved(tmp_path, models, gates), tmp_path / "ens", threshold=Threshold(0.5), provenance={})
    assert load_bundle(tmp_path / "ens").gate is None


def test_disagreement_says_when_members_fall_on_both_sides():
    d = disagreement([0.2, 0.5, 0.7], 0.4)
    assert d.split and d.n_flagging == 2 and "disagree" in d.sentence() and "2 of 3" in d.sentence()
    agree = disagreement([0.6, 0.7, 0.9], 0.4)
    assert not agree.split and "all flag it" in agree.sentence()
    assert disagreement([0.3], 0.4) is None


def test_similar_cases_and_features_use_every_member(tmp_path):
    from core.trust import features_and_logits
    from tests.conftest import make_images
    df = make_images(tmp_path / "img", n=8)
    df["image"] = [str(tmp_path / "img" / i) for i in df["image"]]
    models = _members(2)
    save_ensemble(_saved(tmp_path, models), tmp_path / "ens", threshold=Threshold(0.5), provenance={},
                  similar_df=df)
    b = load_bundle(tmp_path / "ens")
    feats, logits = features_and_logits(b.model, df)
    assert feats.shape == (8, 2 * models[0].backbone.num_features)
    member_logits = [features_and_logits(m, df)[1] for m in models]
    expected = np.log(np.mean([1 / (1 + np.exp(-z)) for z in member_logits], 0))
    expected -= np.log1p(-np.exp(expected))
    assert np.allclose(logits, expected, atol=1e-4)
    hits = b.similar.query(feats[:1], 1)[0]
    assert hits[0].image.endswith(df["image"].iloc[0].split("/")[-1])  # a photo is its own nearest case
    assert b.model.training is False and not b.model.members[0].training
