"""The one manifest CSV format every dataset is mapped onto, with its reader, writer and generic importers."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from core.fileio import native_path, portable_path

REQUIRED = ("image", "label")
OPTIONAL = ("patient_id", "lesion_id", "domain", "fitzpatrick",
            "crop_left", "crop_top", "crop_width", "crop_height", "split")
CROP_COLUMNS = ("crop_left", "crop_top", "crop_width", "crop_height")
SPLITS = ("train", "val", "test")
# Values accepted for the label column: the importer maps these onto 1 malignant / 0 benign.
LABEL_WORDS = {"1": 1, "0": 0, "malignant": 1, "benign": 0, "true": 1, "false": 0,
               "1.0": 1, "0.0": 0, "yes": 1, "no": 0}


class ManifestError(ValueError):
    """A manifest or labelled CSV that cannot be used, with the reason."""


@dataclass
class ImportReport:
    """What an importer kept and what it dropped, per reason, and which files or rows it dropped (nothing is
    dropped silently; `write_named` puts the names beside the manifest)."""
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    named: list[tuple[str, str]] = field(default_factory=list)  # (file or row, reason)

    def drop(self, reason: str, n: int | None = None, what: str | list | None = None) -> None:
        """Count a drop: one item named by `what` (a file or row), several (a list), or n unnamed ones."""
        items = [] if what is None else [what] if isinstance(what, str) else [str(w) for w in what]
        n = n if n is not None else max(len(items), 1 if what is None else 0)
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n
            self.named += [(item, reason) for item in items]

    def carried(self, kept: int = 0) -> "ImportReport":
        """A copy to add a later step's drops to (the earlier steps' counts and names kept)."""
        return ImportReport(kept=kept, dropped=dict(self.dropped), named=list(self.named))

    def write_named(self, manifest_path: str | Path) -> Path | None:
        """The dropped files and rows with their reasons, as <manifest>.dropped.csv beside the manifest (None and
        any older list removed when nothing named was dropped)."""
        path = Path(manifest_path)
        path = path.with_name(path.stem + ".dropped.csv")
        if not self.named:
            path.unlink(missing_ok=True)
            return None
        from core.fileio import atomic_write
        table = pd.DataFrame(self.named, columns=["dropped", "reason"])
        return atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))

    def summary(self, df: pd.DataFrame | None = None) -> str:
        lines = [f"kept {self.kept} images"]
        if df is not None and len(df):
            pos = int(df["label"].sum())
            lines[0] += f" ({pos} malignant, {len(df) - pos} benign)"
            if "patient_id" in df and df["patient_id"].notna().any():
                lines.append(f"patients: {df['patient_id'].nunique()}")
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"dropped {n}: {reason}")
        return "\n".join(lines)


def require_columns(df: pd.DataFrame, columns, source: str) -> None:
    """Raise a ManifestError naming every missing column (and what is there instead)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        only = str(df.columns[0]) if len(df.columns) == 1 else ""
        sep = next((name for c, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")) if c in only), None)
        hint = f" (the file seems to separate columns with {sep}: save it comma-separated)" if sep else ""
        raise ManifestError(f"{source}: missing required column(s) {', '.join(missing)}; "
                            f"found: {', '.join(map(str, df.columns))}{hint}")


def parse_label(value) -> int | None:
    """Map a label cell onto 1/0, or None when it is not a recognised malignant/benign value."""
    if pd.isna(value):
        return None
    return LABEL_WORDS.get(str(value).strip().lower())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | Path, labelled: bool = True) -> pd.DataFrame:
    """Read and validate a manifest; image paths come back absolute (relative ones resolve against its folder).
    labelled=False (photos to screen): the label column is optional and a blank label is allowed."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        df = pd.read_csv(path, dtype={"patient_id": str, "lesion_id": str, "domain": str,
                                      "fitzpatrick": str, "split": str, "image": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not a readable CSV ({e})") from e
    require_columns(df, REQUIRED if labelled else ("image",), str(path))
    empty = df.index[df["image"].isna() | (df["image"].astype(str).str.strip() == "")]
    if len(empty):
        raise ManifestError(f"{path}: {len(empty)} row(s) with no image path, e.g. row {empty[0] + 2} (rows count "
                            "from the header as row 1)")
    numeric = pd.to_numeric(df["label"], errors="coerce") if "label" in df else None  # "1" beside "maybe" is 1
    bad = df[~numeric.isin([0, 1]) & (labelled or df["label"].notna())] if "label" in df else df.iloc[:0]
    if len(bad):
        value = bad["label"].tolist()[0]  # a plain Python value: its repr reads as the cell did
        said = "no label" if pd.isna(value) else repr(value)
        raise ManifestError(f"{path}: label must be 0 (benign) or 1 (malignant); row {bad.index[0] + 2} has {said}")
    if "split" in df and not df["split"].dropna().isin(SPLITS).all():
        odd = sorted(set(df["split"].dropna()) - set(SPLITS))
        raise ManifestError(f"{path}: split values must be {SPLITS}, found {odd}")
    if "label" in df:
        df["label"] = numeric.astype(int if labelled else "Int64")
    df["image"] = [str((path.parent / p).resolve()) if not os.path.isabs(p) else p
                   for p in map(native_path, df["image"])]
    df.attrs["source"] = str(path)
    return df


def write_manifest(df: pd.DataFrame, path: str | Path, relative: bool = True) -> Path:
    """Write a manifest. Paths relative to its folder by default, so a dataset folder moved with its manifest
    keeps working; absolute (relative=False) for files that move without the data, such as a run's splits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = df.copy()
    base = path.parent.resolve()
    out["image"] = [portable_path(Path(p).resolve(), base) if relative else str(Path(p).resolve())
                    for p in out["image"]]
    ordered = [c for c in (*REQUIRED, *OPTIONAL) if c in out.columns]
    out = out[ordered + [c for c in out.columns if c not in ordered]]
    out.to_csv(path, index=False)
    return path


def read_text_csv(path: str | Path, what: str) -> pd.DataFrame:
    """A source CSV (labels, metadata) with every cell as text; a missing, empty or unparsable file is named."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: {what} CSV not found")
    try:
        return pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not a readable CSV ({e})") from e


def crop_of(row) -> dict | None:
    """The crop box of a manifest row as a dict, or None when the row has none (all four cells empty). A partial
    box or one that is not numbers raises ManifestError naming the image: scoring the whole photo instead would
    silently not be what the row asked for."""
    given = [c for c in CROP_COLUMNS if c in row and pd.notna(row[c]) and str(row[c]).strip() != ""]
    if not given:
        return None
    where = row.get("image", "a row") if hasattr(row, "get") else "a row"
    if len(given) < len(CROP_COLUMNS):
        empty = ", ".join(c for c in CROP_COLUMNS if c not in given)
        raise ManifestError(f"{where}: incomplete crop box ({empty} empty): give all four crop columns or none")
    try:
        return {c.removeprefix("crop_"): int(round(float(row[c]))) for c in CROP_COLUMNS}
    except (TypeError, ValueError, OverflowError):
        raise ManifestError(f"{where}: crop box is not numbers ({', '.join(f'{c}={row[c]!r}' for c in CROP_COLUMNS)})"
                            ) from None


def import_csv(labels_csv: str | Path, images: str | Path, *, image_col="image", label_col="label",
               patient_col="patient_id", lesion_col="lesion_id", fitzpatrick_col="fitzpatrick",
               domain: str | None = None) -> tuple[pd.DataFrame, ImportReport]:
    """Map any labelled CSV + image folder onto the manifest format. An image is looked up in `images`, then beside
    the CSV, so a manifest written by `train.data` (paths relative to itself) also imports."""
    labels_csv, images = Path(labels_csv), Path(images)
    src = read_text_csv(labels_csv, "labels")
    if not images.is_dir():
        raise ManifestError(f"{images}: image folder not found")
    require_columns(src, (image_col, label_col), str(labels_csv))
    report = ImportReport()
    rows = []
    for i, r in src.iterrows():
        file_name = r[image_col]
        if pd.isna(file_name) or not str(file_name).strip():
            report.drop("no image name", what=f"{labels_csv.name} row {i + 2}")
            continue
        label = parse_label(r[label_col])
        if label is None:
            report.drop(f"label not malignant/benign ({r[label_col]!r})", what=str(file_name))
            continue
        img = images / str(file_name)
        if not img.is_file() and (labels_csv.parent / str(file_name)).is_file():
            img = labels_csv.parent / str(file_name)  # a manifest this tool wrote: paths relative to itself
        if not img.is_file():
            report.drop("image file missing", what=str(img))
            continue
        row = {"image": str(img.resolve()), "label": label}
        for col, name in ((patient_col, "patient_id"), (lesion_col, "lesion_id"),
                          (fitzpatrick_col, "fitzpatrick")):
            if col and col in src.columns:
                row[name] = r[col]
        if domain:
            row["domain"] = domain
        rows.append(row)
    return finish_import(_once_each(rows, report), report, str(labels_csv))


def _once_each(rows: list[dict], report: ImportReport) -> list[dict]:
    """One row per image: a photo listed twice with one label keeps its first row; with different labels none
    (which is right is unknown, and the copies could land on both sides of a split)."""
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        by_image.setdefault(row["image"], []).append(row)
    out = []
    for image, copies in by_image.items():
        if len({c["label"] for c in copies}) > 1:
            report.drop("listed more than once with different labels", n=len(copies), what=[image] * len(copies))
            continue
        out.append(copies[0])
        report.drop("listed again (its first row kept)", n=len(copies) - 1, what=[image] * (len(copies) - 1))
    return out


def import_folder(root: str | Path, *, domain: str | None = None) -> tuple[pd.DataFrame, ImportReport]:
    """Import `root/benign/*` and `root/malignant/*` (no patient ids: splits fall back to images). Every file under
    root is accounted for: kept when it decodes whole as a supported image (the content decides, as everywhere
    else, so a JPEG without an extension is kept; one cut short after its header is not), else dropped with the
    reason; files outside the two label
    folders have no label and are dropped, named."""
    from core.images import ImageLoadError, decoded_size
    root = Path(root)
    folders = {name: root / name for name in ("benign", "malignant")}
    if not all(p.is_dir() for p in folders.values()):
        raise ManifestError(f"{root}: expected sub-folders benign/ and malignant/")
    report, rows = ImportReport(), []
    for f in sorted(p for p in root.rglob("*") if not p.is_dir()):
        name = next((n for n, folder in folders.items() if folder in f.parents), None)
        if name is None:
            report.drop("not inside benign/ or malignant/ (no label)", what=str(f))
            continue
        try:
            decoded_size(f)
        except ImageLoadError as e:
            report.drop(f"not a usable image ({e.reason})", what=str(e))
            continue
        rows.append({"image": str(f.resolve()), "label": int(name == "malignant"),
                     **({"domain": domain} if domain else {})})
    return finish_import(rows, report, str(root))


def finish_import(rows: list[dict], report: ImportReport, source: str) -> tuple[pd.DataFrame, ImportReport]:
    """Rows -> manifest frame; an import that kept nothing is an error saying what was dropped."""
    if not rows:
        raise ManifestError(f"{source}: no usable images ({report.summary()})")
    df = pd.DataFrame(rows)
    report.kept = len(df)
    return df, report
