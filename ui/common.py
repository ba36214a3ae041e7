"""Shared UI pieces for the pages (ui/*.py): the sidebar model picker, the provenance box, the photo carried between
pages, the cropper wrapper and the cached predictor. Logic lives in core (appstate, photos); this only renders.

Session-state keys (all in memory; nothing is written to disk unless the user saves a crop file):
  model_label / model_path  the chosen bundle (label in the picker, bundle folder)
  extra_models              {label: folder} added from a typed path or an uploaded zip
  photo_bytes, photo_name   the current photo (from the Crop or Predict page uploader, or a test)
  photo_id                  the upload or example it came from (a new one replaces the photo and clears the crop)
  upload_seen               the last uploader file seen (so a later example click is not undone by it)
  photo_crop                {left, top, width, height} in original upright pixels, or None (whole image)
  context_answers, ctx_*    the clinical answers for the current photo (cleared when another photo replaces it)
  answers_cleared_for       the photo whose arrival cleared the last photo's answers (said once, then dropped)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from core import appstate, builtin, metrics, photos
from core.bundle import WEIGHTS_FILE, BundleError, BundleMeta, read_meta

IMAGE_TYPES = ["jpg", "jpeg", "png", "heic", "heif"]
DISCLAIMER = ("Research tool, not a diagnostic device. The score is a model output for research and "
              "demonstration; it cannot make or rule out a diagnosis. Any changing, bleeding, itching or "
              "otherwise worrying skin lesion needs a clinician's examination.")
CLI_EXAMPLE = "python -m train.fit --config train/configs/shared_demo.yaml --out runs/shared_demo"


def no_model_message(where=None, short: bool = False) -> None:
    if short:
        (where or st).info("**No model loaded.** Train one on the **Train** page, run "
                           f"`{CLI_EXAMPLE}`, or give a bundle path / zip below. The Crop page works without one.")
        return
    (where or st).info(
        "**No model loaded.** To get one:\n"
        "1. train one on the **Train** page, or\n"
        f"2. from a terminal in the project folder: `{CLI_EXAMPLE}` "
        f"(bundles appear here from `{appstate.runs_dir()}`), or\n"
        "3. give the path of a bundle folder, or upload a bundle zip, under **Use another model** "
        "in the sidebar.\n\nThe Crop page works without a model.")


# ------------------------------------------------------------------------------------------ model picker
def typed_path(text: str | None) -> str:
    """A path as typed or pasted: surrounding blanks and one pair of quotes dropped (Windows Explorer's "Copy as
    path" pastes "C:\\Users\\...\\photos.csv" with its quotes)."""
    text = (text or "").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def _add_path() -> None:
    path = typed_path(st.session_state.get("bundle_path_input"))
    st.session_state.pop("model_error_path", None)
    if not path:
        return
    try:
        meta = read_meta(Path(path).expanduser())
    except BundleError as e:
        st.session_state["model_error_path"] = str(e)
        return
    label = f"{meta.folder.resolve()}"
    st.session_state.setdefault("extra_models", {})[label] = str(meta.folder)
    st.session_state["model_label"] = label


def _add_zip() -> None:
    upload = st.session_state.get("bundle_zip")
    st.session_state.pop("model_error_zip", None)
    if upload is None:
        return
    try:
        folder = appstate.extract_bundle_zip(upload.getvalue())
    except BundleError as e:
        st.session_state["model_error_zip"] = f"{upload.name}: {e}"
        return
    label = f"uploaded: {upload.name}"
    st.session_state.setdefault("extra_models", {})[label] = str(folder)
    st.session_state["model_label"] = label


def sidebar() -> None:
    """Model picker (bundles in RUNS_DIR, a typed path, an uploaded zip) and the chosen model's provenance."""
    root = appstate.runs_dir()
    entries = appstate.model_entries(root)
    options = {e.label: str(e.path) for e in entries if e.meta}
    options.update(st.session_state.get("extra_models", {}))
    with st.sidebar:
        st.header("Model")
        if options:
            labels = list(options)
            if st.session_state.get("model_label") not in options:
                st.session_state["model_label"] = labels[0]
            label = st.selectbox("Model bundle", labels, key="model_label", help=f"Bundles found in {root}")
            st.session_state["model_path"] = options[label]
        else:
            st.session_state["model_path"] = None
            no_model_message(st.sidebar, short=True)
        for e in entries:
            if e.error:
                st.warning(f"{e.label}: cannot be used: {e.error}")
        with st.expander("Use another model", expanded=not options):
            st.text_input("Path to a bundle or run folder", key="bundle_path_input", on_change=_add_path,
                          placeholder="runs/my_run or /path/to/bundle")
            st.file_uploader("…or upload a bundle (.zip with model.json + model.safetensors; up to 50 MB, "
                             "larger ones: use the path)", type=["zip"], key="bundle_zip", on_change=_add_zip)
            for key in ("model_error_path", "model_error_zip"):
                if st.session_state.get(key):
                    st.error(st.session_state[key])
        meta = current_meta()
        if meta is not None:
            provenance_box(meta, st.sidebar)


def current_meta() -> BundleMeta | None:
    path = st.session_state.get("model_path")
    if not path:
        return None
    try:
        return read_meta(path)
    except BundleError as e:  # e.g. the folder was deleted since it was picked
        st.sidebar.error(str(e))
        return None


def provenance_box(meta: BundleMeta, where=None) -> None:
    """What the model is, what it was trained on and what its threshold means: shown with every probability."""
    d = appstate.describe_model(meta)
    box = (where or st).container(border=True)
    box.markdown(f"**Model:** {d['run']} · backbone `{d['backbone']}` · initial weights: {d['weights']} · "
                 f"weights SHA-256 `{d['weights_hash']}`")
    box.caption(f"Trained on: {d['trained_on']}")
    if d["members"]:
        box.markdown(f"**Ensemble:** {d['members']}.")
    box.markdown("**Training data:**\n" + "\n".join(f"- {line}" for line in d["training_data"]))
    box.markdown(f"**Split sizes:** {d['splits']}")
    thr = metrics.format_score(d["threshold"]) if isinstance(d["threshold"], (int, float)) else "?"
    box.markdown(f"**Threshold {thr}** of the raw score ({d['threshold_rule']}). On {d['n_val'] or '?'} {d['val_images']} images "
                 f"({d['n_val_malignant'] if d['n_val_malignant'] is not None else '?'} malignant): "
                 f"sensitivity {d['sensitivity']}, specificity {d['specificity']}; "
                 f"{d['val_images']} ROC-AUC {d['val_auc']}.")
    if d["new_patients"]:  # those numbers are in-sample (the rule chose the threshold on them); these are not
        box.markdown(f"**The same rule on new patients:** {d['new_patients']}.")
    if d["fused_new_patients"]:
        box.markdown(f"**The photo + answers threshold's rule on new patients:** {d['fused_new_patients']}.")
    box.markdown(f"**On the test patients:** {d['test']}." if d["test"] else
                 "**On the test patients:** no test report of this model beside it.")
    box.caption(f"Intended use: {d['intended_use']}")


# ------------------------------------------------------------------------------------------ photo state
@dataclass(frozen=True)
class Photo:
    data: bytes
    name: str
    crop: dict | None
    id: str


def take_upload(uploaded) -> None:
    """A new upload becomes the current photo (kept in memory only) and clears any earlier crop."""
    if uploaded is None:
        return
    file_id = getattr(uploaded, "file_id", None) or uploaded.name
    # Compare with the last upload seen, not the current photo: an example picked after an upload must not be
    # replaced by that same upload on the next rerun (the uploader keeps returning it).
    if st.session_state.get("upload_seen") != file_id:
        new_photo(uploaded.getvalue(), uploaded.name, file_id)
        st.session_state["upload_seen"] = file_id


def use_example(example: builtin.Example) -> None:
    new_photo(example.path.read_bytes(), example.path.name, f"example:{example.path.name}")


def new_photo(data: bytes, name: str, photo_id: str) -> None:
    """Make a photo the current one: its crop starts empty, and the clinical answers given for the last photo are
    cleared (they describe another lesion, perhaps another patient), saying so on the Predict page."""
    replaced = st.session_state.get("photo_bytes") is not None and st.session_state.get("photo_id") != photo_id
    if replaced and st.session_state.get("context_answers"):
        clear_context_answers()
        st.session_state["answers_cleared_for"] = name
    st.session_state.update(photo_bytes=data, photo_name=name, photo_crop=None, photo_id=photo_id)


def example_picker(key: str) -> None:
    """One click on a shipped example photo (assets/examples, PAD-UFES-20 test patients) makes it the current photo."""
    items = builtin.examples()
    if not items:
        return
    with st.expander("Try an example photo", expanded=current_photo() is None):
        st.caption("Smartphone photos of patients the built-in demo model never trained on (PAD-UFES-20, CC BY 4.0); "
                   "the diagnosis under each is the dataset's.")
        for col, (i, ex) in zip(st.columns(len(items)), enumerate(items)):
            thumb = thumbnail(str(ex.path), 140)
            if thumb is not None:
                col.image(thumb)
            col.button("Try this one", key=f"{key}_example_{i}", on_click=use_example, args=(ex,),
                       width="stretch")
            col.caption(ex.caption)


def current_photo() -> Photo | None:
    data = st.session_state.get("photo_bytes")
    if data is None:
        return None
    data = bytes(data)
    pid = st.session_state.get("photo_id") or hashlib.sha1(data).hexdigest()[:12]
    return Photo(data, st.session_state.get("photo_name") or "photo", st.session_state.get("photo_crop"), str(pid))


def clear_photo() -> None:
    for k in ("photo_bytes", "photo_name", "photo_crop", "photo_id"):
        st.session_state.pop(k, None)


@st.cache_data(max_entries=8, show_spinner=False)
def preview(data: bytes, name: str, max_side: int = 700):
    """Display copy (<= max_side, EXIF applied) and original size; raises ImageLoadError for bad files."""
    return photos.preview(data, name=name, max_side=max_side)


@st.cache_data(max_entries=8, show_spinner=False)
def preview_file(path: str, mtime: float, max_side: int = 700):
    return photos.preview(path, max_side=max_side)


def draw_box(img, *, square: bool, key: str, default: dict | None = None, color: str = "#00B4FF") -> dict:
    """The box drawn on `img` (in img's pixels) with streamlit-cropper.

    Kept tiny on purpose: tests replace `streamlit_cropper.st_cropper` to inject a box (under AppTest the
    component is an UnknownElement that returns its default, the central 60%)."""
    from streamlit_cropper import st_cropper
    coords = None
    if default:
        coords = (default["left"], default["left"] + default["width"],
                  default["top"], default["top"] + default["height"])
    box = st_cropper(img, realtime_update=True, box_color=color, aspect_ratio=(1, 1) if square else None,
                     return_type="box", default_coords=coords, key=key)
    return {k: int(box[k]) for k in ("left", "top", "width", "height")}


# ------------------------------------------------------------------------------------------ prediction
@st.cache_resource(max_entries=3, show_spinner="Loading the model…")
def _predictor(path: str, mtime: float):
    from core.bundle import load_bundle
    from core.inference import Predictor
    predictor = Predictor(load_bundle(path), device="auto")
    if hasattr(predictor, "warmup"):
        predictor.warmup()  # kernel selection happens under the loading spinner, not the first prediction
    return predictor


def get_predictor(path: str):
    return _predictor(str(path), (Path(path) / WEIGHTS_FILE).stat().st_mtime)


def engine_note(path: str) -> str:
    """Which inference engine and precision the loaded model runs on, and the load-time measurement behind it."""
    from core.engine import describe
    p = get_predictor(path)
    return describe(getattr(p, "engine", None), getattr(p, "precision", None))


def predict(photo: Photo, model_path: str, cam_method: str, context: dict | None = None):
    """The prediction for the current photo, crop, model and heat-map method, fused with the clinical answers;
    the model reruns only when the photo, crop, model or method changes (not for the opacity slider or an
    answer: fusing answers is arithmetic on the stored probability)."""
    import dataclasses

    from core.context import fuse
    crop = tuple(photo.crop[k] for k in ("left", "top", "width", "height")) if photo.crop else None
    key = (hashlib.sha1(photo.data).hexdigest(), crop, str(model_path), cam_method)
    cached = st.session_state.get("_prediction")
    if cached and cached[0] == key:
        pred = cached[1]
    else:
        pred = get_predictor(model_path).predict_source(photo.data, name=photo.name, crop=photo.crop,
                                                        cam_method=cam_method)
        st.session_state["_prediction"] = (key, pred)
    if not pred.assessed:  # no result for a photo the model cannot assess, answers or not
        return pred
    stage = get_predictor(model_path).context
    return dataclasses.replace(pred, fused=fuse(stage, pred.prob, pred.threshold, context))


@st.cache_data(max_entries=64, show_spinner=False)
def _thumb(path: str, mtime: float, size: int):
    return photos.thumbnail(path, size)


def thumbnail(path: str, size: int = 160):
    """A cached thumbnail of an image file, or None when it is missing or unreadable."""
    try:
        mtime = Path(path).stat().st_mtime
    except (OSError, TypeError, ValueError):
        return None
    return _thumb(str(path), mtime, size)


SITE_LABELS = {"head_neck": "Head or neck (face, scalp, ears, lips)", "torso_front": "Chest or abdomen",
               "torso_back": "Back", "torso_side": "Side of the torso", "upper_limb": "Arm or hand",
               "lower_limb": "Leg or foot", "palms_soles": "Palm or sole", "oral_genital": "Mouth or genitals"}
NOT_ANSWERED = "not answered"


def context_form(stage) -> dict:
    """The optional clinical questionnaire for the fields the model's context stage uses. Answers live in this
    session's state only (never written to disk) and survive a visit to another page. Returns the given answers."""
    from core.context import FIELDS, NUMERIC_RANGE
    kept = st.session_state.setdefault("context_answers", {})
    answers = {}
    for name in stage.fields:
        spec, key = FIELDS[name], f"ctx_{name}"
        if key not in st.session_state:  # a widget's state is dropped on other pages: restore it from ours
            st.session_state[key] = kept.get(name, None if spec.kind == "numeric" else NOT_ANSWERED)
        if spec.kind == "numeric":
            # no min/max on the widget: out of range it would keep showing the typed value while the last valid
            # one is used; the range is checked here and an answer outside it is said and left out
            lo, hi = NUMERIC_RANGE[name]
            value = st.number_input(spec.label, step=1.0, key=key, placeholder=NOT_ANSWERED, format="%g",
                                    help=f"{lo:g} to {hi:g}; leave empty when not known")
            if value is not None and not lo <= value <= hi:
                st.error(f"{value:g} is outside {lo:g}-{hi:g}: this answer is not used.")
                value = None
        else:
            value = st.selectbox(spec.label, [NOT_ANSWERED, *spec.levels], key=key,
                                 format_func=lambda v: SITE_LABELS.get(v, v) if name == "site" else v)
        if value is not None and value != NOT_ANSWERED:
            answers[name] = value
    st.session_state["context_answers"] = answers
    return answers


def clear_context_answers() -> None:
    for k in [k for k in st.session_state if str(k).startswith("ctx_") or k == "context_answers"]:
        del st.session_state[k]
