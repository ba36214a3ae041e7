"""The one place lesion photos are decoded: safe loading, EXIF orientation, RGB conversion and cropping."""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Collection, Mapping, Union

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

from core.cropbox import box_problem

try:  # iPhone photos are HEIC; without pillow-heif they are simply "not an image".
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - pillow-heif is a runtime requirement
    pass

# Phones take 48-50 MP photos; anything much larger is a scan, a panorama or a decompression bomb.
# Kept below PIL's own warning threshold (~89.5 MP) so our check always speaks first.
MAX_PIXELS = 80_000_000
TOO_LARGE_ADVICE = "; crop the lesion or save a smaller copy (a phone's 12-megapixel photo is fine)"
# PIL warns while it opens the header, before _open can refuse the file: the user saw a library warning above
# the row that names the file as too_large. Every file past MAX_PIXELS is refused by name, so the warning says
# nothing more (PIL's hard limit, twice its threshold, still raises and is reported the same way).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
SUPPORTED_SUFFIXES = (".jpg", ".jpeg", ".png", ".heic", ".heif", ".bmp", ".tif", ".tiff", ".webp")
# The same formats as PIL names them after reading a file's header (its content, not its name). MPO is how PIL
# names the many phone JPEGs that carry a second (depth or preview) picture.
SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "HEIF", "BMP", "TIFF", "WEBP")

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes]]

_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
# Decoder failures on damaged files surface as any of these, depending on the format plugin.
_CORRUPT_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, RuntimeError,
                   zlib.error)


class ImageLoadError(ValueError):
    """A photo that cannot be used; the message names the file and the reason, `reason` is a short code for tables
    (not_found, not_a_file, empty, unreadable, not_an_image, unsupported_type, unsupported_mode, too_large,
    corrupt, bad_crop)."""

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CropBox:
    """A crop in original-pixel coordinates of the upright (EXIF-oriented) full-resolution photo."""
    left: int
    top: int
    width: int
    height: int

    @classmethod
    def from_mapping(cls, d: Mapping) -> "CropBox":
        """Build from a dict with left/top/width/height (or crop_left/...); floats are rounded."""
        values = {}
        for key in ("left", "top", "width", "height"):
            value = d.get(key, d.get(f"crop_{key}"))
            try:
                values[key] = int(round(float(value)))
            except (TypeError, ValueError, OverflowError):  # missing, None, NaN, inf, text
                raise ValueError(f"crop box needs a numeric {key!r}, got {value!r}") from None
        return cls(**values)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) as PIL's crop() wants it."""
        return self.left, self.top, self.left + self.width, self.top + self.height

    def describe(self) -> str:
        return f"crop box (left={self.left}, top={self.top}, width={self.width}, height={self.height})"

    def validate(self, size: tuple[int, int]) -> None:
        """Raise ValueError unless the box has positive size and lies inside an image of `size`."""
        if why := box_problem(asdict(self), size):
            raise ValueError(f"{self.describe()} {why}")

    def scaled(self, factor: float) -> "CropBox":
        """The same region at `factor` times the resolution, rounded outwards so no edge pixel is lost."""
        eps = 1e-9  # keeps exact multiples (e.g. 640 * 0.25) from rounding one pixel outwards
        left = math.floor(self.left * factor + eps)
        top = math.floor(self.top * factor + eps)
        right = math.ceil((self.left + self.width) * factor - eps)
        bottom = math.ceil((self.top + self.height) * factor - eps)
        return CropBox(left, top, max(1, right - left), max(1, bottom - top))


def load_image(source: Source, *, name: str | None = None, crop: CropBox | Mapping | None = None,
               min_side: int | None = None, min_long: int = 0,
               formats: Collection[str] | None = None) -> Image.Image:
    """Decode a photo to an upright RGB image, optionally cropped and draft-downscaled for speed.

    `source` is a path, raw bytes or a binary file-like (e.g. Streamlit's UploadedFile).
    With `min_side`, JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain as long as the
    short side of the (cropped) result stays >= min_side and its long side >= min_long; without it the full
    resolution is kept. With `formats` (PIL format names, e.g. SUPPORTED_FORMATS), any other format is refused
    (reason 'unsupported_type'); the format is read from the content, so a JPEG without a file extension loads.
    """
    label = _label(source, name)
    if crop is not None and not isinstance(crop, CropBox):
        crop = _crop_from_mapping(crop, label)
    with _open(source, label) as img:
        if formats is not None:
            _check_format(img, formats, label)
        full_size = _oriented_size(img)
        if crop is not None:
            _validate_crop(crop, full_size, label)
        factor = _draft(img, crop, min_side, min_long) if min_side else 1.0
        _decode(img, label)
        out = to_rgb(exif_transposed(img), label)
    if crop is not None:
        if factor != 1.0:
            crop = _clamped(crop.scaled(factor), out.size)
        _validate_crop(crop, out.size, label)  # guards a header/decoded orientation mismatch
        out = out.crop(crop.box)
    return out


