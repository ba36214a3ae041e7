"""Importers mapping the named public datasets (ISIC Archive, MRA-MIDAS, PAD-UFES-20) onto the manifest."""
from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

import pandas as pd

from core.context import ContextError, normalise
from core.manifest import ImportReport, ManifestError, finish_import, read_text_csv, require_columns

# Used only when core.images (the project's loader) is not importable.
_FALLBACK_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".heic", ".heif")

# The paper trained on clinical (non-dermoscopic) photos; isic-cli's search DSL takes quoted values and OR.
ISIC_CLINICAL_QUERY = 'image_type:"clinical: close-up" OR image_type:"clinical: overview"'
# Kept as-is; the licence and attribution travel with each image because ISIC licences differ per image.
ISIC_KEEP = ("isic_id", "patient_id", "lesion_id", "image_type", "copyright_license", "attribution")
PAD_LABELS = {"BCC": 1, "MEL": 1, "SCC": 1, "ACK": 0, "NEV": 0, "SEK": 0}
MIDAS_REQUIRED = ("midas_record_id", "midas_file_name", "midas_iscontrol", "midas_distance",
                  "midas_location", "midas_path")
# MIDAS photographs each lesion at fixed distances; dermoscopic images ("dscope") are not smartphone-like.
MIDAS_DISTANCE_IN = {"6in": 6.0, "1ft": 12.0}
MIDAS_CROP_MAX_IN = 6.0
DUPLICATE = "duplicate image of a lesion (one per lesion kept)"
MISSING = "image file missing"

_ROMAN = {"i": "1", "ii": "2", "iii": "3", "iv": "4", "v": "5", "vi": "6"}
_ROMAN_LEAD = re.compile(r"^\s*(vi|iv|v|iii|ii|i)(?![a-z])", re.IGNORECASE)


def isic_download_command(out_dir: str | Path, *, limit: int | None = None,
                          search: str = ISIC_CLINICAL_QUERY, executable: str = "isic") -> list[str]:
    """The official isic-cli command that downloads images plus metadata.csv into out_dir."""
    cmd = [executable, "image", "download", "--search", search]
    if limit:
        cmd += ["--limit", str(int(limit))]
    return cmd + [str(out_dir)]


def parse_fitzpatrick(value) -> str | None:
    """'3', '3.0', 'III', 'iii fair skin' -> '3'; anything else (blank, free text) -> None."""
    if value is None or pd.isna(value):
        return None
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        m = _ROMAN_LEAD.match(text)
        return _ROMAN[m.group(1).lower()] if m else None
    return str(int(number)) if number.is_integer() and 1 <= number <= 6 else None


def fitzpatrick_roman(value) -> str | None:
    """A Fitzpatrick type in the clinic's spelling: 2, '2.0', 'II' -> 'II'; None when it is not a type 1-6."""
    number = parse_fitzpatrick(value)
    return None if number is None else ("I", "II", "III", "IV", "V", "VI")[int(number) - 1]


