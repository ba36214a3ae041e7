"""Tests for the shared crop-box CSV: read/validate, atomic upsert, apply to a manifest, resume."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from core import cropbox
from core.cropbox import apply_crops, next_unlabelled, read_crops, upsert_crop
from core.manifest import ManifestError, crop_of, read_manifest, write_manifest


def make_image(path: Path, size=(40, 30), orientation: int | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.new("RGB", size, (200, 150, 120)).save(path, exif=exif)
    return str(path.resolve())


@pytest.fixture
def manifest(tmp_path):
    images = [make_image(tmp_path / "img" / f"p{i}.jpg") for i in range(4)]
    return pd.DataFrame({"image": images, "label": [1, 0, 1, 0], "patient_id": ["a", "b", "c", "d"]})


BOXES = {"p0.jpg": {"left": 0, "top": 0, "width": 40, "height": 30},
         "p1.jpg": {"left": 5, "top": 6, "width": 10, "height": 12}}


def test_round_trip_boxes_to_manifest(tmp_path, manifest):
    crops = tmp_path / "crops.csv"
    for name, box in BOXES.items():
        upsert_crop(crops, name, box, note="ok")
    back = read_crops(crops)
    assert back["image_id"].tolist() == ["p0.jpg", "p1.jpg"]
    assert back.loc[1, ["left", "top", "width", "height"]].tolist() == [5, 6, 10, 12]
    assert back["note"].tolist() == ["ok", "ok"] and back["unusable"].tolist() == [0, 0]
    df, report = apply_crops(manifest, back)
    assert report.kept == 2 and report.dropped == {"no crop box": 2}
    path = write_manifest(df, tmp_path / "cropped.csv")
    again = read_manifest(path)
    assert [crop_of(r) for _, r in again.iterrows()] == list(BOXES.values())
    assert again["patient_id"].tolist() == ["a", "b"]


def test_upsert_overwrites_one_entry_and_keeps_the_others(tmp_path):
    crops = tmp_path / "crops.csv"
    upsert_crop(crops, "a.jpg", {"left": 1, "top": 1, "width": 5, "height": 5})
    upsert_crop(crops, "b.jpg", {"left": 2, "top": 2, "width": 6, "height": 6})
    upsert_crop(crops, "a.jpg", None, unusable=True, note="blurry")
    df = read_crops(crops)
    assert df["image_id"].tolist() == ["b.jpg", "a.jpg"]
    a = df.set_index("image_id").loc["a.jpg"]
    assert a["unusable"] == 1 and pd.isna(a["left"]) and a["note"] == "blurry"
    assert df.set_index("image_id").loc["b.jpg", "width"] == 6
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_upsert_accepts_float_boxes_from_the_cropper(tmp_path):
    df = upsert_crop(tmp_path / "c.csv", "x.jpg", {"left": 1.4, "top": 2.6, "width": 10.0, "height": 9.5})
    assert df.loc[0, ["left", "top", "width", "height"]].tolist() == [1, 3, 10, 10]


def test_a_failed_write_keeps_earlier_crops(tmp_path, monkeypatch):
    crops = tmp_path / "crops.csv"
    upsert_crop(crops, "a.jpg", BOXES["p1.jpg"])
    before = crops.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(cropbox.os, "replace", crash)
    with pytest.raises(OSError):
        upsert_crop(crops, "b.jpg", BOXES["p1.jpg"])
    assert crops.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_upsert_needs_a_box_or_the_unusable_flag(tmp_path):
    with pytest.raises(ManifestError, match="crop box or mark the image unusable"):
        upsert_crop(tmp_path / "c.csv", "a.jpg", None)
    with pytest.raises(ManifestError, match="width, height > 0"):
        upsert_crop(tmp_path / "c.csv", "a.jpg", {"left": 0, "top": 0, "width": 0, "height": 5})


def test_box_outside_image_is_an_error_naming_image_and_box(tmp_path, manifest):
    crops = tmp_path / "crops.csv"
    upsert_crop(crops, "p2.jpg", {"left": 30, "top": 0, "width": 20, "height": 10})
    with pytest.raises(ManifestError, match=r"p2\.jpg: crop box .*'left': 30.* outside the 40x30 image"):
        apply_crops(manifest, read_crops(crops))
    df, _ = apply_crops(manifest, read_crops(crops), validate_sizes=False)
    assert df["crop_left"].tolist() == [30]


def test_box_is_checked_against_the_exif_oriented_size(tmp_path):
    # Stored 40x30 but EXIF orientation 6 (rotated 90 degrees): users see and crop a 30x40 image.
    image = make_image(tmp_path / "rot.jpg", (40, 30), orientation=6)
    manifest = pd.DataFrame({"image": [image], "label": [1]})
    crops = tmp_path / "crops.csv"
    upsert_crop(crops, "rot.jpg", {"left": 0, "top": 0, "width": 30, "height": 40})
    df, _ = apply_crops(manifest, read_crops(crops))
    assert df["crop_height"].tolist() == [40]
    upsert_crop(crops, "rot.jpg", {"left": 0, "top": 0, "width": 40, "height": 30})
    with pytest.raises(ManifestError, match="30x40"):
        apply_crops(manifest, read_crops(crops))


def test_unusable_and_unboxed_rows_are_dropped_and_counted(tmp_path, manifest):
    crops = tmp_path / "crops.csv"
    upsert_crop(crops, "p0.jpg", BOXES["p0.jpg"])
    upsert_crop(crops, "p1.jpg", None, unusable=True, note="far")
    upsert_crop(crops, "p2.jpg", BOXES["p1.jpg"], unusable=True)  # flag wins over a stale box
    df, report = apply_crops(manifest, read_crops(crops))
    assert [Path(p).name for p in df["image"]] == ["p0.jpg"]
    assert report.dropped == {"marked unusable in the crop file": 2, "no crop box": 1}
    assert report.kept + sum(report.dropped.values()) == len(manifest)


def test_entries_match_the_manifest_path_as_written(tmp_path, manifest):
    path = write_manifest(manifest, tmp_path / "m.csv")
    written = pd.read_csv(path)["image"].tolist()  # relative, e.g. img/p0.jpg
    crops = tmp_path / "crops.csv"
    upsert_crop(crops, written[3], BOXES["p1.jpg"])
    upsert_crop(crops, manifest["image"][2], BOXES["p1.jpg"])  # absolute path works too
    df, report = apply_crops(read_manifest(path), read_crops(crops))
    assert [Path(p).name for p in df["image"]] == ["p2.jpg", "p3.jpg"]


def test_ambiguous_file_name_needs_a_path(tmp_path):
    a = make_image(tmp_path / "phone1" / "IMG_0001.jpg")
    b = make_image(tmp_path / "phone2" / "IMG_0001.jpg")
    manifest = pd.DataFrame({"image": [a, b], "label": [0, 1]})
    crops = tmp_path / "crops.csv"
    upsert_crop(crops, "IMG_0001.jpg", BOXES["p1.jpg"])
    with pytest.raises(ManifestError, match="several manifest images"):
        apply_crops(manifest, read_crops(crops))
    crops.unlink()
    upsert_crop(crops, b, BOXES["p1.jpg"])
    df, report = apply_crops(manifest, read_crops(crops))
    assert df["image"].tolist() == [b] and report.dropped == {"no crop box": 1}


def test_next_unlabelled_resumes_where_the_user_left_off(tmp_path, manifest):
    crops = tmp_path / "crops.csv"
    assert next_unlabelled(manifest, read_crops(crops)) == 0  # no file yet
    upsert_crop(crops, "p0.jpg", BOXES["p0.jpg"])
    upsert_crop(crops, "p1.jpg", None, unusable=True)
    upsert_crop(crops, "p3.jpg", BOXES["p1.jpg"])
    assert next_unlabelled(manifest, read_crops(crops)) == 2
    upsert_crop(crops, "p2.jpg", BOXES["p1.jpg"])
    assert next_unlabelled(manifest, read_crops(crops)) is None


def test_crop_progress(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30)).save(imgs / f"p{i}.jpg")
    manifest = write_manifest(pd.DataFrame({"image": [str(imgs / f"p{i}.jpg") for i in range(3)],
                                            "label": [0, 1, 0]}), tmp_path / "m.csv")
    df = read_manifest(manifest)
    key = cropbox.image_id_for(df["image"][0], df)
    assert key == os.path.join("images", "p0.jpg")
    crops = tmp_path / "crops.csv"
    upsert_crop(crops, key, {"left": 1, "top": 2, "width": 10, "height": 10})
    upsert_crop(crops, "p2.jpg", None, unusable=True, note="blurry")
    entries = cropbox.entries_for(df, read_crops(crops))
    assert cropbox.crop_progress(entries) == (2, 3)
    assert cropbox.entry_box(entries[0]) == {"left": 1, "top": 2, "width": 10, "height": 10}
    assert entries[1] is None and cropbox.entry_box(entries[2]) is None and entries[2]["unusable"] == 1


def test_entries_for_matches_as_apply_crops_does(tmp_path, manifest):
    df = read_manifest(write_manifest(manifest, tmp_path / "m.csv"))
    crops = tmp_path / "crops.csv"
    upsert_crop(crops, cropbox.image_id_for(df["image"][0], df), BOXES["p0.jpg"])  # relative to the manifest
    upsert_crop(crops, manifest["image"][1], BOXES["p1.jpg"])                      # absolute path
    upsert_crop(crops, "p2.jpg", None, unusable=True)                              # file name only
    upsert_crop(crops, "p1.jpg", None, unusable=True)                              # a path beats a file name
    entries = cropbox.entries_for(df, read_crops(crops))
    assert [e and e["image_id"] for e in entries] == ["img/p0.jpg", manifest["image"][1],
                                                      "p2.jpg", None]
    assert [cropbox.entry_box(e) for e in entries] == [BOXES["p0.jpg"], BOXES["p1.jpg"], None, None]
    assert [cropbox.is_labelled(e) for e in entries] == [True, True, True, False]
    assert cropbox.crop_progress(entries) == (3, 4)
    assert next_unlabelled(df, read_crops(crops)) == 3
    kept, report = apply_crops(df, read_crops(crops))
    assert [Path(p).name for p in kept["image"]] == ["p0.jpg", "p1.jpg"]
    assert report.dropped == {"marked unusable in the crop file": 1, "no crop box": 1}


@pytest.mark.parametrize("text, message", [
    ("image_id,left,top,width\na.jpg,1,1,1\n", "missing required column.*height, unusable"),
    ("image_id,left,top,width,height,unusable\na.jpg,1,1,5,5,maybe\n", "line 2: unusable must be 0 or 1"),
    ("image_id,left,top,width,height,unusable\na.jpg,1,,5,5,0\n", "incomplete"),
    ("image_id,left,top,width,height,unusable\na.jpg,-1,0,5,5,0\n", "left, top >= 0"),
    ("image_id,left,top,width,height,unusable\na.jpg,x,0,5,5,0\n", "not numeric"),
    ("image_id,left,top,width,height,unusable\na.jpg,1,1,5,5,0\na.jpg,1,1,5,5,0\n", "more than once"),
    ("image_id,left,top,width,height,unusable\n,1,1,5,5,0\n", "empty image_id"),
])
def test_read_crops_rejects_bad_files(tmp_path, text, message):
    path = tmp_path / "crops.csv"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_crops(path)


def test_read_crops_accepts_a_hand_written_file_without_note(tmp_path):
    path = tmp_path / "crops.csv"
    path.write_text("image_id,left,top,width,height,unusable\na.jpg,1,2,3,4,0\nb.jpg,,,,,1\nc.jpg,,,,,0\n")
    df = read_crops(path)
    assert df.columns.tolist() == ["image_id", "left", "top", "width", "height", "unusable", "note"]
    assert df["unusable"].tolist() == [0, 1, 0] and df["note"].tolist() == ["", "", ""]
    assert read_crops(tmp_path / "absent.csv").empty


def test_pil_fallback_size_follows_exif_orientation(tmp_path):
    # Used when core.images is unavailable; must agree with ImageOps.exif_transpose.
    assert cropbox._pil_size(make_image(tmp_path / "r.jpg", (40, 30), orientation=8)) == (30, 40)
    assert cropbox._pil_size(make_image(tmp_path / "n.jpg", (40, 30), orientation=3)) == (40, 30)


# ------------------------------------------------------------------ the one validity rule
GRID = [{"left": l, "top": t, "width": w, "height": h}
        for l in (-1, 0, 10) for t in (-2, 0, 5) for w in (-1, 0, 1, 30, 31) for h in (0, 20, 25, 26)]


def _old_rule(box, size=None) -> bool:
    """What the four former checks (crop file, apply_crops, CropBox.validate, check_images) refused together."""
    bad = box["left"] < 0 or box["top"] < 0 or box["width"] <= 0 or box["height"] <= 0
    if size is not None:
        bad = bad or box["left"] + box["width"] > size[0] or box["top"] + box["height"] > size[1]
    return bad


@pytest.mark.parametrize("size", [None, (40, 30)])
def test_box_problem_refuses_exactly_what_the_old_checks_refused(size):
    for box in GRID:
        assert (cropbox.box_problem(box, size) is not None) == _old_rule(box, size), box


def test_every_crop_check_uses_the_one_rule(tmp_path):
    from core.dataset import check_images
    from core.images import ImageLoadError, load_image
    image = make_image(tmp_path / "p.jpg")  # 40x30
    outside = {"left": 30, "top": 0, "width": 20, "height": 10}
    reason = cropbox.box_problem(outside, (40, 30))
    with pytest.raises(ImageLoadError, match=reason):
        load_image(image, crop=outside)
    with pytest.raises(ManifestError, match=reason):
        check_images(pd.DataFrame([{"image": image, "label": 1, **{f"crop_{k}": v for k, v in outside.items()}}]))
    upsert_crop(tmp_path / "c.csv", "p.jpg", outside)
    with pytest.raises(ManifestError, match=reason):
        apply_crops(pd.DataFrame({"image": [image]}), read_crops(tmp_path / "c.csv"))
    flat = {"left": 0, "top": 0, "width": 5, "height": 0}
    with pytest.raises(ManifestError, match=cropbox.box_problem(flat).split(" (")[0]):
        upsert_crop(tmp_path / "c.csv", "p.jpg", flat)


def test_a_crop_file_and_manifest_made_on_windows_work_here(tmp_path, manifest):
    """Windows writes 'img\\p0.jpg'; a research group's shared folder is opened on macOS and Linux too."""
    (tmp_path / "m.csv").write_text("image,label\n" + "".join(f"img\\p{i}.jpg,{i % 2}\n" for i in range(4)),
                                    encoding="utf-8")
    df = read_manifest(tmp_path / "m.csv")
    assert df["image"].tolist() == manifest["image"].tolist()
    (tmp_path / "crops.csv").write_text("image_id,left,top,width,height,unusable,note\n"
                                        "img\\p0.jpg,0,0,40,30,0,lésion floue\n", encoding="utf-8")
    kept, report = apply_crops(df, read_crops(tmp_path / "crops.csv"))
    assert [Path(p).name for p in kept["image"]] == ["p0.jpg"] and report.dropped == {"no crop box": 3}
    assert cropbox.image_id_for(df["image"][0], df) == "img/p0.jpg"  # what this machine writes: '/' everywhere
    assert read_crops(tmp_path / "crops.csv")["note"].tolist() == ["lésion floue"]
