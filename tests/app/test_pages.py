"""AppTest tests of every page: what each shows with and without a model, injected uploads and crop boxes,
bad files, the dashboard from a saved report, and the training lock."""
from __future__ import annotations

import io
import json
import os
import re
import time
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import builtin, jobs
from tests.app.conftest import APP, RUN_NAME, jpeg_bytes, lesion_photo

TIMEOUT = 60


def app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=TIMEOUT).run()


def texts(at, kind="markdown") -> str:
    return "\n".join(str(e.value) for e in at.get(kind))


def everything(at) -> str:
    return "\n".join(texts(at, k) for k in ("markdown", "caption", "info", "error", "warning", "success", "code"))


# ------------------------------------------------------------------ no model
def test_no_model_state(without_model, monkeypatch, tmp_path):
    from core import builtin
    monkeypatch.setattr(builtin, "DEMO_BUNDLE", tmp_path / "no_demo")  # a checkout without the built-in demo
    at = app()
    assert not at.exception
    info = "\n".join(i.value for i in at.sidebar.info)
    assert "No model loaded" in info and "python -m train.fit" in info and "Train" in info
    assert "Crop" in texts(at, "title")  # the crop page (the default) works without a model
    at.switch_page("ui/predict.py").run()
    assert not at.exception
    assert any("No model loaded" in i.value and "bundle" in i.value for i in at.main.info)
    assert "Probability" not in texts(at)


# ------------------------------------------------------------------ navigation
def test_navigation_is_the_apps_own_on_every_page(without_model):
    """The sidebar lists the four pages (st.page_link, public API) and nothing else from pages/; each page is drawn
    inside the same shell, with no set-up call of its own (under AppTest every run takes Streamlit's legacy pages/
    route, which runs the pages/ entry file by itself)."""
    at = app()
    for path, title in (("ui/crop.py", "Crop"), ("ui/predict.py", "Predict"), ("ui/dashboard.py", "Dashboard"),
                        ("ui/train.py", "Train")):
        at.switch_page(path).run()
        assert not at.exception
        assert [link.proto.label for link in at.sidebar.get("page_link")] == ["Crop", "Predict", "Dashboard",
                                                                               "Train"]
        assert title in texts(at, "title")
        assert at.sidebar.selectbox(key="model_label").value == builtin.DEMO_LABEL  # the shell's model picker
    for entry in Path(APP).parent.joinpath("pages").glob("*.py"):  # entries only: the page code lives in ui/
        assert "ui.shell import run" in entry.read_text() and len(entry.read_text().splitlines()) < 10, entry


# ------------------------------------------------------------------ sidebar
def test_sidebar_lists_runs_and_shows_provenance(with_model):
    at = app()
    assert not at.exception
    assert at.sidebar.selectbox(key="model_label").value == RUN_NAME
    side = texts(at.sidebar) + texts(at.sidebar, "caption")
    assert "mobilenetv2_100" in side
    assert "pad_ufes.csv" in side and "train 140" in side and "val 40" in side
    assert "sensitivity 90% (95% CI 80%–97%)" in side and "specificity 55% (95% CI 41%–68%)" in side
    assert "On 40 validation images (16 malignant)" in side
    assert "Research tool, not a diagnostic device" in side
    from core.bundle import read_meta
    assert f"weights SHA-256 `{read_meta(with_model.bundle).short_hash}`" in side
    from core.appstate import describe_model  # the machine and precision it trained with, under the model line
    assert f"Trained on: {describe_model(read_meta(with_model.bundle))['trained_on']}" in side


def test_bundle_path_and_zip_upload(with_model, tmp_path):
    at = app()
    at.sidebar.text_input(key="bundle_path_input").set_value(str(tmp_path)).run()
    assert not at.exception and "no model.json" in "\n".join(e.value for e in at.sidebar.error)
    at.sidebar.text_input(key="bundle_path_input").set_value(str(with_model.run)).run()  # a run folder
    assert not at.sidebar.error
    assert at.sidebar.selectbox(key="model_label").value == str(with_model.bundle.resolve())
    assert at.session_state["model_path"] == str(with_model.bundle)
    # a zip of a bundle with another format version: its clear message, the app keeps running
    meta = json.loads((with_model.bundle / "model.json").read_text()) | {"format_version": 7}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("b/model.json", json.dumps(meta))
        z.writestr("b/model.safetensors", b"0")
    at.sidebar.file_uploader(key="bundle_zip").set_value(("old.zip", buf.getvalue(), "application/zip")).run()
    assert not at.exception
    assert "format version 7 but this tool reads version 2" in "\n".join(e.value for e in at.sidebar.error)
    # a good zip becomes the chosen model
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in ("model.json", "model.safetensors"):
            z.write(with_model.bundle / f, f)
    at.sidebar.file_uploader(key="bundle_zip").set_value(("good.zip", buf.getvalue(), "application/zip")).run()
    assert not at.sidebar.error and at.sidebar.selectbox(key="model_label").value == "uploaded: good.zip"


