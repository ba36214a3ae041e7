"""Predict: one photo (uploaded here or cropped on the Crop page) -> quality warnings, then either "not assessed"
with the reason (unusable photo, or unlike the training photos) or the calibrated probability, the verdict
(flagged / not flagged) at the model's threshold and Grad-CAM; similar training cases and the model's provenance."""
from pathlib import Path

import streamlit as st

from core import appstate
from core.bundle import BundleError
from core.context import context_of
from core.gradcam import overlay
from core.images import ImageLoadError
from core.metrics import format_score, format_whole_percent, spell_apart
from core.similar import seen_in_training
from core.trust import interval_text, with_interval
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
cleared_for = st.session_state.pop("answers_cleared_for", None)  # said once, on the page after the photo changed
if stage is not None and cleared_for:
    st.info(f"The clinical answers given for the previous photo were cleared when {cleared_for} replaced it: "
            "answer again for this lesion.", icon=":material/info:")
with st.expander("Clinical context (optional)", expanded=bool(st.session_state.get("context_answers"))):
    if stage is None:
        st.caption("This model has no context stage: it uses the photo only.")
    else:
        st.caption("Any, all or none of these: each answer you give is used, and the result says which. "
                   "Kept for this session only, never saved; a new photo clears them.")
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

# Quality problems come first: they qualify everything below (refusals are said in the result itself).
warnings = [w for w in pred.quality if not w.refusal]
if warnings:
    st.subheader("Image quality")
    for w in warnings:
        st.warning(w.message, icon=":material/warning:")
    if pred.assessed:  # a refused photo has no result for them to qualify
        st.caption("These problems make the result below less reliable. Retake the photo if you can.")

st.subheader("Result")
left, right = st.columns([1, 1], gap="large")
with left:
    h, w = pred.model_input.shape[:2]
    if pred.assessed and pred.cam_empty:  # a uniform overlay would read as "nothing suspicious here"
        st.image(pred.model_input, width="stretch", caption=f"The {w}×{h} px image the model saw.")
        st.info(f"{method_label} found no region that pushed the score towards 'malignant' (its weighted map is "
                "negative everywhere), so it has no heat-map to show. That does not mean the photo is unremarkable. "
                + ("Grad-CAM++ weighs the gradients differently and may show where the model looked."
                   if method == "gradcam" else ""), icon=":material/info:")
    elif pred.assessed:
        st.image(overlay(pred.model_input, pred.cam, opacity), width="stretch",
                 caption=f"{method_label} on the {w}×{h} px image the model saw: warmer colours mark the regions "
                         "that pushed the score towards 'malignant' (not a lesion outline).")
        with st.expander("The model's input without heat-map"):
            st.image(pred.model_input, width="stretch")
    else:
        st.image(pred.model_input, width="stretch", caption=f"The {w}×{h} px image the model saw.")
