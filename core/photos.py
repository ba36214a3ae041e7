"""Display copies of photos: previews, thumbnails, PNG crops, and boxes scaled between display and original pixels."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from core.images import image_size, load_image


def preview(source, name: str | None = None, max_side: int = 700) -> tuple[Image.Image, tuple[int, int]]:
    """A display copy (long side <= max_side, EXIF applied) and the original upright size (w, h).

    Box coordinates drawn on the copy map back to the original with `to_original`."""
    size = image_size(source, name=name)
    img = load_image(source, name=name, min_side=max_side)  # JPEGs are decoded at reduced scale
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img, size


def crop_png(source, name: str | None = None, crop: dict | None = None) -> bytes:
    """The (cropped) upright photo at full resolution as PNG bytes, for the user to save."""
    buf = io.BytesIO()
    load_image(source, name=name, crop=crop).save(buf, "PNG")
    return buf.getvalue()


def thumbnail(path: str | Path, size: int = 160) -> Image.Image | None:
    """A small upright RGB copy of an image file, or None when it is missing or unreadable."""
    try:
        img = load_image(path, min_side=size)
    except Exception:  # noqa: BLE001 - a missing example must not break the dashboard
        return None
    img.thumbnail((size, size))
    return img


def to_original(box: dict, display_size: tuple[int, int], original_size: tuple[int, int]) -> dict:
    """Scale a box drawn on a display copy to original pixels, clamped inside the original image."""
    sx = original_size[0] / display_size[0]
    sy = original_size[1] / display_size[1]
    left = min(max(0, int(round(box["left"] * sx))), original_size[0] - 1)
    top = min(max(0, int(round(box["top"] * sy))), original_size[1] - 1)
    width = max(1, min(int(round(box["width"] * sx)), original_size[0] - left))
    height = max(1, min(int(round(box["height"] * sy)), original_size[1] - top))
    return {"left": left, "top": top, "width": width, "height": height}


def to_display(box: dict, display_size: tuple[int, int], original_size: tuple[int, int]) -> dict:
    sx = display_size[0] / original_size[0]
    sy = display_size[1] / original_size[1]
    return {"left": int(box["left"] * sx), "top": int(box["top"] * sy),
            "width": max(1, int(box["width"] * sx)), "height": max(1, int(box["height"] * sy))}