class ImageIndex:
    """Find an image file by name in a folder tree, tolerating a changed suffix or MIDAS's `_cropped` names."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ManifestError(f"{self.folder}: image folder not found")
        suffixes = _supported_suffixes()
        self.by_name: dict[str, Path] = {}
        self.by_stem: dict[str, list[Path]] = defaultdict(list)
        for root, dirs, files in os.walk(self.folder):
            dirs.sort()  # deterministic choice when a name occurs twice
            for name in sorted(files):
                path = Path(root) / name
                self.by_name.setdefault(name, path)
                if path.suffix.lower() in suffixes:
                    self.by_stem[path.stem.lower()].append(path)

    def find(self, name) -> Path | None:
        if name is None or pd.isna(name) or not str(name).strip():
            return None
        name = os.path.basename(str(name).strip())
        if name in self.by_name:
            return self.by_name[name].resolve()
        stem = Path(name).stem.lower()
        for key in (stem, f"{stem}_cropped"):
            if len(self.by_stem.get(key, ())) == 1:  # ambiguous stems are not guessed
                return self.by_stem[key][0].resolve()
        return None


def import_isic(metadata_csv: str | Path, images: str | Path, *,
                domain: str | None = "isic") -> tuple[pd.DataFrame, ImportReport]:
    """Import an isic-cli download (metadata.csv + <isic_id>.JPG files)."""
    src = read_text_csv(metadata_csv, "ISIC metadata")
    label_col = next((c for c in ("diagnosis_1", "benign_malignant") if c in src.columns), None)
    require_columns(src, ("isic_id", label_col or "diagnosis_1 (or legacy benign_malignant)"),
                    str(metadata_csv))
    index, report, rows = ImageIndex(images), ImportReport(), []
    for r in src.to_dict("records"):
        label, reason = _isic_label(r)
        if label is None:
            report.drop(reason, what=str(r["isic_id"]))
            continue
        path = index.find(f"{r['isic_id']}.JPG")
        if path is None:
            report.drop(MISSING, what=f"{r['isic_id']}.JPG")
            continue
        row = {"image": str(path), "label": label, "domain": domain,
               "fitzpatrick": parse_fitzpatrick(r.get("fitzpatrick_skin_type"))}
        row.update({c: r[c] for c in ISIC_KEEP if c in r})
        row.update(isic_context(r))
        rows.append(row)
    return finish_import(rows, report, str(metadata_csv))


def _isic_label(r: dict) -> tuple[int | None, str]:
    """diagnosis_1 (current archive) wins; older downloads only have benign_malignant."""
    dx = _text(r.get("diagnosis_1")).lower()
    if dx in ("benign", "malignant"):
        return int(dx == "malignant"), ""
    if dx:
        return None, f"diagnosis_1 not Benign/Malignant ({dx.capitalize()})"
    bm = _text(r.get("benign_malignant")).lower()
    if bm in ("benign", "malignant"):
        return int(bm == "malignant"), ""
    if bm.startswith("indeterminate"):
        return None, "benign_malignant indeterminate"
    return None, "no benign/malignant diagnosis"


def import_pad_ufes(metadata_csv: str | Path, images: str | Path, *,
                    domain: str | None = "pad_ufes_20") -> tuple[pd.DataFrame, ImportReport]:
    """Import PAD-UFES-20 (metadata.csv + images named by img_id; missing files are counted, not fatal)."""
    src = read_text_csv(metadata_csv, "PAD-UFES-20 metadata")
    require_columns(src, ("patient_id", "lesion_id", "diagnostic", "img_id"), str(metadata_csv))
    index, report, rows = ImageIndex(images), ImportReport(), []
    for r in src.to_dict("records"):
        dx = _text(r["diagnostic"]).upper()
        if dx not in PAD_LABELS:
            report.drop(f"diagnostic not one of {'/'.join(PAD_LABELS)} ({dx or 'blank'})", what=str(r["img_id"]))
            continue
        path = index.find(r["img_id"])
        if path is None:
            report.drop(MISSING, what=str(r["img_id"]))
            continue
        rows.append({
            "image": str(path), "label": PAD_LABELS[dx], "patient_id": r["patient_id"],
            # PAD lesion numbers repeat across patients, so the id is scoped to the patient.
            "lesion_id": f"{r['patient_id']}_{r['lesion_id']}", "domain": domain,
            "fitzpatrick": parse_fitzpatrick(r.get("fitspatrick", r.get("fitzpatrick"))),
            # `biopsed` is left out by name: it is True for every malignant image (core.context.LEAK_COLUMNS).
            "region": r.get("region"), "diagnostic": dx, **pad_context(r)})
    return finish_import(rows, report, str(metadata_csv))


def import_midas(xlsx: str | Path, images: str | Path, *, domain: str | None = "midas",
                 one_per_lesion: bool = False) -> tuple[pd.DataFrame, ImportReport]:
    """Import MRA-MIDAS release_midas.xlsx: non-control, non-dermoscopic, biopsy-labelled images."""
    src = _read_xlsx(xlsx)
    require_columns(src, MIDAS_REQUIRED, str(xlsx))
    index, report, rows = ImageIndex(images), ImportReport(), []
    for r in src.to_dict("records"):
        name = _text(r["midas_file_name"])
        distance = _text(r["midas_distance"]).lower()
        path_text = _text(r["midas_path"]).lower()
        if _text(r["midas_iscontrol"]).lower() in ("yes", "true", "1", "y"):
            report.drop("control image (normal skin)", what=name)
            continue
        if distance == "dscope":
            report.drop("dermoscopic image (dscope)", what=name)
            continue
        if not path_text.startswith(("malignant", "benign")):
            report.drop("midas_path neither malignant nor benign", what=name)
            continue
        path = index.find(r["midas_file_name"])
        if path is None:
            report.drop(MISSING, what=name)
            continue
        rows.append({
            "image": str(path), "label": int(path_text.startswith("malignant")),
            "patient_id": _text(r["midas_record_id"]), "lesion_id": _midas_lesion_id(r),
            "domain": domain, "fitzpatrick": parse_fitzpatrick(r.get("midas_fitzpatrick")),
            "distance": distance, "distance_in": MIDAS_DISTANCE_IN.get(distance),
            "location": _text(r["midas_location"]), "pathology": _text(r["midas_path"]), **midas_context(r)})
    df, report = finish_import(rows, report, str(xlsx))
    return keep_one_per_lesion(df, report) if one_per_lesion else (df, report)


def pad_context(r: dict) -> dict:
    """PAD-UFES-20 anamnesis -> the stable context columns (UNK answers become 'unknown', blanks missing)."""
    out = {"age": _answer("age", r.get("age")), "sex": _answer("sex", r.get("gender")),
           "site": _answer("site", r.get("region")),
           "diameter_mm": _largest(r.get("diameter_1"), r.get("diameter_2"))}
    out.update({q: _answer(q, r.get(q)) for q in ("itch", "grew", "hurt", "changed", "bleed", "elevation")})
    return out


def isic_context(r: dict) -> dict:
    """ISIC metadata (age_approx, sex, anatom_site_general, clin_size_long_diam_mm) -> context columns."""
    site = r.get("anatom_site_general", r.get("anatom_site_general_challenge"))
    return {"age": _answer("age", r.get("age_approx")), "sex": _answer("sex", r.get("sex")),
            "site": _answer("site", site), "diameter_mm": _answer("diameter_mm", r.get("clin_size_long_diam_mm"))}


def midas_context(r: dict) -> dict:
    """MIDAS (midas_age, midas_gender, midas_location, length/width in mm) -> context columns."""
    return {"age": _answer("age", r.get("midas_age")), "sex": _answer("sex", r.get("midas_gender")),
            "site": _answer("site", r.get("midas_location")),
            "diameter_mm": _largest(r.get("length_(mm)"), r.get("width_(mm)"))}


def _answer(name: str, value):
    """A source's answer in canonical form; a value outside the field's range or levels counts as missing."""
    try:
        return normalise(name, value)
    except ContextError:
        return None


def _largest(*values):
    sizes = [v for v in (_answer("diameter_mm", x) for x in values) if v is not None]
    return max(sizes) if sizes else None


def midas_cropped(df: pd.DataFrame, report: ImportReport, crops: pd.DataFrame, *,
                  one_per_lesion: bool = True, validate_sizes: bool = True
                  ) -> tuple[pd.DataFrame, ImportReport]:
    """The paper's cropped subset: images taken at <= 6 in, with a usable crop box, one per lesion."""
    from core.cropbox import apply_crops
    out = report.carried()
    near = df["distance_in"].le(MIDAS_CROP_MAX_IN)  # unknown distances (virtual visits) are not near
    out.drop("taken farther than 6 in (or distance unknown)", what=df.loc[~near, "image"].tolist())
    cropped, crop_report = apply_crops(df[near].reset_index(drop=True), crops,
                                       validate_sizes=validate_sizes)
    for reason, n in crop_report.dropped.items():
        out.drop(reason, n, what=[w for w, why in crop_report.named if why == reason])
    out.kept = len(cropped)
    if not len(cropped):
        raise ManifestError(f"MIDAS cropped subset is empty ({out.summary()})")
    # Dedupe after cropping so an unusable duplicate never costs the lesion its usable image.
    return keep_one_per_lesion(cropped, out) if one_per_lesion else (cropped, out)


