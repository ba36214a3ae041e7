"""Crop: draw a box around the lesion on one photo (carried to Predict), or label a whole dataset's crop boxes
into a crop-box CSV (resumable; images can be marked unusable). Works without a model."""
from pathlib import Path

import streamlit as st

from core import cropbox, photos
from core.cropbox import read_crops, upsert_crop
from core.images import ImageLoadError
from core.manifest import ManifestError, read_manifest
from ui import common

st.title("Crop")
st.markdown("**Skin-lesion screening from smartphone photos (research tool).** Three steps: crop the photo to the "
            "lesion here, see the model's result on **Predict** (with the reason when it cannot assess a photo), and "
            "the evidence behind the model on **Dashboard**.")
st.caption(common.DISCLAIMER)
st.caption("Why crop: in the study this tool reproduces (Chan, Zhang and Yuan, *Skin Cancer Detection from Smartphone "
           "Camera Images via Transfer Learning*, Stanford), the model fine-tuned on MIDAS iPhone photos cropped to "
           "the lesion reached a test ROC-AUC of 0.79; on uncropped photos (a larger, different set) 0.58. The model "
           "should see the lesion, not the background. Boxes are stored in original pixels of the upright photo "
           "(EXIF orientation applied).")

mode = st.radio("Crop", ["One photo (for Predict)", "A dataset (crop-box file for training)"], horizontal=True,
                key="crop_mode", label_visibility="collapsed")


def single_photo() -> None:
    uploaded = st.file_uploader("Drag and drop a photo", type=common.IMAGE_TYPES, key="crop_upload",
                                help="Kept in memory for this session only; nothing is saved.")
    common.take_upload(uploaded)
    common.example_picker("crop")
    photo = common.current_photo()
    if photo is None:
        st.info("Upload a photo (JPEG, PNG or iPhone HEIC), or try an example above.")
        return
    try:
        disp, size = common.preview(photo.data, photo.name)
    except ImageLoadError as e:
        st.error(f"This file cannot be used: {e}")
        return
    st.markdown(f"**{photo.name}**: {size[0]}×{size[1]} px (upright); shown at {disp.width}×{disp.height}.")
    square = st.checkbox("Square box", value=True, key="crop_square")
    whole = st.checkbox("Use the whole image (no crop)", key="crop_whole")
    if whole:
        st.session_state["photo_crop"] = None
        st.image(disp)
    else:
        box = common.draw_box(disp, square=square, key=f"cropper-{photo.id}-{square}")
        crop = photos.to_original(box, disp.size, size)
        st.session_state["photo_crop"] = crop
        d = photos.to_display(crop, disp.size, size)
        st.image(disp.crop((d["left"], d["top"], d["left"] + d["width"], d["top"] + d["height"])), width=224,
                 caption=f"Crop: {crop['width']}×{crop['height']} px at ({crop['left']}, {crop['top']}) "
                         "in the original photo")
    crop = st.session_state["photo_crop"]
    st.download_button("Save the " + ("photo" if whole else "crop") + " (PNG)", on_click="ignore",
                       data=lambda: photos.crop_png(photo.data, photo.name, crop), mime="image/png",
                       file_name=f"{Path(photo.name).stem}_crop.png", icon=":material/download:")
    st.page_link("ui/predict.py", label="Predict on this " + ("photo" if whole else "crop"),
                 icon=":material/search:")


def _goto(i: int) -> None:
    st.session_state["ds_index"] = i


def dataset() -> None:
    manifest_path = common.typed_path(st.text_input("Manifest CSV (from `python -m train.data ...`)",
                                                    key="ds_manifest"))
    if not manifest_path:
        st.info("Give a manifest to step through its images. Boxes go to a crop-box CSV "
                "(image_id, left, top, width, height, unusable, note) that training reads; it is saved after "
                "every image, so you can stop and resume any time.")
        return
    default_crops = str(Path(manifest_path).with_name(Path(manifest_path).stem + "_crops.csv"))
    crops_path = common.typed_path(st.text_input("Crop-box file (created if missing)", value=default_crops,
                                                 key="ds_crops"))
    try:
        df = read_manifest(manifest_path)
        crops = read_crops(crops_path)
    except ManifestError as e:
        st.error(str(e))
        return
    if df.empty:
        st.warning("The manifest has no images.")
        return
    entries = cropbox.entries_for(df, crops)
    done, total = cropbox.crop_progress(entries)
    st.progress(done / total, text=f"{done} / {total} images done")
    todo = [i for i, e in enumerate(entries) if not cropbox.is_labelled(e)]
    if "ds_index" not in st.session_state or st.session_state.get("ds_source") != (manifest_path, crops_path):
        st.session_state.update(ds_index=todo[0] if todo else 0, ds_source=(manifest_path, crops_path))
    i = min(max(0, st.session_state["ds_index"]), total - 1)

    nav = st.columns(4)
    nav[0].button("◀ Previous", on_click=_goto, args=(max(0, i - 1),), disabled=i == 0, width="stretch")
    nav[1].button("Next ▶", on_click=_goto, args=(min(total - 1, i + 1),), disabled=i == total - 1,
                  width="stretch")
    nav[2].button("First unlabelled", on_click=_goto, args=(todo[0] if todo else i,), disabled=not todo,
                  width="stretch")
    nav[3].markdown(f"Image **{i + 1}** of {total}")

    image = str(df["image"].iloc[i])
    entry = entries[i]
    # re-labelling overwrites the entry that matched (the loader would keep reading that one)
    image_id = entry["image_id"] if entry else cropbox.image_id_for(image, df)
    saved = ("not labelled yet" if entry is None else "saved: unusable" if entry["unusable"]
             else f"saved box {cropbox.entry_box(entry)}")
    st.markdown(f"`{image_id}` · label {'malignant' if df['label'].iloc[i] == 1 else 'benign'} · {saved}")

    unusable = st.checkbox("Unusable (blurred, lesion out of focus, taken too far away)",
                           value=bool(entry and entry["unusable"]), key=f"ds_unusable_{i}")
    note = st.text_input("Note", value=(entry or {}).get("note") or "", key=f"ds_note_{i}")
    box = None
    try:
        disp, size = common.preview_file(image, Path(image).stat().st_mtime)
    except (ImageLoadError, OSError) as e:
        st.error(f"Cannot show this image: {e}. Mark it unusable or fix the manifest.")
    else:
        if not unusable:
            square = st.checkbox("Square box", value=True, key="ds_square")
            existing = cropbox.entry_box(entry)
            shown = photos.to_display(existing, disp.size, size) if existing else None
            drawn = common.draw_box(disp, square=square, key=f"ds-cropper-{i}-{square}", default=shown)
            box = photos.to_original(drawn, disp.size, size)
            st.caption(f"Box in original pixels: {box}")
    if st.button("Save and go to the next unlabelled", type="primary", disabled=box is None and not unusable):
        try:
            upsert_crop(crops_path, image_id, None if unusable else box, unusable=unusable, note=note)
        except (ManifestError, OSError) as e:
            st.error(f"Not saved: {e}")
            return
        after = [j for j in todo if j > i] or [j for j in todo if j != i]
        st.session_state["ds_index"] = after[0] if after else i
        st.toast(f"Saved {image_id}")
        st.rerun()


if mode.startswith("One"):
    single_photo()
else:
    dataset()