with right:
    d = appstate.describe_model(meta)
    if not pred.assessed:
        st.error(f"**Not assessed.** {pred.not_assessed_reason}", icon=":material/block:")
        if pred.assessment.refusal == "out_of_distribution":
            st.markdown(f"This model knows only photos like the ones it learned from ({d['training_sets']}). "
                        "Photos of something other than skin, screenshots, scans and photos taken very differently "
                        "are outside it. If this is a lesion, retake a close-up smartphone photo in daylight, in "
                        "focus, with the lesion in the centre.")
        with st.expander("Raw model score (unreliable for this photo)"):
            st.markdown(f"Raw score {format_score(pred.prob)}. The model was not built for this photo: this number "
                        "says nothing about the skin in it and must not be read as a risk.")
    else:
        fused = pred.fused
        st.markdown(f"**Inputs used: {fused.inputs}**" + (f" ({fused.used_words})" if fused.used else ""))
        if fused.used:  # the clinical-context stage: photo score and answers fused, with its own threshold
            prob, thr = spell_apart(fused.prob, fused.threshold)
            st.markdown("### Probability of malignancy from the photo and the answers: "
                        + with_interval(prob, fused.ci95))
            st.caption(stage.interval_sentence(fused.ci95, interval_text(fused.ci95) if fused.ci95 else ""))
            flagged, thr_text = fused.malignant, f"the photo + answers threshold, {thr}"
        elif pred.prob_calibrated is not None:
            prob, thr = spell_apart(pred.prob_calibrated, pred.threshold_calibrated, format_whole_percent)
            st.markdown(f"### Calibrated probability of malignancy: {with_interval(prob, pred.prob_calibrated_ci95)}")
            st.caption(f"{pred.reference[0].upper() + pred.reference[1:]}, about {prob} of "
                       "photos scored like this one were malignant. It describes that population, not this patient. "
                       + (pred.interval_note or ""))
            flagged = pred.verdict == "flagged"
            thr_text = f"the model's threshold, {thr} calibrated (raw score {format_score(pred.threshold)})"
        else:
            prob, thr = spell_apart(pred.prob, pred.threshold)
            st.markdown(f"### Model score: {prob} (not a calibrated probability)")
            flagged, thr_text = pred.verdict == "flagged", f"the model's threshold ({thr})"
        if flagged:
            st.error(f"**Flagged**: at or above {thr_text}.")
        else:
            st.success(f"**Not flagged**: below {thr_text}.")
        if pred.disagreement is not None:  # an ensemble: how far apart its models are is part of the answer
            (st.warning if pred.disagreement.split else st.caption)(
                pred.disagreement.sentence() + (" Treat this photo as uncertain." if pred.disagreement.split else ""))
        if fused.used:
            st.caption(stage.threshold_note() + (f" {note}" if (note := stage.answered_note(fused.used)) else "")
                       + (f" On new patients, the same rule gave {d['fused_new_patients']}."
                          if d["fused_new_patients"] else ""))
        if fused.used:  # the photo-only result stays in view: a differing verdict as a warning, else a caption
            said = "flagged" if fused.image_malignant else "not flagged"
            if pred.prob_calibrated is not None:
                prob, thr = spell_apart(pred.prob_calibrated, pred.threshold_calibrated, format_whole_percent)
                alone = (f"calibrated probability {with_interval(prob, pred.prob_calibrated_ci95)}, {said} at its "
                         f"own threshold ({thr} calibrated)")
            else:
                prob, thr = spell_apart(fused.image_prob, fused.image_threshold)
                alone = f"score {prob}, {said} at its own threshold ({thr})"
            if fused.verdicts_differ:
                st.warning(f"**The photo alone gives a different verdict:** {alone}.")
            else:
                st.caption(f"The photo alone: {alone}.")
        if seen := seen_in_training(pred.similar or []):
            st.warning(f"**This photo is (nearly) identical to one of the model's {seen.split} photos** "
                       f"({Path(seen.image).name}, similarity {seen.similarity:.3f}): the model has "
                       f"{'learned' if seen.split == 'train' else 'been tuned on'} it, so this result is not an "
                       "estimate for a new patient.", icon=":material/content_copy:")
        which = "the photo-only threshold" if fused.used else "the threshold"
        st.markdown(
            f"**What {which} means.** It was chosen on {d['val_images']} data ({d['threshold_rule']}). On "
            f"{d['n_val'] or '?'} {d['val_images']} images "
            f"({d['n_val_malignant'] if d['n_val_malignant'] is not None else '?'} malignant) it flagged "
            f"{d['sensitivity']} of the malignant lesions (sensitivity) and cleared {d['specificity']} of the benign "
            "ones (specificity)."
            + (f" Tried on new patients, the same rule gave {d['new_patients']}." if d["new_patients"] else "")
            + (f" On the test patients, the photo-only result gave {d['test']}." if d["test"] else "")
            + " So a lesion that is not flagged can still be malignant, and many flagged lesions "
            "are benign. A flag is a screening signal, not a diagnosis.")
        raw, raw_thr = spell_apart(pred.prob, pred.threshold)
        st.caption(f"Raw model score {raw} (not a probability of malignancy; the model's threshold, {raw_thr}, "
                   "applies to it). The result depends on "
                   "the photo (distance, light, focus) and "
                   "on how similar it is to the training data. Dermoscopic images (taken through a dermatoscope) "
                   "are outside what a smartphone-photo model was trained on, and its out-of-distribution check "
                   "does not reliably catch them (measured: it accepted most of two ISIC dermoscopic sets): do not "
                   "use it on them.")
    for lack in pred.lacks:
        st.info(f"This model has {lack}.", icon=":material/info:")
    common.provenance_box(meta)
    if pred.timings_ms:
        st.caption("Timings: " + ", ".join(f"{k} {v:.0f} ms" for k, v in pred.timings_ms.items()) + ". "
                   + common.engine_note(st.session_state["model_path"]))

if pred.similar and pred.assessed:  # beside a refused photo, "similar" labels would read as a verdict
    st.subheader("Most similar photos in the model's training and validation data")
    st.caption("What the model thinks this photo resembles, in its own feature space (cosine similarity; 1 = "
               "identical features). Labels are biopsy or clinical diagnoses from the training data.")
    cols = st.columns(len(pred.similar))
    missing = 0
    for col, case in zip(cols, pred.similar):
        caption = (f"{case.label_name}" + (f" ({case.diagnosis})" if case.diagnosis else "")
                   + f" · {case.split} · similarity {case.similarity:.2f}")
        thumb = common.thumbnail(case.image, 160) if case.available else None
        if thumb is not None:
            col.image(thumb, caption=caption)
        else:
            missing += 1
            col.markdown(f"**{caption}**")
    if missing:
        st.caption(f"{missing} of these photos are not on this machine (the model stores references, not copies "
                   "of patients' photos): their labels are shown alone.")

st.divider()
st.caption(common.DISCLAIMER)
