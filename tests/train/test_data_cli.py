"""Tests for the `python -m train.data` importer subcommands (the ISIC tool is faked; no network)."""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from core.cropbox import upsert_crop
from core.manifest import crop_of, read_manifest
from train.data import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CLINICAL = 'image_type:"clinical: close-up" OR image_type:"clinical: overview"'


def make_image(path: Path, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 60, 40)).save(path)
    return path


def isic_download_folder(out: Path) -> Path:
    """What isic-cli leaves behind: metadata.csv and <isic_id>.JPG files."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / "isic" / "metadata.csv", out / "metadata.csv")
    for i in range(1, 7):
        make_image(out / f"ISIC_900000{i}.JPG")
    return out


def fake_isic(bin_dir: Path, exit_code: int = 0) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "isic"
    exe.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{bin_dir}/args.txt"\nexit {exit_code}\n')
    exe.chmod(0o755)
    return exe


# --- isic-download -------------------------------------------------------------------------------

def test_isic_download_prints_the_command(tmp_path, capsys):
    assert main(["isic-download", "--out", str(tmp_path / "isic"), "--limit", "50"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert shlex.split(lines[0]) == ["isic", "image", "download", "--search", CLINICAL, "--limit", "50",
                                     str(tmp_path / "isic")]
    assert "train.data isic --metadata" in lines[1]
    assert not (tmp_path / "isic").exists()  # printing downloads nothing


def test_a_printed_command_is_quoted_for_the_users_shell():
    """shlex quoting ('...') is not read by cmd.exe or PowerShell: Windows gets double quotes."""
    from train.data import shell_line
    cmd = ["isic", "image", "download", "--search", CLINICAL, "C:\\data\\my isic"]
    assert shlex.split(shell_line(cmd, windows=False)) == cmd
    assert shell_line(cmd, windows=True) == ('isic image download --search "image_type:\\"clinical: close-up\\" OR '
                                             'image_type:\\"clinical: overview\\"" "C:\\data\\my isic"')


def test_isic_download_run_without_the_tool_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["isic-download", "--out", str(tmp_path / "isic"), "--run"]) == 2
    err = capsys.readouterr().err
    assert "`isic` not found on PATH" in err and "pip install isic-cli" in err


def test_isic_download_run_failure_is_a_clear_error(tmp_path, capsys, monkeypatch):
    fake_isic(tmp_path / "bin", exit_code=1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert main(["isic-download", "--out", str(tmp_path / "isic"), "--run"]) == 2
    err = capsys.readouterr().err
    assert "failed (exit 1)" in err and "network" in err and "pip install -U isic-cli" in err


def test_isic_download_run_executes_then_imports(tmp_path, capsys, monkeypatch):
    fake_isic(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    out = isic_download_folder(tmp_path / "isic")  # as if the fake had downloaded it
    assert main(["isic-download", "--out", str(out), "--limit", "7", "--run"]) == 0
    args = (tmp_path / "bin" / "args.txt").read_text().splitlines()
    assert args == ["image", "download", "--search", CLINICAL, "--limit", "7", str(out)]
    df = read_manifest(out / "manifest.csv")
    assert len(df) == 4 and set(df["domain"]) == {"isic"}
    assert "dropped: diagnosis_1 not Benign/Malignant (Indeterminate)" in capsys.readouterr().out


# --- isic / pad-ufes -----------------------------------------------------------------------------

def test_isic_import_writes_manifest_and_summary(tmp_path, capsys):
    out = isic_download_folder(tmp_path / "dl")
    rc = main(["isic", "--metadata", str(out / "metadata.csv"), "--images", str(out),
               "--out", str(tmp_path / "m.csv"), "--domain", "isic_clinical"])
    assert rc == 0
    df = read_manifest(tmp_path / "m.csv")
    assert df["label"].tolist() == [1, 0, 0, 1] and set(df["domain"]) == {"isic_clinical"}
    assert {"isic_id", "image_type", "copyright_license", "attribution"} <= set(df.columns)
    table = capsys.readouterr().out
    assert "kept" in table and "2 malignant, 2 benign" in table
    assert "dropped: image file missing" in table and "total rows" in table


def test_pad_ufes_cli(tmp_path, capsys):
    meta = pd.read_csv(FIXTURES / "pad_ufes" / "metadata.csv", dtype=str)
    for img in meta["img_id"][:3]:
        make_image(tmp_path / "images" / img)
    rc = main(["pad-ufes", "--metadata", str(FIXTURES / "pad_ufes" / "metadata.csv"),
               "--images", str(tmp_path / "images"), "--out", str(tmp_path / "m.csv")])
    assert rc == 0
    df = read_manifest(tmp_path / "m.csv")
    assert len(df) == 3 and set(df["domain"]) == {"pad_ufes_20"}
    out = capsys.readouterr().out
    assert re.search(r"dropped: image file missing\s+5\n", out)
    assert re.search(r"dropped: diagnostic not one of .*\(XYZ\)\s+1", out)
    named = pd.read_csv(tmp_path / "m.dropped.csv")  # which five files, and which row's diagnostic
    assert f"named, with its reason, in {tmp_path / 'm.dropped.csv'}" in out
    assert sorted(named["reason"].value_counts().items()) == [
        ("diagnostic not one of BCC/MEL/SCC/ACK/NEV/SEK (XYZ)", 1), ("image file missing", 5)]
    assert set(named.loc[named["reason"] == "image file missing", "dropped"]) == set(meta["img_id"][3:]) - set(
        named.loc[named["reason"] != "image file missing", "dropped"])
    # the first three fixture rows: sex and diameter are blank for the one non-biopsied lesion
    assert "context answers missing (of 3): age 0, sex 1, site 0" in out and "diameter_mm 1" in out
    assert "biopsed" not in df.columns


def test_missing_columns_exit_2_naming_them(tmp_path, capsys):
    bad = tmp_path / "metadata.csv"
    pd.DataFrame({"patient_id": ["P"], "img_id": ["a.png"]}).to_csv(bad, index=False)
    rc = main(["pad-ufes", "--metadata", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "m.csv")])
    assert rc == 2
    assert "missing required column(s) lesion_id, diagnostic" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()


# --- midas ---------------------------------------------------------------------------------------

@pytest.fixture
def midas(tmp_path):
    rows = [  # record, file, control, distance, location, path
        ("1", "a6.jpg", "no", "6in", "arm", "malignant- melanoma"),
        ("1", "a12.jpg", "no", "1ft", "arm", "malignant- melanoma"),
        ("1", "ad.jpg", "no", "dscope", "arm", "malignant- melanoma"),
        ("2", "b6.jpg", "no", "6in", "leg", "benign-melanocytic nevus"),
        ("2", "b12.jpg", "no", "1ft", "leg", "benign-melanocytic nevus"),
        ("3", "c6.jpg", "yes", "6in", "back", None),
    ]
    df = pd.DataFrame(rows, columns=["midas_record_id", "midas_file_name", "midas_iscontrol",
                                     "midas_distance", "midas_location", "midas_path"])
    df["midas_fitzpatrick"] = "ii"
    df["length_(mm)"], df["width_(mm)"] = 4, 3
    df.to_excel(tmp_path / "release_midas.xlsx", index=False)
    for name in df["midas_file_name"]:
        make_image(tmp_path / "images" / name)
    upsert_crop(tmp_path / "crops.csv", "a6.jpg", {"left": 1, "top": 2, "width": 30, "height": 20})
    upsert_crop(tmp_path / "crops.csv", "b6.jpg", None, unusable=True, note="blurry")
    return tmp_path


def _midas_args(root: Path, *extra) -> list[str]:
    return ["midas", "--xlsx", str(root / "release_midas.xlsx"), "--images", str(root / "images"),
            "--out", str(root / "m.csv"), *extra]


def test_midas_cli_uncropped_and_cropped(midas, capsys):
    rc = main(_midas_args(midas, "--crops", str(midas / "crops.csv"), "--cropped-out", str(midas / "c.csv")))
    assert rc == 0
    full = read_manifest(midas / "m.csv")
    assert [Path(p).name for p in full["image"]] == ["a6.jpg", "a12.jpg", "b6.jpg", "b12.jpg"]
    cropped = read_manifest(midas / "c.csv")
    assert [Path(p).name for p in cropped["image"]] == ["a6.jpg"]
    assert crop_of(cropped.iloc[0]) == {"left": 1, "top": 2, "width": 30, "height": 20}
    out = capsys.readouterr().out
    assert "dropped: marked unusable in the crop file" in out
    assert "dropped: taken farther than 6 in" in out and "dropped: control image" in out
    # the cropped subset's list carries the full import's drops and its own, each file named
    named = pd.read_csv(midas / "c.dropped.csv")
    assert set(named["reason"]) >= {"marked unusable in the crop file", "control image (normal skin)"}
    assert named["dropped"].map(lambda p: Path(p).name).isin(["a12.jpg", "b6.jpg", "b12.jpg"]).sum() == 3


def test_midas_cli_one_per_lesion_flag(midas):
    assert main(_midas_args(midas, "--one-per-lesion")) == 0
    assert [Path(p).name for p in read_manifest(midas / "m.csv")["image"]] == ["a6.jpg", "b6.jpg"]


def test_a_lesions_closest_photo_that_does_not_decode_leaves_it_its_other_photo(midas, capsys):
    """Photos were decoded after one per lesion was picked: an empty closest photo cost its lesion the good one."""
    (midas / "images" / "a6.jpg").write_bytes(b"")
    assert main(_midas_args(midas, "--one-per-lesion")) == 0
    assert [Path(p).name for p in read_manifest(midas / "m.csv")["image"]] == ["a12.jpg", "b6.jpg"]
    assert "not a usable image (empty)" in capsys.readouterr().out


def test_midas_cli_crops_needs_cropped_out(midas, capsys):
    assert main(_midas_args(midas, "--crops", str(midas / "crops.csv"))) == 2
    assert "--crops and --cropped-out go together" in capsys.readouterr().err


# --- crops ---------------------------------------------------------------------------------------

def test_crops_cli(tmp_path, capsys):
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        make_image(tmp_path / "img" / name)
    pd.DataFrame({"image": ["img/x.jpg", "img/y.jpg", "img/z.jpg"], "label": [1, 0, 1]}).to_csv(
        tmp_path / "m.csv", index=False)
    upsert_crop(tmp_path / "crops.csv", "img/x.jpg", {"left": 0, "top": 0, "width": 10, "height": 10})
    upsert_crop(tmp_path / "crops.csv", "y.jpg", None, unusable=True)
    rc = main(["crops", "--manifest", str(tmp_path / "m.csv"), "--crops", str(tmp_path / "crops.csv"),
               "--out", str(tmp_path / "c.csv")])
    assert rc == 0
    df = read_manifest(tmp_path / "c.csv")
    assert [Path(p).name for p in df["image"]] == ["x.jpg"] and crop_of(df.iloc[0])["width"] == 10
    out = capsys.readouterr().out
    assert "dropped: no crop box" in out and "dropped: marked unusable in the crop file" in out


def test_crops_cli_box_outside_image(tmp_path, capsys):
    make_image(tmp_path / "x.jpg")
    pd.DataFrame({"image": ["x.jpg"], "label": [1]}).to_csv(tmp_path / "m.csv", index=False)
    upsert_crop(tmp_path / "crops.csv", "x.jpg", {"left": 0, "top": 0, "width": 41, "height": 10})
    rc = main(["crops", "--manifest", str(tmp_path / "m.csv"), "--crops", str(tmp_path / "crops.csv"),
               "--out", str(tmp_path / "c.csv")])
    assert rc == 2 and "outside the 40x30 image" in capsys.readouterr().err


def test_folder_and_csv_still_work(tmp_path, capsys):
    make_image(tmp_path / "root" / "benign" / "a.jpg")
    make_image(tmp_path / "root" / "malignant" / "b.png")
    assert main(["folder", str(tmp_path / "root"), "--out", str(tmp_path / "f.csv")]) == 0
    assert read_manifest(tmp_path / "f.csv")["label"].tolist() == [0, 1]
    pd.DataFrame({"image": ["benign/a.jpg"], "label": ["benign"]}).to_csv(tmp_path / "l.csv", index=False)
    assert main(["csv", str(tmp_path / "l.csv"), "--images", str(tmp_path / "root"),
                 "--out", str(tmp_path / "c.csv")]) == 0
    assert "kept" in capsys.readouterr().out


def test_the_readmes_pad_layout_feeds_every_shared_demo_recipe(tmp_path):
    """The README's route for users outside this workplace: PAD-UFES-20 as downloaded (metadata.csv, images in
    sub-folders) under DIR/pad_ufes_20_subset/, imported to labels.csv beside it, then --data-root DIR. Each
    shared_demo recipe (the csv ones read labels.csv, the context ones metadata.csv) then finds every photo."""
    from core import training
    from core.config import run_config_from_dict
    from train import fit
    pad = tmp_path / "outside" / "pad_ufes_20_subset"
    pad.mkdir(parents=True)
    shutil.copy(FIXTURES / "pad_ufes" / "metadata.csv", pad / "metadata.csv")
    meta = pd.read_csv(pad / "metadata.csv", dtype=str)
    usable = meta[meta["diagnostic"] != "XYZ"]
    for i, img in enumerate(usable["img_id"]):
        make_image(pad / "images" / f"imgs_part_{i % 2 + 1}" / img)
    assert main(["pad-ufes", "--metadata", str(pad / "metadata.csv"), "--images", str(pad / "images"),
                 "--out", str(pad / "labels.csv")]) == 0
    recipes = sorted(p for p in Path("train/configs").glob("shared_demo*.yaml") if "isic" not in p.name)
    assert len(recipes) == 4
    for recipe in recipes:
        args = fit.build_parser().parse_args(["--config", str(recipe), "--data-root", str(tmp_path / "outside")])
        _, union = training.stage_rows(run_config_from_dict(fit.load_raw(args)))
        assert sorted(Path(p).name for p in union["image"]) == sorted(usable["img_id"]), recipe.name
        assert sorted(union["patient_id"]) == sorted(usable["patient_id"]), recipe.name


def test_an_output_that_would_replace_an_input_or_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    """`--out` on the labels CSV replaced the user's own table (diagnoses and dropped rows gone), and `--out` on a
    folder failed with a traceback after the import's work."""
    make_image(tmp_path / "root" / "benign" / "a.jpg")
    make_image(tmp_path / "root" / "malignant" / "b.jpg")
    labels = tmp_path / "l.csv"
    pd.DataFrame({"image": ["benign/a.jpg"], "label": ["benign"], "diagnosis": ["NEV"]}).to_csv(labels, index=False)
    before = labels.read_bytes()
    assert main(["csv", str(labels), "--images", str(tmp_path / "root"), "--out", str(labels)]) == 2
    assert f"{labels}: is an input of this command ({labels})" in capsys.readouterr().err
    assert labels.read_bytes() == before
    assert main(["csv", str(labels), "--images", str(tmp_path / "root"), "--out", str(tmp_path / "root")]) == 2
    assert "is a folder; give the name of the file to write" in capsys.readouterr().err
    photo = tmp_path / "root" / "benign" / "a.jpg"
    photo_bytes = photo.read_bytes()
    assert main(["folder", str(tmp_path / "root"), "--out", str(photo)]) == 2  # a photo the import lists
    assert "is an input of this command" in capsys.readouterr().err and photo.read_bytes() == photo_bytes


