"""Predict: one photo (uploaded here or cropped on the Crop page) -> quality warnings, probability, verdict at
the model's threshold, Grad-CAM, and the model's provenance."""
import streamlit as st

from core import appstate
from core.bundle import BundleError
from core.context import context_of
from core.gradcam import overlay
from core.images import ImageLoadError
from ui import common

st.title("Predict")
st.caption(common.DISCLAIMER)

uploaded = st.file_uploader("Photo of the skin lesion (drag and drop)", type=common.IMAGE_TYPES,
                            key="predict_upload",
                            help="Kept in memory for this session only. Crop it first on the Crop page if the "
                                 "lesion fills only part of the photo.")
common.take_upload(uploaded)
common.example_picker("predict")

meta = common.current_meta()
if meta is None:
    common.no_model_message()
    st.stop()
photo = common.current_photo()
if photo is None:
    st.info("Upload a photo above, try an example, or upload and crop one on the **Crop** page.")
    st.stop()

if photo.crop:
    c = photo.crop
    st.markdown(f"Photo **{photo.name}**, cropped on the Crop page to {c['width']}×{c['height']} px at "
                f"({c['left']}, {c['top']}).")
    st.button("Use the whole photo instead", on_click=lambda: st.session_state.update(photo_crop=None))
else:
    st.markdown(f"Photo **{photo.name}** (whole photo; the model centre-crops it).")

stage = context_of(meta)  # the model's optional clinical-context stage
answers = {}
with st.expander("Clinical context (optional)", expanded=stage is not None):
    if stage is None:
        st.caption("This model has no context stage: it uses the photo only.")
    else:
        st.caption("Any, all or none of these: each answer you give is used, and the result says which. "
                   "Kept for this session only, never saved.")
        answers = common.context_form(stage)
        st.button("Clear the answers", on_click=common.clear_context_answers)

col_method, col_opacity = st.columns(2)
method_label = col_method.radio("Heat-map method", ["Grad-CAM", "Grad-CAM++"], horizontal=True, key="cam_method")
opacity = col_opacity.slider("Heat-map opacity", 0.0, 1.0, 0.45, 0.05, key="cam_opacity")
method = {"Grad-CAM": "gradcam", "Grad-CAM++": "gradcam++"}[method_label]

try:
    with st.spinner("Running the model…"):
        pred = common.predict(photo, st.session_state["model_path"], method, answers)
except ImageLoadError as e:
    st.error(f"This file cannot be used: {e}")
    st.stop()
except BundleError as e:
    st.error(f"The model cannot be loaded: {e}")
    st.stop()

# Quality problems come first: they qualify everything below.
if pred.quality:
    st.subheader("Image quality")
    for w in pred.quality:
        st.warning(w.message, icon=":material/warning:")
    st.caption("These problems make the result below less reliable. Retake the photo if you can.")

st.subheader("Result")
left, right = st.columns([1, 1], gap="large")
with left:
    h, w = pred.model_input.shape[:2]
    st.image(overlay(pred.model_input, pred.cam, opacity), width="stretch",
             caption=f"{method_label} on the {w}×{h} px image the model saw: warmer colours mark the regions "
                     "that pushed the score towards 'malignant' (not a lesion outline).")
    with st.expander("The model's input without heat-map"):
        st.image(pred.model_input, width="stretch")
with right:
    fused = pred.fused
    st.markdown(f"**Inputs used: {fused.inputs}**" + (f" ({', '.join(fused.used)})" if fused.used else ""))
    st.markdown(f"### Probability of malignancy: {fused.prob:.1%}")
    d = appstate.describe_model(meta)
    which = "the photo + answers threshold" if fused.used else "the model's threshold"
    if fused.malignant:
        st.error(f"**At or above {which} ({fused.threshold:.3f}): flagged as suspicious.**")
    else:
        st.success(f"**Below {which} ({fused.threshold:.3f}): not flagged.**")
    if fused.used:
        t = stage.threshold
        st.caption(f"Photo + answers threshold chosen on validation: sensitivity {t['val_sensitivity']['value']:.0%}, "
                   f"specificity {t['val_specificity']['value']:.0%} on {t['n_val']} validation images.")
    if fused.verdicts_differ:
        st.warning(f"**The photo alone gives a different verdict:** {fused.image_prob:.1%}, "
                   f"{'flagged' if fused.image_malignant else 'not flagged'} at its own threshold "
                   f"({fused.image_threshold:.3f}).")
    st.markdown(
        f"**What the threshold means.** It was chosen on validation data ({d['threshold_rule']}). On "
        f"{d['n_val'] or '?'} validation images ({d['n_val_malignant'] if d['n_val_malignant'] is not None else '?'} "
        f"malignant) it flagged {d['sensitivity']} of the malignant lesions (sensitivity) and cleared "
        f"{d['specificity']} of the benign ones (specificity). So a lesion that is not flagged can still be "
        "malignant, and many flagged lesions are benign.")
    st.caption("The score is the model's output, not a calibrated risk for you; it depends on the photo "
               "(distance, light, focus) and on how similar it is to the training data.")
    common.provenance_box(meta)
    if pred.timings_ms:
        st.caption("Timings: " + ", ".join(f"{k} {v:.0f} ms" for k, v in pred.timings_ms.items()))

st.divider()
st.caption(common.DISCLAIMER)