# ------------------------------------------------------------------ predict
def _predict_page(env, data: bytes | None = None, name="lesion.jpg", crop=None):
    at = app()
    at.session_state["photo_bytes"] = data if data is not None else env.photo.read_bytes()
    at.session_state["photo_name"] = name
    at.session_state["photo_crop"] = crop
    return at.switch_page("ui/predict.py").run()


def test_predict_with_injected_photo(with_model):
    at = _predict_page(with_model)
    assert not at.exception, at.exception
    md = texts(at)
    # this bundle predates calibration: the headline says it is a raw score, and the page says what it lacks
    assert "### Model score:" in md and "not a calibrated probability" in md
    prob = float(md.split("Model score: ")[1].split("%")[0]) / 100
    verdict = "\n".join(e.value for e in (*at.main.error, *at.main.success))
    assert "model's threshold (50.0%)" in verdict  # the headline's scale, never a bare 0.500 beside a percentage
    assert ("**Flagged**" in verdict) == (prob >= 0.5) and "malignant:" not in verdict.lower()
    assert "no out-of-distribution gate" in texts(at, "info") and "no calibration map" in texts(at, "info")
    assert "What the threshold means" in md and "40 validation images (16 malignant)" in md
    assert "90% (95% CI 80%–97%) of the malignant lesions" in md and "55% (95% CI 41%–68%)" in md
    images = at.main.get("image")
    assert len(images) >= 1  # the Grad-CAM overlay (+ the plain input in the expander)
    assert any("Grad-CAM" in c for im in images for c in im.captions)
    assert "Model:** demo_run" in md  # the provenance box sits next to the probability
    assert any("not a diagnostic device" in c.value for c in at.main.caption)
    # the inference engine the tests pin (SKINSCREEN_ENGINE=pytorch, tests/conftest.py) and why, beside the timings
    assert any("Timings:" in c.value and "Engine: PyTorch" in c.value and "asked for" in c.value
               for c in at.main.caption)
    # Grad-CAM++ and the opacity slider re-render without errors
    at.radio(key="cam_method").set_value("Grad-CAM++").run()
    at.slider(key="cam_opacity").set_value(0.8).run()
    assert not at.exception
    assert any("Grad-CAM++" in c for im in at.main.get("image") for c in im.captions)


def test_predict_uses_crop_and_real_uploader(with_model):
    crop = {"left": 200, "top": 150, "width": 240, "height": 240}
    at = _predict_page(with_model, crop=crop)
    assert not at.exception
    assert "cropped on the Crop page to 240×240 px at (200, 150)" in texts(at)
    # the real uploader replaces the carried-over photo and clears the crop
    data = jpeg_bytes(lesion_photo(7, malignant=False))
    at.file_uploader(key="predict_upload").set_value(("upload.jpg", data, "image/jpeg")).run()
    assert not at.exception
    assert at.session_state["photo_bytes"] == data and at.session_state["photo_crop"] is None
    assert "Photo **upload.jpg** (whole photo" in texts(at) and "Model score" in texts(at)


def test_unusable_photo_gets_no_verdict_and_says_what_to_do(with_model):
    from PIL import Image
    dark = io.BytesIO()
    Image.new("RGB", (120, 100), (10, 8, 6)).save(dark, "PNG")
    at = _predict_page(with_model, dark.getvalue(), "dark.png")
    assert not at.exception
    warnings = "\n".join(w.value for w in at.main.warning)
    assert "only 120x100 pixels" in warnings  # a warning: shown first, qualifies what follows
    errors = "\n".join(e.value for e in at.main.error)
    assert "Not assessed" in errors and "almost black" in errors and "daylight" in errors
    md = texts(at)
    assert "Model score" not in md and "Calibrated probability" not in md and "Flagged" not in errors
    assert any("unreliable" in e.label for e in at.main.expander)
    order = [type(e).__name__ + ":" + str(getattr(e, "value", "")) for e in at.main]
    first_warning = next(i for i, s in enumerate(order) if s.startswith("Warning:"))
    result = next(i for i, s in enumerate(order) if "Not assessed" in s)
    assert first_warning < result
    assert "less reliable" not in texts(at, "caption")  # no result below for the warning to qualify


