"""Tests for `python -m train.evaluate` on an ensemble bundle: the ensemble's metrics plus each member's own."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.backbones import get_spec
from core.bundle import Threshold, load_bundle, save_bundle
from core.ensemble import save_ensemble
from core.evaluation import predict_probs
from core.manifest import write_manifest
from core.model import HeadConfig, LesionClassifier
from tests.conftest import make_images, spread_logits
from train.evaluate import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_ensemble_report_has_its_members_metrics(tmp_path, capsys):
    spec = get_spec("mobilenetv2_100")
    spec = replace(spec, preprocessing=replace(spec.preprocessing, input_size=64))
    members = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        model = LesionClassifier(spec, HeadConfig()).eval()
        spread_logits(model, std=3.0)
        members.append(load_bundle(save_bundle(model, tmp_path / f"m{seed}", threshold={"value": 0.5})))
    save_ensemble(members, tmp_path / "ens", threshold=Threshold(0.5, rule="fixed"), provenance={"run_name": "cv"},
                  member_info=[{"fold": k} for k in range(3)])
    df = make_images(tmp_path / "img", n=16)
    df["image"] = [str(tmp_path / "img" / i) for i in df["image"]]
    manifest = write_manifest(df, tmp_path / "m.csv")
    out = tmp_path / "report.json"
    assert main(["--run", str(tmp_path / "ens"), "--manifest", str(manifest), "--out", str(out), "--n-boot", "50",
                 "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    ens = report["ensemble"]
    assert [m["fold"] for m in ens["members"]] == [0, 1, 2]
    y = df["label"].to_numpy()
    from sklearn.metrics import roc_auc_score
    for m, b in zip(ens["members"], members):  # each member's AUC is its own model's, scored alone
        alone = predict_probs(b.model, df, num_workers=0)
        assert m["metrics"]["roc_auc"]["value"] == pytest.approx(roc_auc_score(y, alone), abs=1e-6)
    singles = np.stack([predict_probs(b.model, df, num_workers=0) for b in members], 1)
    probs = pd.DataFrame(report["predictions"])["prob"].to_numpy()
    assert np.allclose(probs, singles.mean(1), atol=1e-5)  # the ensemble's score is the members' mean
    split = ((singles >= 0.5).any(1) & ~(singles >= 0.5).all(1)).mean()
    assert ens["split_fraction"] == pytest.approx(split)
    assert "members disagree" in capsys.readouterr().out


def test_every_unusable_image_and_an_unwritable_report_are_named_before_any_scoring(tmp_path, capsys, monkeypatch):
    df = make_images(tmp_path / "img", n=6)
    df["image"] = [str(tmp_path / "img" / i) for i in df["image"]]
    df.loc[1, "image"], df.loc[4, "image"] = str(tmp_path / "gone.jpg"), str(tmp_path / "also_gone.png")
    for i in (2, 3):  # cut short after a sound header: only decoding the pixels finds these
        whole = Path(df.loc[i, "image"]).read_bytes()
        Path(df.loc[i, "image"]).write_bytes(whole[: len(whole) * 2 // 3])
    manifest = write_manifest(df, tmp_path / "m.csv")
    scored = []
    monkeypatch.setattr("train.evaluate.features_and_logits", lambda *a, **k: scored.append(1))
    assert main(["--run", "demo", "--manifest", str(manifest), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "4 unusable image(s)" in err and "gone.jpg: file not found" in err and "also_gone.png" in err
    assert err.count("truncated or corrupt image data") == 2
    good = write_manifest(df.drop(index=[1, 2, 3, 4]), tmp_path / "good.csv")
    assert main(["--run", "demo", "--manifest", str(good), "--out", str(tmp_path / "m.csv" / "r.json")]) == 2
    assert "m.csv is a file, not a folder" in capsys.readouterr().err
    assert not scored and not (tmp_path / "r.json").exists()


def test_a_report_written_over_its_manifest_is_refused(tmp_path, capsys):
    """`--out m.csv` wrote the JSON report over the manifest it was evaluating."""
    from PIL import Image
    for i in range(4):
        Image.new("RGB", (64, 64), (120 + 20 * i, 80, 60)).save(tmp_path / f"p{i}.jpg")
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"image": [f"p{i}.jpg" for i in range(4)], "label": [0, 1, 0, 1]}).to_csv(manifest, index=False)
    text = manifest.read_text()
    assert main(["--run", "demo", "--manifest", str(manifest), "--out", str(manifest)]) == 2
    assert f"{manifest}: is an input of this command" in capsys.readouterr().err and manifest.read_text() == text


def test_a_photo_listed_twice_is_named_not_counted_twice(tmp_path, capsys):
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (64, 64), (120 + 20 * i, 80, 60)).save(tmp_path / f"p{i}.jpg")
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"image": ["p0.jpg", "p1.jpg", "p0.jpg", "p2.jpg", "p2.jpg"], "label": [0, 1, 1, 0, 0]}).to_csv(
        manifest, index=False)
    assert main(["--run", "demo", "--manifest", str(manifest), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "2 photo(s) listed more than once" in err and "p0.jpg (2 times, labels 0, 1)" in err
    assert "p2.jpg (2 times, labels 0)" in err and not (tmp_path / "r.json").exists()
