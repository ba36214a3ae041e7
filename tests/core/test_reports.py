"""Tests for core.reports: finding saved evaluation reports, their tables and examples, and PCA outputs."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core import reports


def _report(probs, labels, thr=0.5):
    from core.evaluation import build_report
    df = pd.DataFrame({"image": [f"/nope/{i}.jpg" for i in range(len(labels))], "label": labels,
                       "fitzpatrick": ["II", "V"] * (len(labels) // 2)})
    return build_report(df, np.asarray(probs, float), thr, n_boot=20, split="val")


def test_reports_tables_and_examples(tmp_path):
    rep = _report([0.9, 0.2, 0.7, 0.4, 0.1, 0.6], [1, 0, 0, 1, 0, 1])
    for rel in ("a/val_report.json", "a/test_report.json", "b/report_pad_test.json", "b/bundle/val_report.json",
                "c/report_other.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(rep if "other" not in rel else {"hello": 1}))
    found = [reports.report_label(p, tmp_path) for p in reports.find_reports(tmp_path)]
    assert found == ["a/test_report.json", "a/val_report.json", "b/report_pad_test.json", "c/report_other.json"]
    loaded = reports.load_report(tmp_path / "a/val_report.json")
    table = reports.metrics_table({"A (val)": loaded})
    assert list(table.columns[:9]) == ["Model", "n", "malignant", "Accuracy", "Precision (PPV)",
                                       "Sensitivity (recall)", "Specificity", "F1", "ROC-AUC"]
    assert table.loc[0, "Accuracy"].startswith("0.667") and table.loc[0, "n"] == 6
    subs = reports.subgroup_tables(loaded)
    assert list(subs["fitzpatrick"]["fitzpatrick"]) == ["II", "V"]
    ex = reports.example_predictions(loaded, n=2)
    assert [r["prob"] for r in ex["correct"]] == [0.9, 0.1]
    assert [r["prob"] for r in ex["incorrect"]] == [0.7, 0.4]
    with pytest.raises(ValueError, match="not an evaluation report"):
        reports.load_report(tmp_path / "c/report_other.json")


def test_paired_comparison_of_two_reports_on_the_same_photos_or_why_not():
    labels = [1, 0] * 20
    rng = np.random.default_rng(0)
    weak = _report(np.clip(0.5 + 0.1 * (np.array(labels) - 0.5) + rng.normal(0, 0.2, 40), 0, 1), labels)
    strong = _report(np.clip(0.5 + 0.8 * (np.array(labels) - 0.5) + rng.normal(0, 0.1, 40), 0, 1), labels)
    text = reports.paired_comparison("old", weak, "new", strong, n_boot=200)
    diff = strong["metrics"]["roc_auc"]["value"] - weak["metrics"]["roc_auc"]["value"]
    assert text.startswith("Paired on the same 40 photos") and f"= {diff:+.3f} [" in text
    assert "**new** minus **old**" in text
    fewer = {**strong, "predictions": strong["predictions"][:30]}
    assert reports.paired_comparison("old", weak, "new", fewer).startswith("No paired comparison: the two score "
                                                                           "sets are not the same photos")
    assert reports.paired_comparison("old", weak, "new", {"metrics": {}}) == \
        "No paired comparison: new: no per-photo predictions (missing image, label, prob)."
    other = {**strong, "predictions": [{**r, "image": r["image"] + ".test"} for r in strong["predictions"]]}
    assert reports.paired_comparison("val", weak, "test", other).startswith(
        "No paired comparison: these reports score different photos (none in common")
    # the built-in demo's shipped reports name photos without their folders: still the same photos
    in_folder = {**strong, "predictions": [{**r, "image": "/data/pad/" + r["image"]} for r in strong["predictions"]]}
    assert reports.paired_comparison("old", weak, "new", in_folder, n_boot=200) == text


def test_find_pca(tmp_path):
    d = tmp_path / "pca"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"pca": {"explained_variance_ratio": [0.3, 0.1]}}))
    pd.DataFrame({"pc1": [0.1], "pc2": [0.2], "domain": ["isic"], "label": [1]}).to_csv(d / "pixels.csv", index=False)
    (d / "other.csv").write_text("a,b\n1,2\n")
    (d / "pca.html").write_text("<html></html>")
    found = reports.find_pca([tmp_path, tmp_path / "absent"])
    assert len(found) == 1 and found[0].tables == (d / "pixels.csv",) and found[0].html == (d / "pca.html",)
    assert reports.read_pca_table(found[0].tables[0])["domain"].tolist() == ["isic"]


def test_context_section_becomes_a_table_roc_curves_and_weights():
    """A report's clinical-context section (written by core.context_report) read back for the Dashboard: rows in
    the writer's order with the writer's numbers, one ROC curve per score from the per-image rows (their AUC the
    section's), and each answer's weight; a report without the section gives nothing."""
    from core import metrics
    from core.context_report import context_report
    from tests.core.test_context import fitted, synthetic
    df, prob = synthetic()
    model = fitted(df, prob)
    test = (df["split"] == "test").to_numpy()
    rep = {"metrics": {}, "context": json.loads(json.dumps(context_report(
        df[test].reset_index(drop=True), prob[test], 0.5, model, n_boot=50)))}
    table = reports.context_table(rep)
    assert table["Inputs"].tolist()[:3] == ["image only", "context only", "photo + answers (fused)"]
    assert table["Inputs"].tolist()[3:] == [f"fused, {f} withheld" for f in model.fields] + [
        "no answers (photo only, as the app does)"]
    fused = rep["context"]["fused"]
    assert table.loc[2, "ROC-AUC"] == metrics.format_estimate(fused["metrics"]["roc_auc"])
    assert table.loc[2, "threshold"] == fused["threshold"] and table.loc[2, "n"] == int(test.sum())
    curves = reports.context_roc_curves(rep)
    assert [c["name"] for c in curves] == ["image only", "context only", "photo + answers (fused)"]
    y = df.loc[test, "label"].to_numpy()
    for c, key in zip(curves, ("image_only", "context_only", "fused")):
        assert c["auc"] == rep["context"][key]["metrics"]["roc_auc"]["value"]
        assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(c["auc"], abs=1e-9)  # the curve is that score's
    assert len(y) == len(rep["context"]["per_image"])
    weights = reports.context_weights_table(rep)
    bleed = weights[weights["Field"] == "bleed"].set_index("answer")["weight"]
    assert set(bleed.index) == {"yes", "no", "unknown", "missing"} and bleed["yes"] > bleed["no"]
    age = weights[weights["Field"] == "age"]
    assert age["answer"].iloc[0].startswith("per ") and age["answer"].iloc[1] == "missing"
    plain = {"metrics": {}}
    assert reports.context_table(plain).empty and reports.context_roc_curves(plain) == []
    assert reports.context_weights_table(plain).empty


def test_the_dashboard_opens_on_the_chosen_models_own_reports(tmp_path):
    """Not the first three files the walk found (another run's folds): the sidebar model's test, cv and validation
    reports; the demo's evidence for the built-in model; the old rule when the model has none."""
    from core import builtin
    for rel in ("cv_a/folds/fold_0/val_report.json", "cv_a/cv_report.json", "cv_a/test_report.json",
                "mine/val_report.json", "mine/test_report.json", "mine/report_outside_all.json", "mine/bundle/x"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    labels = reports.report_choices(tmp_path)
    assert reports.default_choice(labels, tmp_path / "mine" / "bundle") == ["mine/test_report.json",
                                                                            "mine/val_report.json"]
    assert reports.default_choice(labels, tmp_path / "cv_a" / "bundle") == ["cv_a/test_report.json",
                                                                            "cv_a/cv_report.json"]
    assert reports.default_choice(labels, builtin.DEMO_BUNDLE) == ["built-in demo: test_report.json",
                                                                   "built-in demo: val_report.json"]
    assert reports.default_choice(labels, tmp_path / "elsewhere" / "bundle") == reports.default_choice(labels)
    assert reports.default_choice(labels) == [lb for lb in labels if not lb.startswith("built-in")][:3]


def test_the_demos_pca_says_whose_features_and_how_separable_each_pair_of_datasets_is():
    from core import builtin
    res = next(r for r in reports.find_pca([builtin.DEMO_EVIDENCE]) if r.summary)
    said = reports.pca_description(res.summary)
    assert said.startswith("Embeddings: the pooled features of shared_demo_context (mobilenetv2_100_tflite).")
    assert f"{res.summary['n']} photos" in said
    table = reports.pca_overlap_table(res.summary)
    written = [r for space in res.summary["spaces"].values() for r in space["overlap"]]
    assert len(table) == len(written) and set(table["space"]) == set(res.summary["spaces"])
    assert list(table["separability ROC-AUC (0.5 = same, 1 = apart)"]) == [r["auc"] for r in written]
    assert reports.pca_overlap_table({"spaces": {}}) is None and reports.pca_description(None) is None


def test_fitzpatrick_subgroups_read_as_clinicians_write_them_whatever_the_reports_keys():
    """Reports store types as 2 (older ones 2.0, or the manifest's II); the Dashboard shows II each time."""
    rep = _report([0.9, 0.2, 0.7, 0.4, 0.1, 0.6], [1, 0, 0, 1, 0, 1])
    one = rep["subgroups"]["fitzpatrick"]["2"]
    rep["subgroups"]["fitzpatrick"] = {"2.0": one, "5": one, "unknown": one}
    assert list(reports.subgroup_tables(rep)["fitzpatrick"]["fitzpatrick"]) == ["II", "V", "unknown"]


def test_trust_table_says_why_photos_were_not_assessed_in_words():
    """'by gate' was this tool's jargon: the columns say what a photo was (unlike the training photos, unusable)."""
    rep = {"trust": {"n": 74, "n_not_assessed": 3, "n_refused_by_gate": 2, "n_refused_by_quality": 1,
                     "calibration_before": {"brier": {"value": 0.2, "ci95": [0.1, 0.3]}}}}
    table = reports.trust_table({"demo": rep, "no trust section": {}})
    assert table.to_dict("records")[0] == {
        "Model": "demo", "not assessed": "3 of 74", "of them: unlike the training photos": 2,
        "of them: unusable photo": 1, "Brier (raw)": "0.2000 [0.100, 0.300]", "Brier (calibrated)": "n/a",
        "ECE (raw)": "n/a", "ECE (calibrated)": "n/a"}
    assert len(table) == 1


def test_example_captions_spell_the_threshold_so_it_never_reads_zero():
    row = {"image": "/data/PAT_1_2_3.png", "label": 0, "prob": 0.96}
    caption = reports.example_caption(row, 0.0044)  # the demo's threshold printed as 'thr 0.00' before
    assert caption == "PAT_1_2_3.png\ntruth benign · raw score 96.0% (threshold 0.44%)"
    assert reports.example_caption({**row, "prob": 0.3314}, 0.3312).endswith("raw score 33.14% (threshold 33.12%)")


def test_the_demos_example_photos_are_found_in_the_shared_folder_its_reports_name_them_from(tmp_path):
    from core import builtin
    from tests.conftest import shared_path
    name = next(shared_path("data", "pad_ufes_20_subset", "images").iterdir()).name
    demo_report = builtin.DEMO_EVIDENCE / "test_report.json"
    assert reports.example_image({"image": name}, demo_report) == str(builtin.DEMO_PHOTOS / name)
    own = tmp_path / "run" / "test_report.json"  # a user's report: its recorded path, found or not
    assert reports.example_image({"image": name}, own) == name
    photo = tmp_path / "p.png"
    photo.write_bytes(b"x")
    assert reports.example_image({"image": str(photo)}, demo_report) == str(photo)
