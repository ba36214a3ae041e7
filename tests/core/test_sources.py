"""Tests for the ISIC, MRA-MIDAS and PAD-UFES-20 importers."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from core.cropbox import read_crops, upsert_crop
from core.manifest import ImportReport, ManifestError, read_manifest, write_manifest
from core.sources import (ImageIndex, import_isic, import_midas, import_pad_ufes, isic_download_command,
                          keep_one_per_lesion, midas_cropped, parse_fitzpatrick)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PAD_REAL = Path("/work/shared/data/pad_ufes_20_subset")


def make_image(path: Path, size=(32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 80, 60)).save(path)
    return path


def accounted(df, report, n_rows):
    """Every source row is either kept or counted under a drop reason."""
    return len(df) == report.kept and report.kept + sum(report.dropped.values()) == n_rows


# --- helpers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("3.0", "3"), ("3", "3"), (2.0, "2"), ("I", "1"), ("IV", "4"), ("vi dark brown skin", "6"),
    ("ii fair skin, blue eyes", "2"), ("V", "5"), ("iii", "3"), (None, None), (float("nan"), None),
    ("", None), ("7.0", None), ("fair", None), ("ivory", None),
])
def test_parse_fitzpatrick(value, expected):
    assert parse_fitzpatrick(value) == expected


def test_image_index_tolerates_suffix_case_and_midas_cropped_names(tmp_path):
    make_image(tmp_path / "a" / "ISIC_1.JPG")
    make_image(tmp_path / "b" / "photo_cropped.jpg")
    make_image(tmp_path / "c.jpg")
    index = ImageIndex(tmp_path)
    assert index.find("ISIC_1.JPG").name == "ISIC_1.JPG"
    assert index.find("isic_1.jpg").name == "ISIC_1.JPG"
    assert index.find("photo.jpeg").name == "photo_cropped.jpg"
    assert index.find("c.png").name == "c.jpg"
    assert index.find("absent.jpg") is None and index.find(float("nan")) is None


def test_image_index_missing_folder(tmp_path):
    with pytest.raises(ManifestError, match="image folder not found"):
        ImageIndex(tmp_path / "nope")


# --- ISIC ----------------------------------------------------------------------------------------

def test_isic_download_command_is_the_official_cli_shape(tmp_path):
    cmd = isic_download_command(tmp_path / "isic", limit=20)
    assert cmd == ["isic", "image", "download", "--search",
                   'image_type:"clinical: close-up" OR image_type:"clinical: overview"',
                   "--limit", "20", str(tmp_path / "isic")]
    assert "--limit" not in isic_download_command("out")


@pytest.fixture
def isic_dir(tmp_path):
    for i in (1, 2, 4, 5, 6):  # isic-cli names files <isic_id>.JPG; 7 is missing
        make_image(tmp_path / f"ISIC_900000{i}.JPG")
    make_image(tmp_path / "ISIC_9000003.jpg")  # a lower-case suffix still matches
    return tmp_path


def test_isic_import_current_metadata(isic_dir):
    df, report = import_isic(FIXTURES / "isic" / "metadata.csv", isic_dir)
    assert accounted(df, report, 7)
    assert [Path(p).stem for p in df["image"]] == ["ISIC_9000001", "ISIC_9000002", "ISIC_9000003",
                                                   "ISIC_9000005"]
    assert df["label"].tolist() == [1, 0, 0, 1]
    assert report.dropped == {"diagnosis_1 not Benign/Malignant (Indeterminate)": 1,
                              "no benign/malignant diagnosis": 1, "image file missing": 1}
    first = df.iloc[0]
    assert (first["isic_id"], first["patient_id"], first["lesion_id"]) == \
        ("ISIC_9000001", "IP_9000001", "IL_9000001")
    assert (first["image_type"], first["copyright_license"], first["attribution"]) == \
        ("clinical: close-up", "CC-BY", "Synthetic Clinic A")
    assert df["fitzpatrick"].fillna("").tolist() == ["2", "2", "", "6"]
    assert set(df["domain"]) == {"isic"}
    # age, sex, anatomical site and diameter under the stable context names; the biopsy columns never
    assert (first["age"], first["sex"], first["site"], first["diameter_mm"]) == (55.0, "male", "head_neck", 6.0)
    assert not {"concomitant_biopsy", "diagnosis_confirm_type", "biopsed"} & set(df.columns)


def test_isic_import_legacy_benign_malignant(tmp_path):
    for i in range(1, 6):
        make_image(tmp_path / f"ISIC_800000{i}.JPG")
    df, report = import_isic(FIXTURES / "isic_legacy" / "metadata.csv", tmp_path, domain="isic_old")
    assert accounted(df, report, 5)
    assert df["label"].tolist() == [1, 0]
    assert report.dropped == {"benign_malignant indeterminate": 2, "no benign/malignant diagnosis": 1}
    assert set(df["domain"]) == {"isic_old"}


def test_isic_missing_columns_are_named(tmp_path):
    bad = tmp_path / "metadata.csv"
    pd.DataFrame({"isic_id": ["ISIC_1"], "attribution": ["x"]}).to_csv(bad, index=False)
    with pytest.raises(ManifestError, match="diagnosis_1 \\(or legacy benign_malignant\\)"):
        import_isic(bad, tmp_path)
    pd.DataFrame({"diagnosis_1": ["Benign"]}).to_csv(bad, index=False)
    with pytest.raises(ManifestError, match="isic_id"):
        import_isic(bad, tmp_path)


# --- PAD-UFES-20 ---------------------------------------------------------------------------------

def _pad_images(root: Path) -> Path:
    meta = pd.read_csv(FIXTURES / "pad_ufes" / "metadata.csv", dtype=str)
    for img in meta["img_id"]:
        if img.startswith("PAT_9008"):
            continue  # its file is missing
        name = img.replace(".png", ".jpg") if img.startswith("PAT_9005") else img
        make_image(root / "imgs_part_1" / name)  # PAD's own download uses sub-folders
    return root


def test_pad_ufes_import_fixture(tmp_path):
    df, report = import_pad_ufes(FIXTURES / "pad_ufes" / "metadata.csv", _pad_images(tmp_path))
    assert accounted(df, report, 9)
    assert report.dropped == {"diagnostic not one of BCC/MEL/SCC/ACK/NEV/SEK (XYZ)": 1,
                              "image file missing": 1}
    assert df["label"].sum() == 4 and len(df) == 7
    by_dx = df.groupby("diagnostic")["label"].first().to_dict()
    assert by_dx == {"ACK": 0, "BCC": 1, "MEL": 1, "NEV": 0, "SCC": 1, "SEK": 0}
    # lesion numbers repeat across patients in PAD-UFES-20, so ids are patient-scoped
    assert df["lesion_id"].tolist()[:3] == ["PAT_9001_11", "PAT_9001_11", "PAT_9002_11"]
    assert df["fitzpatrick"].fillna("").tolist()[:4] == ["2", "2", "", "3"]
    assert Path(df.loc[df["patient_id"] == "PAT_9005", "image"].item()).suffix == ".jpg"
    assert {"region", "diagnostic", "age", "site", "itch", "bleed"} <= set(df.columns)
    assert "biopsed" not in df.columns  # true for every malignant image: never carried into a manifest
    first, third = df.iloc[0], df.iloc[2]
    assert (first["age"], first["sex"], first["site"], first["diameter_mm"], first["bleed"], first["hurt"]) == \
        (61.0, "male", "head_neck", 8.0, "yes", "no")
    assert third[["sex", "diameter_mm"]].isna().all() and third["site"] == "torso_back"
    assert set(df["domain"]) == {"pad_ufes_20"}


def test_pad_ufes_round_trips_through_the_manifest(tmp_path):
    df, _ = import_pad_ufes(FIXTURES / "pad_ufes" / "metadata.csv", _pad_images(tmp_path / "data"))
    back = read_manifest(write_manifest(df, tmp_path / "m.csv"))
    assert back["image"].tolist() == df["image"].tolist()
    assert back["fitzpatrick"].fillna("").tolist()[:4] == ["2", "2", "", "3"]
    assert back["lesion_id"].tolist() == df["lesion_id"].tolist()


def test_pad_ufes_missing_columns_are_named(tmp_path):
    bad = tmp_path / "metadata.csv"
    pd.DataFrame({"patient_id": ["P"], "img_id": ["a.png"]}).to_csv(bad, index=False)
    with pytest.raises(ManifestError, match="lesion_id, diagnostic"):
        import_pad_ufes(bad, tmp_path)


def test_pad_ufes_no_images_at_all_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="(?s)no usable images.*dropped 8: image file missing"):
        import_pad_ufes(FIXTURES / "pad_ufes" / "metadata.csv", tmp_path)


@pytest.mark.skipif(not (PAD_REAL / "metadata.csv").is_file(), reason="PAD-UFES-20 subset not present")
def test_pad_ufes_real_subset_matches_its_labels_csv():
    df, report = import_pad_ufes(PAD_REAL / "metadata.csv", PAD_REAL / "images")
    assert (len(df), int(df["label"].sum()), df["patient_id"].nunique()) == (518, 200, 407)
    assert report.dropped == {"image file missing": 2298 - 518}
    labels = pd.read_csv(PAD_REAL / "labels.csv", dtype=str).set_index("image")
    names = df["image"].map(lambda p: Path(p).name)
    assert set(names) == set(labels.index)
    assert (df["label"].to_numpy() == labels.loc[names, "label"].astype(int).to_numpy()).all()
    assert (df["patient_id"].to_numpy() == labels.loc[names, "patient_id"].to_numpy()).all()


# --- MRA-MIDAS -----------------------------------------------------------------------------------

MIDAS_ROWS = [  # (record, file, control, distance, location, path, fitzpatrick, length, width, on disk)
    (1, "r1_6in_b.jpg", "no", "6in", "left arm", "malignant- melanoma", "ii fair skin", 5, 4, True),
    (1, "r1_6in_a.jpg", "no", "6in", "left arm", "malignant- melanoma", "ii fair skin", 5, 4, True),
    (1, "r1_1ft.jpg", "no", "1ft", "left arm", "malignant- melanoma", "ii fair skin", 5, 4, True),
    (1, "r1_dscope.jpg", "no", "dscope", "left arm", "malignant- melanoma", "ii fair skin", 5, 4, True),
    (2, "r2_6in.jpg", "yes", "6in", "back", None, "iii", None, None, True),
    (3, "r3_6in.jpeg", "no", "6in", "cheek", "benign-melanocytic nevus", "vi dark", 3, 3, "r3_6in_cropped.jpg"),
    (4, "r4_6in.jpg", "no", "6in", "chest", "missing", "iv", 2, 2, True),
    (5, "r5_1ft.jpg", "no", "1ft", "neck", "benign-seborrheic keratosis", None, 7, 6, False),
    (6, "r6_virtual.jpg", "no", "n/a - virtual", "scalp", "benign-other", "I", 4, 4, True),
    (7, "r7_6in.jpg", "no", "6in", "shin", "malignant- bcc", "unknown", 9, 8, True),
    (8, "r8_6in.jpg", "no", "6in", "hand", "benign-melanocytic nevus", "V - brown", 1, 1, True),
    (8, "r8_1ft.jpg", "no", "1ft", "hand", "benign-melanocytic nevus", "V - brown", 1, 1, True),
]


@pytest.fixture
def midas(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for rec, name, control, dist, loc, path, fitz, length, width, on_disk in MIDAS_ROWS:
        rows.append({"midas_record_id": rec, "midas_file_name": name, "midas_iscontrol": control,
                     "midas_distance": dist, "midas_location": loc, "midas_path": path,
                     "midas_fitzpatrick": fitz, "length_(mm)": length, "width_(mm)": width,
                     "midas_age": 60, "midas_gender": "female"})
        if on_disk:
            make_image(images / (on_disk if isinstance(on_disk, str) else name), (40, 30))
    xlsx = tmp_path / "release_midas.xlsx"
    pd.DataFrame(rows).to_excel(xlsx, index=False)
    return xlsx, images


def test_midas_uncropped(midas):
    xlsx, images = midas
    df, report = import_midas(xlsx, images)
    assert accounted(df, report, len(MIDAS_ROWS))
    assert report.dropped == {"control image (normal skin)": 1, "dermoscopic image (dscope)": 1,
                              "midas_path neither malignant nor benign": 1, "image file missing": 1}
    names = [Path(p).name for p in df["image"]]
    assert names == ["r1_6in_b.jpg", "r1_6in_a.jpg", "r1_1ft.jpg", "r3_6in_cropped.jpg",
                     "r6_virtual.jpg", "r7_6in.jpg", "r8_6in.jpg", "r8_1ft.jpg"]
    assert df["label"].tolist() == [1, 1, 1, 0, 0, 1, 0, 0]
    assert df["patient_id"].tolist()[0] == "1"
    assert df["lesion_id"].nunique() == 5 and df["lesion_id"].iloc[0] == "1|left arm|5x4"
    assert df["fitzpatrick"].fillna("").tolist() == ["2", "2", "2", "6", "1", "", "5", "5"]
    assert df["distance"].tolist()[:3] == ["6in", "6in", "1ft"]
    assert set(df["domain"]) == {"midas"}
    assert df["site"].tolist()[:4] == ["upper_limb"] * 3 + ["head_neck"]  # "left arm", "cheek"
    assert (df["age"].iloc[0], df["sex"].iloc[0], df["diameter_mm"].iloc[0]) == (60.0, "female", 5.0)
    assert "pathology" in df and "pathology" not in __import__("core.context").context.CONTEXT_COLUMNS


def test_midas_one_per_lesion_keeps_the_closest_image(midas):
    df, report = import_midas(*midas, one_per_lesion=True)
    assert accounted(df, report, len(MIDAS_ROWS))
    assert [Path(p).name for p in df["image"]] == ["r1_6in_a.jpg", "r3_6in_cropped.jpg",
                                                   "r6_virtual.jpg", "r7_6in.jpg", "r8_6in.jpg"]
    assert report.dropped["duplicate image of a lesion (one per lesion kept)"] == 3


def test_midas_cropped_subset(midas, tmp_path):
    xlsx, images = midas
    crops = tmp_path / "crops.csv"
    box = {"left": 2, "top": 3, "width": 20, "height": 15}
    for name in ("r1_6in_a.jpg", "r1_6in_b.jpg", "r3_6in_cropped.jpg"):
        upsert_crop(crops, name, box)
    upsert_crop(crops, "r7_6in.jpg", None, unusable=True, note="blurry")
    upsert_crop(crops, "r1_1ft.jpg", box)  # ignored: 1ft is farther than 6in
    df, report = import_midas(xlsx, images)
    cropped, crep = midas_cropped(df, report, read_crops(crops))
    assert accounted(cropped, crep, len(MIDAS_ROWS))
    assert [Path(p).name for p in cropped["image"]] == ["r1_6in_a.jpg", "r3_6in_cropped.jpg"]
    assert cropped[["crop_left", "crop_top", "crop_width", "crop_height"]].iloc[0].tolist() == [2, 3, 20, 15]
    assert crep.dropped["taken farther than 6 in (or distance unknown)"] == 3
    assert crep.dropped["marked unusable in the crop file"] == 1
    assert crep.dropped["no crop box"] == 1
    assert crep.dropped["duplicate image of a lesion (one per lesion kept)"] == 1
    every, _ = midas_cropped(df, report, read_crops(crops), one_per_lesion=False)
    assert len(every) == 3


def test_midas_cropped_box_outside_image_is_an_error(midas, tmp_path):
    crops = tmp_path / "crops.csv"
    upsert_crop(crops, "r3_6in_cropped.jpg", {"left": 30, "top": 0, "width": 20, "height": 10})
    df, report = import_midas(*midas)
    with pytest.raises(ManifestError, match="r3_6in_cropped.jpg.*outside"):
        midas_cropped(df, report, read_crops(crops))


def test_midas_missing_columns_are_named(tmp_path):
    xlsx = tmp_path / "release_midas.xlsx"
    pd.DataFrame({"midas_record_id": [1], "midas_file_name": ["a.jpg"]}).to_excel(xlsx, index=False)
    with pytest.raises(ManifestError, match="midas_iscontrol, midas_distance, midas_location, midas_path"):
        import_midas(xlsx, tmp_path)


def test_midas_not_an_xlsx(tmp_path):
    bad = tmp_path / "release_midas.xlsx"
    bad.write_text("not a spreadsheet")
    with pytest.raises(ManifestError, match="not a readable .xlsx"):
        import_midas(bad, tmp_path)


def test_keep_one_per_lesion_is_deterministic():
    df = pd.DataFrame({"image": ["/x/b.jpg", "/x/a.jpg", "/x/c.jpg"], "label": [1, 1, 0],
                       "lesion_id": ["L1", "L1", "L2"], "distance_in": [6.0, 6.0, None]})
    kept, report = keep_one_per_lesion(df, ImportReport(kept=3))
    assert kept["image"].tolist() == ["/x/a.jpg", "/x/c.jpg"]
    kept2, _ = keep_one_per_lesion(df.iloc[::-1].reset_index(drop=True), ImportReport(kept=3))
    assert sorted(kept2["image"]) == ["/x/a.jpg", "/x/c.jpg"]