def test_a_crop_file_that_is_not_there_is_named_not_taken_for_an_empty_one(tmp_path, capsys):
    make_image(tmp_path / "x.jpg")
    pd.DataFrame({"image": ["x.jpg"], "label": [1]}).to_csv(tmp_path / "m.csv", index=False)
    rc = main(["crops", "--manifest", str(tmp_path / "m.csv"), "--crops", str(tmp_path / "typo.csv"),
               "--out", str(tmp_path / "c.csv")])
    assert rc == 2 and f"{tmp_path / 'typo.csv'}: crop-box file not found" in capsys.readouterr().err


def test_csv_import_keeps_only_photos_that_decode_and_names_the_others(tmp_path, capsys):
    """It checked only that a file existed: an empty .jpg, a text file named .png and a cut JPEG were 'kept'."""
    make_image(tmp_path / "img" / "good.jpg")
    make_image(tmp_path / "img" / "other.jpg")
    (tmp_path / "img" / "zero.jpg").write_bytes(b"")
    (tmp_path / "img" / "text.png").write_text("not a photo")
    whole = (tmp_path / "img" / "other.jpg").read_bytes()
    (tmp_path / "img" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    pd.DataFrame({"image": ["good.jpg", "zero.jpg", "text.png", "cut.jpg"], "label": [1, 0, 1, 0]}).to_csv(
        tmp_path / "l.csv", index=False)
    assert main(["csv", str(tmp_path / "l.csv"), "--images", str(tmp_path / "img"),
                 "--out", str(tmp_path / "m.csv")]) == 0
    assert [Path(p).name for p in read_manifest(tmp_path / "m.csv")["image"]] == ["good.jpg"]
    out = capsys.readouterr().out
    assert re.search(r"kept\s+1\b", out) and "not a usable image (empty)" in out
    assert "not a usable image (not_an_image)" in out and "not a usable image (corrupt)" in out
    named = pd.read_csv(tmp_path / "m.dropped.csv")
    assert sorted(Path(w.split(":")[0]).name for w in named["dropped"]) == ["cut.jpg", "text.png", "zero.jpg"]