def test_trusted_model_calibrated_headline_similar_cases_and_refusal(with_trusted_model, tmp_path):
    at = _predict_page(with_trusted_model, jpeg_bytes(lesion_photo(101, malignant=True)), "lesion.jpg")
    assert not at.exception, at.exception
    md, captions = texts(at), texts(at, "caption")
    assert "### Calibrated probability of malignancy:" in md
    assert "among photos like the 12 validation photos, where 50% were malignant" in captions.lower()
    # the number comes with its interval, in the headline and explained below it
    assert re.search(r"### Calibrated probability of malignancy: [<>\d.]+% \(95% interval [<\d]+% to [>\d]+%\)", md)
    assert re.search(r"refitted on \d+ bootstrap resamples of its 12 validation photos \(whole patients resampled\)",
                     captions)
    assert "Most similar photos in the model's training and validation data" in texts(at, "subheader")
    similar = [c for im in at.main.get("image") for c in im.captions if "similarity" in c]
    assert len(similar) == 6 and any("(MEL)" in c or "(NEV)" in c for c in similar)
    assert "no out-of-distribution gate" not in texts(at, "info")
    # this photo is the training photo t1.jpg: its result is no estimate for a new patient, and the page says so
    assert "identical to one of the model's train photos** (t1.jpg, similarity 1.000)" in texts(at, "warning")
    # a page of text is refused by the gate: no verdict, no headline, the raw score behind an 'unreliable' expander
    from PIL import Image, ImageDraw
    # cream paper, blue ink: in colour, so it is the gate that refuses it, not the no-colour quality rule
    page = Image.new("RGB", (480, 360), (250, 240, 215))
    d = ImageDraw.Draw(page)
    for y in range(5, 360, 14):
        d.text((5, y), "The quick brown fox jumps over the lazy dog 0123456789 " * 2, fill=(20, 40, 150))
    at = _predict_page(with_trusted_model, jpeg_bytes(page), "page.jpg")
    assert not at.exception
    errors = "\n".join(e.value for e in at.main.error)
    assert "This photo does not look like the photos this model was trained on" in errors
    assert "the model cannot assess it" in errors and "retake a close-up smartphone photo" in texts(at)
    # what the model learned from, in a clinician's words: the datasets, not files, stages or malignant counts
    refusal = next(m for m in texts(at).splitlines() if m.startswith("This model knows only photos"))
    assert re.match(r"This model knows only photos like the ones it learned from \(\w+ \(\d+ photos\)", refusal)
    assert "malignant" not in refusal and ".csv" not in refusal and "stage" not in refusal
    assert "Calibrated probability" not in texts(at) and any("unreliable" in e.label for e in at.main.expander)


