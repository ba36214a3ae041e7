"""The manifest format and the generic csv/folder importers."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from core.manifest import ManifestError, crop_of, import_csv, import_folder, read_manifest, write_manifest


def test_written_manifest_reads_back_with_absolute_paths(image_set, tmp_path):
    labels, images = image_set
    df, report = import_csv(labels, images, domain="synthetic")
    out = write_manifest(df, tmp_path / "sub" / "m.csv")
    raw = pd.read_csv(out)
    assert not raw["image"].str.startswith("/").any()  # relative on disk, so the folder can move
    back = read_manifest(out)
    assert back["image"].tolist() == df["image"].tolist()
    assert back["patient_id"].tolist() == df["patient_id"].tolist()
    assert report.kept == 40 and set(back["domain"]) == {"synthetic"}


def test_csv_import_counts_what_it_drops(image_set, tmp_path):
    labels, images = image_set
    df = pd.read_csv(labels, dtype=str)
    df.loc[0, "label"] = "indeterminate"
    df.loc[1, "image"] = "missing.png"
    df.loc[2, "label"] = "malignant"
    df.to_csv(labels, index=False)
    out, report = import_csv(labels, images)
    assert report.kept == 38
    assert report.dropped == {"image file missing": 1, "label not malignant/benign ('indeterminate')": 1}
    assert out.loc[out["image"].str.endswith("img002.png"), "label"].item() == 1
    # each dropped row is named, and the list lands beside the manifest
    assert report.named == [(df.loc[0, "image"], "label not malignant/benign ('indeterminate')"),
                            (str(images / "missing.png"), "image file missing")]
    named = report.write_named(write_manifest(out, tmp_path / "m.csv"))
    assert named == tmp_path / "m.dropped.csv"
    assert pd.read_csv(named).values.tolist() == [list(r) for r in report.named]
    from core.manifest import ImportReport
    assert ImportReport(kept=40).write_named(tmp_path / "m.csv") is None and not named.exists()  # no stale list


def test_csv_import_names_rows_without_an_image_and_keeps_each_photo_once(image_set):
    """A photo listed twice with one label keeps one row; with two labels it is dropped (which is right is
    unknown, and two copies could fall on both sides of a split)."""
    labels, images = image_set
    df = pd.read_csv(labels, dtype=str)
    df.loc[0, "image"] = None
    twice = pd.concat([df, df.iloc[[1]], df.iloc[[2]].assign(label=str(1 - int(df.loc[2, "label"])))])
    twice.to_csv(labels, index=False)
    out, report = import_csv(labels, images)
    assert report.dropped == {"no image name": 1, "listed again (its first row kept)": 1,
                              "listed more than once with different labels": 2}
    assert (f"{labels.name} row 2", "no image name") in report.named
    assert out["image"].is_unique and len(out) == 38
    assert not out["image"].str.endswith(df.loc[2, "image"]).any()


def test_csv_import_with_other_column_names(image_set):
    labels, images = image_set
    pd.read_csv(labels).rename(columns={"image": "file", "label": "malignant", "patient_id": "pid"}) \
        .to_csv(labels, index=False)
    df, _ = import_csv(labels, images, image_col="file", label_col="malignant", patient_col="pid")
    assert len(df) == 40 and df["patient_id"].notna().all()


def test_wrong_columns_are_named(image_set):
    labels, images = image_set
    pd.read_csv(labels).rename(columns={"label": "dx"}).to_csv(labels, index=False)
    with pytest.raises(ManifestError, match=r"missing required column\(s\) label; found: image, dx"):
        import_csv(labels, images)


@pytest.mark.parametrize("content, message", [
    ("image,label\na.png,2\n", "label must be 0"),
    ("image;label\na.png;1\n", "found: image;label \\(the file seems to separate columns with semicolons: save it "
                                "comma-separated\\)"),
    ("image,diagnosis\na.png,1\n", "missing required column"),
    ("image,label,split\na.png,1,holdout\n", "split values"),
    ("image,label\n,1\n", r"1 row\(s\) with no image path, e.g. row 2"),
    ("image,label\na.png,\n", "row 2 has no label"),
])
def test_bad_manifests_are_refused(tmp_path, content, message):
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_an_empty_or_missing_labels_csv_is_named(image_set, tmp_path):
    _, images = image_set
    (tmp_path / "labels.csv").write_text("")
    with pytest.raises(ManifestError, match="labels.csv: not a readable CSV"):
        import_csv(tmp_path / "labels.csv", images)
    with pytest.raises(ManifestError, match="gone.csv: labels CSV not found"):
        import_csv(tmp_path / "gone.csv", images)


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")


def test_folder_import(tmp_path, image_set):
    """Every file under the root is kept or named: by content (an extensionless PNG is kept, text named .png and a
    PNG cut short after its header are not), and a photo outside the two label folders has no label."""
    _, images = image_set
    ds = tmp_path / "ds"
    for name in ("benign", "malignant"):
        (ds / name).mkdir(parents=True)
    (images / "img000.png").rename(ds / "benign" / "a.png")
    (images / "img001.png").rename(ds / "malignant" / "b.png")
    (images / "img002.png").rename(ds / "malignant" / "IMG_0003")
    (images / "img003.png").rename(ds / "loose.png")
    (ds / "malignant" / "notes.txt").write_text("x")
    (ds / "benign" / "fake.png").write_text("not a picture")
    whole = (images / "img004.png").read_bytes()
    (ds / "benign" / "cut.png").write_bytes(whole[: len(whole) * 2 // 3])  # a sound header, pixels cut short
    df, report = import_folder(ds)
    assert sorted(df["label"]) == [0, 1, 1] and df["image"].str.endswith("IMG_0003").any()
    assert report.dropped == {"not a usable image (not_an_image)": 2, "not a usable image (corrupt)": 1,
                              "not inside benign/ or malignant/ (no label)": 1}
    assert [(Path(w.split(":")[0]).name, why) for w, why in report.named] == [
        ("cut.png", "not a usable image (corrupt)"), ("fake.png", "not a usable image (not_an_image)"),
        ("loose.png", "not inside benign/ or malignant/ (no label)"), ("notes.txt", "not a usable image (not_an_image)")]
    with pytest.raises(ManifestError, match="benign/ and malignant/"):
        import_folder(images)


def test_crop_of_needs_all_four_columns():
    assert crop_of({"crop_left": 1, "crop_top": 2, "crop_width": 3, "crop_height": 4}) == \
        {"left": 1, "top": 2, "width": 3, "height": 4}
    assert crop_of({"crop_left": float("nan"), "crop_top": None, "crop_width": " ", "image": "a.jpg"}) is None
    with pytest.raises(ManifestError, match=r"^a.jpg: incomplete crop box \(crop_height empty\)"):
        crop_of({"crop_left": 1, "crop_top": 2, "crop_width": 3, "crop_height": float("nan"), "image": "a.jpg"})
    with pytest.raises(ManifestError, match=r"crop box is not numbers \(crop_left='x'"):
        crop_of({"crop_left": "x", "crop_top": 2, "crop_width": 3, "crop_height": 4})
