"""The crop-box CSV shared by the app's crop page and the data loader: read, upsert, apply, resume."""
from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from core.fileio import atomic_write, native_path, portable_path
from core.manifest import CROP_COLUMNS, ImportReport, ManifestError, require_columns

COLUMNS = ("image_id", "left", "top", "width", "height", "unusable", "note")
BOX = ("left", "top", "width", "height")
NO_BOX = "no crop box"
UNUSABLE = "marked unusable in the crop file"
_FLAGS = {"0": 0, "1": 1, "false": 0, "true": 1, "": 0, "0.0": 0, "1.0": 1}


def read_crops(path: str | Path) -> pd.DataFrame:
    """Read and validate a crop file; a missing file is an empty one (nothing cropped yet)."""
    path = Path(path)
    if not path.exists():
        return _empty()
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return _empty()
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not a readable crop CSV ({e})") from e
    require_columns(raw, COLUMNS[:-1], str(path))  # `note` is optional
    rows = [_parse_row(r, i + 2, path) for i, r in enumerate(raw.to_dict("records"))]
    df = pd.DataFrame(rows, columns=list(COLUMNS)) if rows else _empty()
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise ManifestError(f"{path}: image_id {dup.iloc[0]!r} appears more than once")
    return _typed(df)


def upsert_crop(path: str | Path, image_id: str, box: dict | None, unusable: bool = False,
                note: str = "") -> pd.DataFrame:
    """Add or replace one image's entry; the file is rewritten atomically so earlier crops survive a crash."""
    image_id = str(image_id).strip()
    if not image_id:
        raise ManifestError("crop entry needs an image_id")
    if box is None and not unusable:
        raise ManifestError(f"{image_id}: give a crop box or mark the image unusable")
    entry = _parse_row({"image_id": image_id, "unusable": "1" if unusable else "0", "note": note,
                        **{k: "" if box is None else _cell(box.get(k)) for k in BOX}}, None, path)
    path = Path(path)
    with _locked(path):  # two app sessions must not interleave read-modify-write
        df = read_crops(path)
        df = df[df["image_id"] != image_id]
        df = _typed(pd.concat([df, pd.DataFrame([entry])], ignore_index=True))
        _write_csv(df, path)
    return df


def apply_crops(manifest_df: pd.DataFrame, crops_df: pd.DataFrame, *,
                validate_sizes: bool = True) -> tuple[pd.DataFrame, ImportReport]:
    """Set crop_* on manifest rows that have a box; drop (and count) unusable and unboxed rows."""
    require_columns(manifest_df, ("image",), "manifest")
    lookup = _lookup(crops_df)
    name_counts = Counter(os.path.basename(str(p)) for p in manifest_df["image"])
    report, kept = ImportReport(), []
    for i, image in enumerate(manifest_df["image"]):
        entry = _match(image, manifest_df, lookup, name_counts)
        if entry is not None and entry["unusable"]:
            report.drop(UNUSABLE, what=str(image))
        elif entry is None or pd.isna(entry["left"]):
            report.drop(NO_BOX, what=str(image))
        else:
            box = {k: int(entry[k]) for k in BOX}
            if validate_sizes:
                _check_inside(image, box)
            kept.append((i, box))
    out = manifest_df.iloc[[i for i, _ in kept]].copy().reset_index(drop=True)
    for col, key in zip(CROP_COLUMNS, BOX):
        out[col] = pd.Series([box[key] for _, box in kept], dtype="int64")
    report.kept = len(out)
    return out, report


def next_unlabelled(manifest_df: pd.DataFrame, crops_df: pd.DataFrame) -> int | None:
    """Row position of the first image with no box and no unusable flag (None when all are done)."""
    lookup = _lookup(crops_df)
    for i, image in enumerate(manifest_df["image"]):
        if not is_labelled(_match(image, manifest_df, lookup)):
            return i
    return None


def image_id_for(image: str, manifest_df: pd.DataFrame) -> str:
    """The key to save a manifest image's entry under: its path relative to the manifest's folder (portable)."""
    source = manifest_df.attrs.get("source")
    if source and os.path.isabs(image):
        return portable_path(os.path.normpath(image), os.path.dirname(os.path.abspath(source)))
    return _key(image)


def entries_for(manifest_df: pd.DataFrame, crops_df: pd.DataFrame) -> list[dict | None]:
    """Per manifest row, the crop-file entry that applies to it (matched as apply_crops does), or None."""
    lookup = _lookup(crops_df)
    return [_match(image, manifest_df, lookup) for image in manifest_df["image"]]


def is_labelled(entry: dict | None) -> bool:
    """Whether an entry settles its image: it has a box or marks the image unusable."""
    return entry is not None and (bool(entry["unusable"]) or not pd.isna(entry["left"]))


def crop_progress(entries: list[dict | None]) -> tuple[int, int]:
    """(done, total) over entries_for's list."""
    return sum(map(is_labelled, entries)), len(entries)