@pytest.mark.parametrize("data, expected", [
    (b"", "file is empty (0 bytes)"),
    (b"this is not a picture at all", "not an image"),
    ("truncated", "truncated or corrupt"),
])
def test_bad_uploads_show_error_and_app_keeps_running(with_model, data, expected):
    if data == "truncated":
        full = with_model.photo.read_bytes()
        data = full[: len(full) // 2]
    at = _predict_page(with_model, data, "bad.jpg")
    assert not at.exception
    errors = "\n".join(e.value for e in at.main.error)
    assert "This file cannot be used" in errors and expected in errors
    assert "Model score" not in texts(at)
    at.switch_page("ui/dashboard.py").run()  # still alive
    assert not at.exception


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own warning; we raise
def test_enormous_dimensions_rejected(with_model):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("1", (12000, 9000)).save(buf, "PNG")  # 108 MP, a few KB on disk
    at = _predict_page(with_model, buf.getvalue(), "huge.png")
    assert not at.exception
    assert "megapixel limit" in "\n".join(e.value for e in at.main.error)


# ------------------------------------------------------------------ crop
def test_crop_page_without_model_and_injected_box_flows_to_state(without_model, monkeypatch):
    import streamlit_cropper
    calls = []

    def fake_cropper(img, **kw):
        calls.append((img.size, kw))
        return {"left": 70, "top": 35, "width": 140, "height": 140}  # in display pixels

    monkeypatch.setattr(streamlit_cropper, "st_cropper", fake_cropper)
    # a 1400x1050 photo stored sideways (EXIF 6): upright it is 1050x1400, shown at 525x700
    data = jpeg_bytes(lesion_photo(3, size=(1400, 1050)), exif_orientation=6)
    at = app()
    at.session_state["photo_bytes"] = data
    at.session_state["photo_name"] = "phone.jpg"
    at.run()
    assert not at.exception
    assert "1050×1400 px (upright); shown at 525×700" in texts(at)
    assert calls and calls[-1][0] == (525, 700) and calls[-1][1]["aspect_ratio"] == (1, 1)
    assert calls[-1][1]["return_type"] == "box"
    assert at.session_state["photo_crop"] == {"left": 140, "top": 70, "width": 280, "height": 280}
    at.checkbox(key="crop_whole").check().run()
    assert at.session_state["photo_crop"] is None
    at.checkbox(key="crop_whole").uncheck().run()
    at.checkbox(key="crop_square").uncheck().run()
    assert calls[-1][1]["aspect_ratio"] is None


def test_crop_page_real_component_default_box(without_model):
    at = app()
    data = jpeg_bytes(lesion_photo(4, size=(600, 400)))
    at.file_uploader(key="crop_upload").set_value(("p.jpg", data, "image/jpeg")).run()
    assert not at.exception
    assert at.session_state["photo_bytes"] == data
    box = at.session_state["photo_crop"]  # the component's default under AppTest: the central 60%, square
    assert box["width"] == box["height"] and 0 < box["left"] < 300 and box["left"] + box["width"] <= 600


def test_crop_page_bad_file(without_model):
    at = app()
    at.session_state["photo_bytes"] = b"GIF89a-not-really"
    at.run()
    assert not at.exception
    assert "This file cannot be used" in "\n".join(e.value for e in at.main.error)


def test_dataset_crop_mode_saves_and_resumes(without_model, tmp_path, monkeypatch):
    import streamlit_cropper
    monkeypatch.setattr(streamlit_cropper, "st_cropper",
                        lambda img, **kw: {"left": 10, "top": 10, "width": 100, "height": 100})
    crops = tmp_path / "crops.csv"
    at = app()
    at.radio(key="crop_mode").set_value("A dataset (crop-box file for training)").run()
    at.text_input(key="ds_manifest").set_value(str(without_model.manifest)).run()
    at.text_input(key="ds_crops").set_value(str(crops)).run()
    assert not at.exception
    assert "0 / 8 images done" in str(at.get("progress")[0].proto)
    save = next(b for b in at.button if b.label.startswith("Save"))
    save.click().run()
    assert not at.exception
    from core.cropbox import read_crops
    df = read_crops(crops)
    # 480x360 images are shown unscaled (<= 700), so the box is saved as drawn
    assert df["image_id"].tolist() == ["lesion_0.jpg"] and df.loc[0, "width"] == 100
    assert "1 / 8 images done" in str(at.get("progress")[0].proto)
    assert at.session_state["ds_index"] == 1
    at.checkbox(key="ds_unusable_1").check().run()
    at.text_input(key="ds_note_1").set_value("blurry").run()
    next(b for b in at.button if b.label.startswith("Save")).click().run()
    df = read_crops(crops).set_index("image_id")
    assert df.loc["lesion_1.jpg", "unusable"] == 1 and df.loc["lesion_1.jpg", "note"] == "blurry"
    # a new session resumes at the first unlabelled image
    again = app()
    again.radio(key="crop_mode").set_value("A dataset (crop-box file for training)").run()
    again.text_input(key="ds_manifest").set_value(f'"{without_model.manifest}" ').run()  # pasted with its quotes
    again.text_input(key="ds_crops").set_value(f"'{crops}'").run()
    assert again.session_state["ds_index"] == 2 and "2 / 8 images done" in str(again.get("progress")[0].proto)


# ------------------------------------------------------------------ dashboard
def test_dashboard_from_saved_report(with_model):
    at = app().switch_page("ui/dashboard.py").run()
    assert not at.exception
    assert at.multiselect(key="dash_reports").value == [f"{RUN_NAME}/val_report.json"]
    table = at.dataframe[0].value
    assert list(table.columns[:9]) == ["Model", "n", "malignant", "Accuracy", "Precision (PPV)",
                                       "Sensitivity (recall)", "Specificity", "F1", "ROC-AUC"]
    assert table.loc[0, "Model"] == f"{RUN_NAME}/val_report.json" and table.loc[0, "n"] == 8
    assert "[" in table.loc[0, "ROC-AUC"]  # value [lo, hi]
    charts = at.get("plotly_chart")
    from core import reports
    demo_pca = sum(len(r.tables) for r in reports.find_pca([builtin.DEMO_EVIDENCE]))  # the demo's, always offered
    assert len(charts) == 3 + demo_pca  # ROC, one confusion matrix, the run's PCA scatter
    specs = [json.loads(c.proto.spec) for c in charts]
    assert any(t.get("type") == "heatmap" for s in specs for t in s["data"])
    assert any("AUC" in str(t.get("name")) for s in specs for t in s["data"])
    subgroup_tables = [d.value for d in at.dataframe[1:]]
    assert any("fitzpatrick" in t.columns for t in subgroup_tables)
    assert any("domain" in t.columns for t in subgroup_tables)
    images = at.main.get("image")
    assert len(images) >= 2  # thumbnails of correct and incorrect examples
    assert "Most confident incorrect predictions" in texts(at)
    assert "Paired on the same" not in texts(at) and "No paired comparison" not in texts(at)  # one report
    others = [o for o in at.multiselect(key="dash_reports").options if o != f"{RUN_NAME}/val_report.json"]
    at.multiselect(key="dash_reports").set_value([f"{RUN_NAME}/val_report.json", others[0]]).run()
    assert not at.exception  # the demo's evidence report scores other photos: said, not compared
    assert "No paired comparison: these reports score different photos (none in common" in texts(at)
    at.selectbox(key="model_label").set_value("Built-in demo (PAD-UFES-20)").run()  # switched on this page
    assert at.multiselect(key="dash_reports").value[0] == "built-in demo: test_report.json"
    at.selectbox(key="model_label").set_value(RUN_NAME).run()  # and back: its own report again
    assert at.multiselect(key="dash_reports").value == [f"{RUN_NAME}/val_report.json"]


def test_dashboard_shows_the_clinical_context_section_of_the_demo_evidence(without_model):
    """The built-in demo's test report has a context section: the Dashboard puts photo, answers and both side by
    side with their CIs, draws their three ROC curves, and lists each answer's weight and the fields left out."""
    at = app().switch_page("ui/dashboard.py").run()
    at.multiselect(key="dash_reports").set_value(["built-in demo: test_report.json"]).run()
    assert not at.exception, at.exception
    assert "Clinical context: the photo, the answers, and both" in [h.value for h in at.subheader]
    tables = [d.value for d in at.dataframe if "Inputs" in d.value.columns]
    assert len(tables) == 1 and tables[0]["Inputs"].tolist()[:3] == ["image only", "context only",
                                                                    "photo + answers (fused)"]
    assert tables[0]["ROC-AUC"].str.contains(r"\[").all()
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    names = [[t.get("name", "") for t in s["data"]] for s in specs]
    context_roc = [n for n in names if any(x.startswith("photo + answers (fused) (AUC") for x in n)]
    assert len(context_roc) == 1 and len(context_roc[0]) == 4  # image, context, fused, chance
    weights = [d.value for d in at.dataframe if list(d.value.columns) == ["Field", "answer", "weight"]]
    assert len(weights) == 1 and "bleed" in set(weights[0]["Field"])
    assert "Not used: sex, not recorded for 139 of 227 benign" in texts(at, "caption")


def test_dashboard_without_reports(without_model, monkeypatch, tmp_path):
    from core import builtin
    monkeypatch.setattr(builtin, "DEMO_EVIDENCE", tmp_path / "no_evidence")  # a checkout without the demo
    at = app().switch_page("ui/dashboard.py").run()
    assert not at.exception
    assert any("No evaluation reports" in i.value for i in at.main.info)


# ------------------------------------------------------------------ train
def test_train_page_lists_runs_and_refuses_second_job(with_model):
    root = with_model.runs
    me = {"pid": os.getpid(), "create_time": jobs.create_time(os.getpid()), "run": "busy_run", "device": "cpu",
          "started": time.time()}
    jobs.acquire_lock(root, me)
    try:
        at = app().switch_page("ui/train.py").run()
        assert not at.exception
        runs = at.dataframe[0].value
        assert runs.set_index("run").loc[RUN_NAME, "state"] == "finished"
        assert any("Training **busy_run** on **cpu**" in i.value for i in at.main.info)
        assert f"**{RUN_NAME}**: finished" in texts(at)
        assert len(at.get("plotly_chart")) == 1  # loss and AUC curves from metrics.csv
        # the terminal command writes where this app looks for runs (RUNS_DIR), not to the project's runs/
        assert any(f"--out {root.resolve() / 'shared_demo'}" in c.value for c in at.caption)
        at.text_input(key="tf_name_shared_demo").set_value("second_job")
        next(b for b in at.button if b.label == "Start training").click().run()
        assert not at.exception
        err = "\n".join(e.value for e in at.main.error)
        assert "Not started" in err and "already running: run 'busy_run'" in err
        assert not (root / "second_job").exists()
    finally:
        jobs.release_lock(root)
    assert jobs.read_lock(root) is None


def test_train_form_builds_the_request(with_model, monkeypatch):
    started = []

    def fake_start(req, root=None, **kw):
        started.append((req, root))
        return {"run": req.name, "device": req.device, "pid": 4242}

    monkeypatch.setattr(jobs, "start_training", fake_start)
    at = app().switch_page("ui/train.py").run()
    assert at.selectbox(key="train_recipe").value.name == "shared_demo.yaml"
    k = "shared_demo"
    at.text_input(key=f"tf_name_{k}").set_value("my_run")
    at.selectbox(key=f"tf_backbone_{k}").set_value("resnet18")
    at.selectbox(key=f"tf_init_{k}").set_value("none")        # no initial run
    at.selectbox(key=f"tf_device_{k}").set_value("cpu")
    at.number_input(key=f"tf_epochs_{k}").set_value(2)
    at.text_input(key=f"tf_lr_{k}").set_value("3e-4")
    at.text_input(key=f"tf_manifest_{k}").set_value("/data/m.csv")
    assert at.number_input(key=f"tf_folds_{k}").value == 0  # the recipe's: one validation split
    at.number_input(key=f"tf_folds_{k}").set_value(4)
    assert at.checkbox(key=f"tf_nested_{k}").value is False  # the recipe's: no nested cross-validation
    at.checkbox(key=f"tf_nested_{k}").check()
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception
    (req, root), = started
    assert root == with_model.runs and req.name == "my_run" and req.recipe.endswith("shared_demo.yaml")
    assert (req.backbone, req.device, req.epochs, req.manifest) == ("resnet18", "cpu", 2, "/data/m.csv")
    assert req.lr == "3e-4" and jobs.parse_lr(req.lr) == 3e-4  # the text as typed; start_training checks it
    assert req.folds == 4 and req.nested is True
    assert req.weights is None and req.init_from is None and req.sets == ("init_from=null",)
    assert any("Started **my_run** on cpu" in s.value for s in at.main.success)


def test_train_page_shows_a_cross_validations_fold_progress_and_each_folds_curves(with_model):
    from core import runfolder
    run = with_model.runs / "cv_run"
    run.mkdir()
    (run / runfolder.FOLDS).write_text("image,label,split,fold\n/a.png,0,train,0\n")
    runfolder.update_status(run, state="stopped", cv={"folds": 5, "fold": 2, "done": [0, 1]}, stage=1,
                            stage_name="finetune", epoch=3, epochs=8)
    for k in range(3):
        runfolder.write_metrics(runfolder.fold_path(run, k), [{"stage": 0, "stage_name": "head", "epoch": 0,
                                                               "train_loss": 0.7, "val_loss": 0.6,
                                                               "val_roc_auc": 0.7 + k / 20}])
    at = app().switch_page("ui/train.py").run()
    at.selectbox(key="train_watch").set_value("cv_run").run()
    assert not at.exception
    assert "**cv_run**: stopped · fold 3/5, stage finetune, epoch 4/8" in texts(at)
    assert "2 of 5 folds done" in str(at.get("progress")[0].proto)
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert {t["name"] for t in spec["data"]} >= {"fold 0 val ROC-AUC", "fold 1 val ROC-AUC", "fold 2 val ROC-AUC"}
    assert any(b.label == "Resume" for b in at.button)  # resumable: the fold runs hold the checkpoints


def test_a_run_stopped_before_its_first_epoch_says_it_cannot_be_resumed(with_model):
    from core import runfolder
    run = with_model.runs / "early"
    run.mkdir()
    runfolder.update_status(run, state="stopped", stage=0, stage_name="head", epoch=0, epochs=1)  # no checkpoint
    at = app().switch_page("ui/train.py").run()
    at.selectbox(key="train_watch").set_value("early").run()
    assert not at.exception
    assert any("nothing was saved, so it cannot be resumed" in w.value for w in at.warning)
    assert not any(b.label == "Resume" for b in at.button)


# ------------------------------------------------------------------ clinical context
@pytest.fixture
def with_context_model(app_env, tmp_path, monkeypatch):
    from dataclasses import replace

    from core.bundle import load_bundle, save_bundle
    from core.context import ContextModel
    from tests.conftest import hand_context_stage
    b = load_bundle(app_env.bundle)
    save_bundle(b.model, tmp_path / "runs" / "ctx_run" / "bundle", threshold=b.meta.threshold,
                provenance=replace(b.meta.provenance, run_name="ctx_run"),
                context=ContextModel.from_dict(hand_context_stage()))
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    return app_env


@pytest.fixture
def with_context_refits(app_env, tmp_path, monkeypatch):
    """As with_context_model, its fusion refitted on 3 resamples (by hand: only the intercept moves)."""
    from dataclasses import replace

    from core.bundle import load_bundle, save_bundle
    from core.context import ContextModel
    from tests.conftest import hand_context_stage
    b = load_bundle(app_env.bundle)
    refits = {"fits": 3, "n": 30, "unit": "patients", "intercept": [-0.5, 0.0, 0.5], "image": [1.0] * 3,
              "context": [1.0] * 3}
    save_bundle(b.model, tmp_path / "runs" / "ctx_run" / "bundle", threshold=b.meta.threshold,
                provenance=replace(b.meta.provenance, run_name="ctx_run"),
                context=ContextModel.from_dict({**hand_context_stage(), "fusion_bootstrap": refits}))
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    return app_env


def _answer(at, **answers):
    for name, value in answers.items():
        widget = at.number_input(key=f"ctx_{name}") if name == "age" else at.selectbox(key=f"ctx_{name}")
        widget.set_value(value)
    return at.run()


def _headline(at) -> float:
    """The number in the result's headline (photo-only model score, or photo + answers probability)."""
    line = next(m for m in texts(at).splitlines() if m.startswith("### "))
    return float(line.rsplit(": ", 1)[1].split("%")[0]) / 100


def test_clinical_context_form_round_trips_and_says_what_it_used(with_context_model, tmp_path):
    before = sorted(p for p in (tmp_path / "runs").rglob("*"))
    at = _predict_page(with_context_model)
    assert not at.exception, at.exception
    assert "Inputs used: photo only" in texts(at)
    assert "### Model score:" in texts(at)  # this bundle has no calibration map
    image_prob = _headline(at)
    _answer(at, age=80.0, bleed="yes")
    assert not at.exception, at.exception
    assert "Inputs used: photo + 2 answers** (age, bleeding)" in texts(at)
    assert "### Probability of malignancy from the photo and the answers:" in texts(at)
    assert ("Photo + answers threshold chosen on the validation split: sensitivity 92%, specificity 60% on 30 "
            "images") in texts(at, "caption")
    assert "No interval: this context stage has no refits of its fusion stored" in texts(at, "caption")
    # measured with answers to all 4 of the stage's questions: with 2 here, the page says it is not measured
    assert "with 2 answered here, how well it does is not measured" in texts(at, "caption")
    up = _headline(at)
    _answer(at, age=20.0, bleed="no")
    down = _headline(at)
    assert down < image_prob < up
    differs = (down >= 0.5) != (image_prob >= 0.5)
    assert ("photo alone gives a different verdict" in texts(at, "warning")) == differs
    assert ("The photo alone: score" in texts(at, "caption")) == (not differs)  # in view either way
    # remembered for the session across pages, never written to disk
    at.switch_page("ui/crop.py").run()
    at.switch_page("ui/predict.py").run()
    assert at.selectbox(key="ctx_bleed").value == "no" and at.number_input(key="ctx_age").value == 20.0
    assert "photo + 2 answers" in texts(at)
    assert sorted(p for p in (tmp_path / "runs").rglob("*")) == before
    at.button[[b.label for b in at.button].index("Clear the answers")].click().run()
    assert "Inputs used: photo only" in texts(at) and at.selectbox(key="ctx_bleed").value == "not answered"


def test_the_photo_and_answers_probability_shows_its_interval_and_what_it_means(with_context_refits):
    import math
    at = _answer(_predict_page(with_context_refits), age=50.0, bleed="no")  # a moderate probability
    assert not at.exception, at.exception
    line = next(m for m in texts(at).splitlines() if m.startswith("### Probability of malignancy from the photo"))
    lo, hi = (float(x) / 100 for x in re.fullmatch(r".*\(95% interval (\d+)% to (\d+)%\)", line).groups())
    # the refits move the fitted fusion's intercept by -0.5, 0 and +0.5: the 2.5th and 97.5th percentiles of three
    # values lie 0.475 either side on the logit scale (whole percentages, rounded outwards)
    z = math.log((p := _headline(at)) / (1 - p))
    assert lo <= p <= hi
    assert abs(lo - 1 / (1 + math.exp(-(z - 0.475)))) < 0.015 and abs(hi - 1 / (1 + math.exp(-(z + 0.475)))) < 0.015
    assert ("the fusion refitted on 3 bootstrap resamples of the 30 photos it was fitted on (whole patients "
            "resampled)") in texts(at, "caption")


def test_an_out_of_range_age_is_said_and_not_used(with_context_model):
    """Widget bounds would keep showing 150 while silently using the last valid age: the range is ours to check."""
    at = _answer(_predict_page(with_context_model), age=80.0, bleed="yes")
    assert "photo + 2 answers** (age, bleeding)" in texts(at)
    at = _answer(at, age=150.0)
    assert not at.exception, at.exception
    assert "150 is outside 0-120: this answer is not used." in texts(at, "error")
    assert "photo + 1 answer** (bleeding)" in texts(at)


def test_a_new_photo_clears_the_last_photos_answers_and_says_so(with_context_model):
    """Answers describe one lesion, perhaps one patient: another photo must not inherit them."""
    at = _answer(_predict_page(with_context_model), age=80.0, bleed="yes")
    assert "photo + 2 answers" in texts(at)
    labels = [b.label for b in at.button]
    at.button[labels.index("Try this one")].click().run()
    assert not at.exception, at.exception
    assert "Inputs used: photo only" in texts(at)
    assert at.number_input(key="ctx_age").value is None and at.selectbox(key="ctx_bleed").value == "not answered"
    assert "answers given for the previous photo were cleared" in texts(at, "info")
    at.run()  # said once
    assert "answers given for the previous photo were cleared" not in texts(at, "info")


def test_an_ensemble_shows_its_members_and_how_far_apart_they_are(with_ensemble):
    at = _predict_page(with_ensemble)
    assert not at.exception, at.exception
    shown = everything(at)
    assert "Ensemble:** 2 models (the fold models of a 2-fold cross-validation)" in shown
    assert "the mean of their probabilities" in shown
    assert "The 2 models agree" in shown or "The 2 models disagree" in shown  # beside the verdict
    assert "raw scores" in shown and "SD" in shown
    assert "out-of-fold images" in shown and "It was chosen on out-of-fold data" in shown
    assert "out-of-fold ROC-AUC" in shown and "validation ROC-AUC" not in shown  # the provenance card's AUC too
    assert "validation images" not in shown.replace("out-of-fold images", "")
    # the threshold rule and the calibrated probability's population say out-of-fold too
    assert "reaching 90% out-of-fold sensitivity" in shown and "validation sensitivity" not in shown
    assert "among photos like the 40 out-of-fold photos" in shown.lower() and "validation photos" not in shown
    # beside those in-sample numbers, the rule's cross-fitted numbers on new patients: on the card and the verdict
    said = "sensitivity 85% (95% CI 70%–95%), specificity 61% (95% CI 45%–75%); each of 2 folds judged"
    assert f"The same rule on new patients:** {said}" in shown
    assert f"Tried on new patients, the same rule gave {said}" in shown


def test_a_fused_threshold_says_what_its_rule_gave_on_new_patients_where_the_bundle_records_it(
        with_context_model, tmp_path):
    from dataclasses import replace

    from core.bundle import load_bundle, save_bundle
    from tests.app.conftest import NEW_PATIENTS
    at = _predict_page(with_context_model)
    _answer(at, age=80.0, bleed="yes")
    shown = everything(at)  # a single-split model: its test report is the estimate
    assert "the same rule gave" not in shown and "rule on new patients:" not in shown
    b = load_bundle(tmp_path / "runs" / "ctx_run")
    fused = {**NEW_PATIENTS["image"], "sensitivity": {"value": 0.9, "ci95": [0.8, 0.97]}}
    save_bundle(b.model, tmp_path / "runs" / "ctx_run" / "bundle", threshold=b.meta.threshold, context=b.meta.context,
                provenance=replace(b.meta.provenance, threshold_on_new_patients={"image": None, "fused": fused}))
    at = _predict_page(with_context_model)
    _answer(at, age=80.0, bleed="yes")
    assert not at.exception, at.exception
    said = "sensitivity 90% (95% CI 80%–97%), specificity 61% (95% CI 45%–75%); each of 2 folds judged"
    assert f"On new patients, the same rule gave {said}" in texts(at, "caption")
    assert f"The photo + answers threshold's rule on new patients:** {said}" in everything(at)
    assert "The same rule on new patients" not in everything(at)


def test_a_pasted_path_loses_its_quotes_and_blanks_only():
    """Windows Explorer's "Copy as path" pastes the path in double quotes."""
    from ui.common import typed_path
    assert typed_path(' "C:\\Users\\ana\\photos.csv" ') == "C:\\Users\\ana\\photos.csv"
    assert typed_path("'runs/my run'") == "runs/my run" and typed_path(None) == "" and typed_path('"') == '"'
    assert typed_path("it's/a \"name\"") == "it's/a \"name\""  # quotes inside a path are kept