def _check_format(img: Image.Image, formats: Collection[str], label: str) -> None:
    if img.format not in formats:
        raise ImageLoadError(f"{label}: {img.format or 'this'} format is not supported (supported: "
                             f"{', '.join(f for f in formats if f != 'MPO')})", "unsupported_type")


def image_size(source: Source, name: str | None = None) -> tuple[int, int]:
    """(width, height) of the upright photo, read from the header without decoding pixels."""
    label = _label(source, name)
    with _open(source, label) as img:
        return _oriented_size(img)


def decoded_size(source: Source, name: str | None = None) -> tuple[int, int]:
    """(width, height) of the upright photo after decoding all of its pixel data, so that a photo cut short after a
    sound header is refused here, before a run, and not when a batch reaches it. A JPEG decodes at 1/8 scale (its
    DCT still reads every byte), which costs a few milliseconds."""
    label = _label(source, name)
    with _open(source, label) as img:
        _check_format(img, SUPPORTED_FORMATS, label)  # what screening refuses, training and import refuse too
        size = _oriented_size(img)
        _draft(img, None, min_side=1)
        _decode(img, label)
    return size


def exif_transposed(img: Image.Image) -> Image.Image:
    """`img` rotated/flipped upright per its EXIF orientation (a copy; unchanged if none or unreadable)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not make a good photo unusable
        return img.copy()


def to_rgb(img: Image.Image, label: str = "image") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency onto white."""
    if img.mode == "RGB" and not img.has_transparency_data:
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb(img)
    if img.has_transparency_data or img.mode in ("RGBa", "La", "PA"):
        # Transparent PNG exports (screenshots, cut-outs) store arbitrary colour under alpha=0,
        # often black; flattening onto white shows what the user saw in their viewer.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageLoadError(f"{label}: unsupported colour mode {img.mode!r}", "unsupported_mode") from exc


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float pixels into 0..255 (PIL's own convert() clips at 255)."""
    a = np.asarray(img).astype(np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        scale_lo, scale_hi = 0.0, 65535.0  # the bit depth says what full white is
    elif img.mode == "I" and lo >= 0 and hi <= 255:
        scale_lo, scale_hi = 0.0, 255.0
    elif img.mode == "I" and lo >= 0 and hi <= 65535:
        scale_lo, scale_hi = 0.0, 65535.0  # 16-bit data held in a 32-bit container
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        scale_lo, scale_hi = 0.0, 1.0  # the usual convention for float images
    else:
        scale_lo, scale_hi = lo, max(hi, lo + 1e-12)  # unknown range: stretch what is there
    a = (a - scale_lo) * (255.0 / (scale_hi - scale_lo))
    gray = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    return gray.convert("RGB")


def _label(source: Source, name: str | None) -> str:
    if name:
        return str(name)
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return str(getattr(source, "name", None) or "uploaded image")


def _crop_from_mapping(crop: Mapping, label: str) -> CropBox:
    try:
        return CropBox.from_mapping(crop)
    except ValueError as exc:
        raise ImageLoadError(f"{label}: {exc}", "bad_crop") from exc


def _validate_crop(crop: CropBox, size: tuple[int, int], label: str) -> None:
    try:
        crop.validate(size)
    except ValueError as exc:
        raise ImageLoadError(f"{label}: {exc}", "bad_crop") from exc


def _clamped(crop: CropBox, size: tuple[int, int]) -> CropBox:
    """Trim a scaled box to the drafted image (outward rounding can overshoot by a pixel)."""
    left, top = min(crop.left, size[0] - 1), min(crop.top, size[1] - 1)
    right = min(crop.left + crop.width, size[0])
    bottom = min(crop.top + crop.height, size[1])
    return CropBox(left, top, max(1, right - left), max(1, bottom - top))


def _read_bytes(source: Source, label: str) -> bytes:
    """The whole content of bytes or a file-like, without moving a seekable stream's position."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if not hasattr(source, "read"):
        raise TypeError(f"cannot load an image from {type(source).__name__}")
    try:
        if hasattr(source, "getvalue"):  # BytesIO / Streamlit UploadedFile: no seek needed
            return bytes(source.getvalue())
        pos = source.tell() if source.seekable() else None
        if pos is not None:
            source.seek(0)
        data = source.read()
        if pos is not None:
            source.seek(pos)
        return bytes(data)
    except OSError as exc:
        raise ImageLoadError(f"{label}: cannot read the upload ({exc})", "unreadable") from exc


def _open(source: Source, label: str) -> Image.Image:
    """Open (header only) with existence, emptiness, format and pixel-count checks."""
    if isinstance(source, (str, os.PathLike)):
        fp = _checked_path(Path(source), label)
    else:
        data = _read_bytes(source, label)
        if not data:
            raise ImageLoadError(f"{label}: file is empty (0 bytes)", "empty")
        fp = io.BytesIO(data)
    try:
        with _pil_errors(label):
            img = Image.open(fp)
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{label}: not an image (cannot identify image file)", "not_an_image") from exc
    except PermissionError as exc:
        raise ImageLoadError(f"{label}: cannot read file (permission denied)", "unreadable") from exc
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise ImageLoadError(f"{label}: {w}x{h} pixels exceeds the {MAX_PIXELS // 1_000_000}-megapixel limit"
                             f"{TOO_LARGE_ADVICE}", "too_large")
    return img


def _checked_path(path: Path, label: str) -> Path:
    if not path.exists():
        raise ImageLoadError(f"{label}: file not found", "not_found")
    if not path.is_file():
        raise ImageLoadError(f"{label}: not a file", "not_a_file")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"{label}: file is empty (0 bytes)", "empty")
    return path


def _bomb_detail(exc: Exception) -> str:
    m = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(m.group(1)) / 1e6:.0f}-megapixel image" if m else "image size"


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8 from the already-read header (1 when absent or unreadable)."""
    try:
        if isinstance(img, PngImagePlugin.PngImageFile):
            # PNG's getexif() decodes the whole image hunting for a trailing eXIf chunk;
            # the base implementation reads only what open() already parsed.
            exif = Image.Image.getexif(img)
        else:
            exif = img.getexif()
        value = int(exif.get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - same fallback as exif_transposed(): ignore broken EXIF
        return 1
    return value if 1 <= value <= 8 else 1


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    return (h, w) if _orientation(img) in _SWAPS_AXES else (w, h)


def _draft(img: Image.Image, crop: CropBox | None, min_side: int, min_long: int = 0) -> float:
    """Ask the JPEG decoder for the largest 1/2^k reduction that keeps the crop's short side >= min_side and its
    long side >= min_long.

    Returns the linear factor the decoded image is scaled by (1.0 when nothing was reduced).
    """
    if not isinstance(img, JpegImagePlugin.JpegImageFile) or min_side <= 0:
        return 1.0
    w, h = img.size
    cw, ch = (crop.width, crop.height) if crop is not None else (w, h)
    short, long_ = min(cw, ch), max(cw, ch)  # rotation-invariant
    reduction = next((r for r in (8, 4, 2) if short // r >= min_side and long_ // r >= min_long), 1)
    if reduction == 1:
        return 1.0
    # draft() picks the largest scale s with s <= size // requested; asking for size // r yields r.
    result = img.draft("RGB", (max(1, w // reduction), max(1, h // reduction)))
    if result is None:
        return 1.0
    _, box = result
    return box[2] / w  # exactly 1/scale (img.size is rounded up to whole pixels)


def _decode(img: Image.Image, label: str) -> None:
    """Decode pixels now so damage is reported here (truncated files are never silently padded)."""
    try:
        with _pil_errors(label):
            img.load()
    except MemoryError as exc:
        raise ImageLoadError(f"{label}: not enough memory to decode the image", "too_large") from exc


@contextlib.contextmanager
def _pil_errors(label: str):
    """PIL's refusals while opening or decoding, as ImageLoadErrors naming the file."""
    try:
        yield
    except (UnidentifiedImageError, PermissionError):
        raise  # OSErrors with their own message: the caller words them
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL refuses before we can see the size; its message carries the pixel count.
        raise ImageLoadError(f"{label}: {_bomb_detail(exc)} exceeds the {MAX_PIXELS // 1_000_000}-megapixel limit"
                             f"{TOO_LARGE_ADVICE}", "too_large") from exc
    except _CORRUPT_ERRORS as exc:
        raise ImageLoadError(f"{label}: truncated or corrupt image data", "corrupt") from exc
