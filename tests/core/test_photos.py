"""Tests for core.photos: display previews with EXIF orientation, thumbnails, PNG crops and box scaling."""
from __future__ import annotations

import io

from PIL import Image

from core import photos


def test_preview_and_box_scaling():
    img = Image.new("RGB", (2800, 1400), (200, 100, 90))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright photo is 1400 x 2800
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    disp, size = photos.preview(buf.getvalue(), max_side=700)
    assert size == (1400, 2800) and disp.size == (350, 700)
    box = photos.to_original({"left": 35, "top": 70, "width": 100, "height": 200}, disp.size, size)
    assert box == {"left": 140, "top": 280, "width": 400, "height": 800}
    assert photos.to_display(box, disp.size, size) == {"left": 35, "top": 70, "width": 100, "height": 200}
    png = Image.open(io.BytesIO(photos.crop_png(buf.getvalue(), "p.jpg", box)))
    assert png.format == "PNG" and png.size == (400, 800)
    clamped = photos.to_original({"left": 300, "top": 650, "width": 100, "height": 100}, disp.size, size)
    assert clamped["left"] + clamped["width"] <= 1400 and clamped["top"] + clamped["height"] <= 2800


def test_thumbnail(tmp_path):
    assert photos.thumbnail("/nope/0.jpg") is None
    Image.new("RGB", (640, 320)).save(tmp_path / "p.png")
    assert photos.thumbnail(tmp_path / "p.png", size=160).size == (160, 80)