def entry_box(entry: dict | None) -> dict | None:
    """An entry's box in original pixels, or None when there is no entry or it has no box."""
    if entry is None or pd.isna(entry["left"]):
        return None
    return {k: int(entry[k]) for k in BOX}


def box_problem(box: Mapping, size: tuple[int, int] | None = None) -> str | None:
    """Why a crop box (left, top, width, height in original upright pixels) cannot be used, or None if it can.

    The one validity rule for crop boxes (the crop file, manifests, the image loader and training's image
    check all use it): width and height > 0, left and top >= 0, and, given the image's (width, height), the
    box lies inside it."""
    left, top, width, height = (box[k] for k in BOX)
    if width <= 0 or height <= 0:
        return "has a non-positive size (need width, height > 0)"
    if size is not None and (left < 0 or top < 0 or left + width > size[0] or top + height > size[1]):
        return f"falls outside the {size[0]}x{size[1]} image"
    if left < 0 or top < 0:
        return "has a negative left or top (need left, top >= 0)"
    return None


def _parse_row(r: dict, line: int | None, path) -> dict:
    where = f"{path}: line {line}" if line else f"{path}"
    image_id = str(r["image_id"]).strip()
    if not image_id:
        raise ManifestError(f"{where}: empty image_id")
    flag = _FLAGS.get(str(r["unusable"]).strip().lower())
    if flag is None:
        raise ManifestError(f"{where}: unusable must be 0 or 1, got {r['unusable']!r}")
    cells = [str(r[k]).strip() for k in BOX]
    out = {"image_id": image_id, "unusable": flag, "note": str(r.get("note") or "")}
    if not any(cells):
        return out | {k: None for k in BOX}
    if not all(cells):
        raise ManifestError(f"{where}: crop box for {image_id!r} is incomplete ({dict(zip(BOX, cells))})")
    try:
        values = [float(c) for c in cells]
    except ValueError:
        raise ManifestError(f"{where}: crop box for {image_id!r} is not numeric ({dict(zip(BOX, cells))})")
    box = dict(zip(BOX, (round(v) if math.isfinite(v) else -1 for v in values)))
    if why := box_problem(box):
        raise ManifestError(f"{where}: crop box for {image_id!r} {why}, got {box}")
    return out | box


def _cell(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _empty() -> pd.DataFrame:
    return _typed(pd.DataFrame({c: [] for c in COLUMNS}))


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["image_id"] = df["image_id"].astype(str)
    for k in BOX:
        df[k] = pd.array(df[k].tolist(), dtype="Int64")
    df["unusable"] = df["unusable"].astype(int)
    df["note"] = df["note"].fillna("").astype(str)
    return df[list(COLUMNS)].reset_index(drop=True)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            df.to_csv(f, index=False)
            f.flush()
            os.fsync(f.fileno())  # hours of hand-drawn boxes: on disk before the rename, not just in a buffer
    atomic_write(path, write)


@contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # Windows: atomic replace still protects against crashes
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _key(image_id: str) -> str:
    """One spelling of an image's key on every OS, so a crop file made on Windows works on a Mac and back."""
    return Path(os.path.normpath(native_path(str(image_id)))).as_posix()


def _lookup(crops_df: pd.DataFrame) -> dict[str, dict]:
    return {_key(r["image_id"]): r for r in crops_df.to_dict("records")}


def _match(image: str, manifest_df: pd.DataFrame, lookup: dict[str, dict],
           name_counts: Counter | None = None) -> dict | None:
    """An entry keyed by the image's path (absolute or as written in the manifest) wins over its basename."""
    image = str(image)
    keys = [_key(image), image_id_for(image, manifest_df)]
    entry = next((lookup[k] for k in keys if k in lookup), None)
    name = os.path.basename(image)
    if entry is None and name in lookup:
        # Two images sharing a file name (e.g. IMG_0001.jpg from two phones) cannot share one box.
        if name_counts and name_counts[name] > 1:
            raise ManifestError(f"crop entry {name!r} matches several manifest images by file name; "
                                "key it by the image path instead")
        entry = lookup[name]
    return entry


def _check_inside(image: str, box: dict) -> None:
    if why := box_problem(box, _image_size(image)):
        raise ManifestError(f"{image}: crop box {box} {why} (sizes after EXIF orientation)")


def _image_size(image: str) -> tuple[int, int]:
    """(width, height) after EXIF orientation, without decoding the pixels."""
    try:
        from core.images import image_size
    except ImportError:
        image_size = _pil_size
    try:
        return tuple(image_size(image))
    except Exception as e:  # any loader failure (missing, corrupt, unsupported) is a bad manifest row
        raise ManifestError(f"{image}: cannot read the image to check its crop box ({e})") from e


def _pil_size(image: str) -> tuple[int, int]:
    from PIL import Image
    with Image.open(image) as im:
        w, h = im.size
        # EXIF orientations 5-8 rotate by 90 degrees, as ImageOps.exif_transpose would.
        return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)