def keep_one_per_lesion(df: pd.DataFrame, report: ImportReport) -> tuple[pd.DataFrame, ImportReport]:
    """Keep the closest-distance image of each lesion (ties: file name), counting the others as dropped."""
    order = df.assign(_d=df["distance_in"].fillna(float("inf")), _n=df["image"].map(os.path.basename))
    order = order.sort_values(["lesion_id", "_d", "_n"], kind="stable")
    first = ~order.duplicated("lesion_id", keep="first")
    kept = order[first].drop(columns=["_d", "_n"]).sort_index().reset_index(drop=True)
    out = report.carried(kept=len(kept))
    out.drop(DUPLICATE, what=order.loc[~first, "image"].tolist())
    return kept, out


def _midas_lesion_id(r: dict) -> str:
    """MIDAS has no lesion id; record + location + size identifies a lesion (its 6in/1ft/dscope photos)."""
    size = "x".join(_size(r.get(c)) for c in ("length_(mm)", "width_(mm)"))
    location = re.sub(r"\s+", " ", _text(r["midas_location"]).lower())
    return f"{_text(r['midas_record_id'])}|{location}|{size}"


def _size(value) -> str:
    text = _text(value)
    try:
        return f"{float(text):g}"
    except ValueError:
        return text or "na"


def _text(value) -> str:
    return "" if value is None or pd.isna(value) else str(value).strip()


def _supported_suffixes() -> set[str]:
    try:
        from core.images import SUPPORTED_SUFFIXES
    except ImportError:
        SUPPORTED_SUFFIXES = _FALLBACK_SUFFIXES
    return {s.lower() for s in SUPPORTED_SUFFIXES}


def _read_xlsx(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: MIDAS spreadsheet not found")
    try:
        return pd.read_excel(path, dtype=str)
    except (ValueError, OSError, KeyError) as e:  # openpyxl raises these for non-xlsx content
        raise ManifestError(f"{path}: not a readable .xlsx file ({e})") from e
