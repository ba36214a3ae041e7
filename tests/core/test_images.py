"""Tests for core.images: decoding, EXIF orientation, RGB conversion, cropping, draft decoding and errors."""
from __future__ import annotations

import io
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from core.images import (MAX_PIXELS, SUPPORTED_SUFFIXES, CropBox, ImageLoadError, decoded_size, image_size,
                         load_image, to_rgb)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _smooth(w: int, h: int) -> np.ndarray:
    """A low-frequency colour pattern: survives JPEG and DCT-domain downscaling almost unchanged."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0)
    g = 60 + 150 * x / max(w - 1, 1)
    b = 128 + 90 * np.cos((x + 2 * y) / 71.0)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def _halves(w: int = 60, h: int = 40) -> Image.Image:
    """Left half red, right half blue: any rotation or flip is visible."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2:] = (0, 0, 255)
    return Image.fromarray(a)


def _save_oriented_jpeg(path: Path, img: Image.Image, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, "JPEG", exif=exif, quality=95)
    return path


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose IHDR claims width x height, without allocating that many pixels."""
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    # Signature (8) + chunk length (4) + b"IHDR" (4), then width and height; CRC covers type + 13 data bytes.
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


class _Upload(io.BytesIO):
    """Stands in for Streamlit's UploadedFile (a BytesIO with a .name)."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name


# --- EXIF orientation and crops -------------------------------------------------------------

def test_exif_orientation_6_is_rotated_clockwise(tmp_path):
    path = _save_oriented_jpeg(tmp_path / "phone.jpg", _halves(60, 40), 6)
    assert image_size(path) == (40, 60)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (40, 60)
    a = np.asarray(img).astype(int)
    # Orientation 6 = rotate 90 degrees clockwise for display: the left (red) half ends up on top.
    assert np.abs(a[5, 20] - (255, 0, 0)).max() < 30
    assert np.abs(a[55, 20] - (0, 0, 255)).max() < 30


def test_crop_uses_upright_coordinates(tmp_path):
    path = _save_oriented_jpeg(tmp_path / "phone.jpg", _halves(60, 40), 6)
    top = np.asarray(load_image(path, crop=CropBox(0, 0, 40, 28))).astype(int)
    bottom = np.asarray(load_image(path, crop={"left": 0, "top": 32.4, "width": 40, "height": 27.6}))
    assert top.shape == (28, 40, 3) and bottom.shape == (28, 40, 3)
    assert np.abs(top.mean(axis=(0, 1)) - (255, 0, 0)).max() < 20
    assert np.abs(bottom.astype(int).mean(axis=(0, 1)) - (0, 0, 255)).max() < 20
    # The same box in the stored (landscape) orientation is outside the upright 40x60 image.
    with pytest.raises(ImageLoadError, match=r"phone\.jpg: crop box .* falls outside the 40x60 image"):
        load_image(path, crop=CropBox(0, 0, 60, 40))


@pytest.mark.parametrize("box", [CropBox(50, 0, 20, 10), CropBox(-1, 0, 10, 10), CropBox(0, 40, 10, 9)])
def test_crop_outside_image_errors(tmp_path, box):
    path = tmp_path / "lesion.png"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(path)
    with pytest.raises(ImageLoadError, match=r"lesion\.png: crop box \(left=-?\d+, top=\d+, width=\d+, "
                                             r"height=\d+\) falls outside the 64x48 image"):
        load_image(path, crop=box)


@pytest.mark.parametrize("box", [CropBox(0, 0, 0, 10), {"left": 0, "top": 0, "width": 10, "height": -3}])
def test_crop_with_non_positive_size_errors(tmp_path, box):
    path = tmp_path / "lesion.png"
    Image.new("RGB", (64, 48)).save(path)
    with pytest.raises(ImageLoadError, match=r"lesion\.png: .*non-positive size"):
        load_image(path, crop=box)


def test_crop_box_from_mapping_and_scaling():
    box = CropBox.from_mapping({"left": 10.4, "top": 19.6, "width": 100.5, "height": 50})
    assert box == CropBox(10, 20, 100, 50)  # round-half-even: 100.5 -> 100
    assert CropBox.from_mapping({"crop_left": 1, "crop_top": 2, "crop_width": 3, "crop_height": 4}) \
        == CropBox(1, 2, 3, 4)
    # Outward rounding: the quarter-scale box still covers every pixel of the original region.
    assert CropBox(7, 9, 9, 8).scaled(0.25) == CropBox(1, 2, 3, 3)
    assert CropBox(8, 8, 16, 16).scaled(0.5) == CropBox(4, 4, 8, 8)
    with pytest.raises(ValueError, match="height"):
        CropBox.from_mapping({"left": 0, "top": 0, "width": 5, "height": float("nan")})
    with pytest.raises(ValueError, match="top"):
        CropBox.from_mapping({"left": 0, "width": 5, "height": 5})


# --- colour modes ----------------------------------------------------------------------------

def _load_saved(tmp_path, img: Image.Image, name: str, **save_kwargs) -> np.ndarray:
    path = tmp_path / name
    img.save(path, **save_kwargs)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out).astype(int)


def test_grayscale_l_to_rgb(tmp_path):
    a = _load_saved(tmp_path, Image.new("L", (8, 6), 100), "gray.png")
    assert (a == 100).all()


def test_la_transparent_pixels_become_white(tmp_path):
    la = Image.new("LA", (8, 6), (0, 255))
    la.putpixel((0, 0), (0, 0))
    a = _load_saved(tmp_path, la, "la.png")
    assert tuple(a[0, 0]) == (255, 255, 255) and tuple(a[5, 7]) == (0, 0, 0)


def test_rgba_composited_onto_white(tmp_path):
    rgba = Image.new("RGBA", (8, 6), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 255, 128))
    a = _load_saved(tmp_path, rgba, "cutout.png")
    assert tuple(a[0, 0]) == (255, 255, 255)
    assert tuple(a[1, 1]) == (255, 0, 0)
    assert np.abs(a[2, 2] - (127, 127, 255)).max() <= 1


def test_palette_without_transparency(tmp_path):
    p = Image.new("P", (8, 6), 1)
    p.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    a = _load_saved(tmp_path, p, "pal.png")
    assert (a == (200, 30, 40)).all()


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (8, 6), 1)
    p.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    p.putpixel((3, 3), 0)
    a = _load_saved(tmp_path, p, "pal_t.png", transparency=0)
    assert tuple(a[3, 3]) == (255, 255, 255)  # transparent index, stored black
    assert tuple(a[0, 0]) == (200, 30, 40)


def test_cmyk_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # full magenta + yellow = red
    a = _load_saved(tmp_path, cmyk, "print.tif")
    assert (a == (255, 0, 0)).all()
    j = _load_saved(tmp_path, cmyk, "print.jpg", quality=95)
    assert np.abs(j - (255, 0, 0)).max() < 10


def test_16_bit_gradient_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    a = _load_saved(tmp_path, img, "ramp16.png")
    row = a[0, :, 0]
    assert row.min() == 0 and row.max() == 255
    assert np.abs(row - np.arange(256)).max() <= 1  # linear, not saturated at 255 after 1/256th
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_32_bit_and_float_modes_scaled():
    i = Image.fromarray(np.array([[0, 32768, 65535]], np.int32), "I")
    assert np.asarray(to_rgb(i))[0, :, 0].tolist() == [0, 128, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-10.0, 0.0, 10.0]], np.float32), "F")
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]


def test_float_tiff_loads(tmp_path):
    f = Image.fromarray(np.tile(np.linspace(0, 1, 16, dtype=np.float32), (3, 1)), "F")
    a = _load_saved(tmp_path, f, "float.tif")
    assert a[0, 0, 0] == 0 and a[0, -1, 0] == 255


def test_heic_loads_when_encoder_available(tmp_path):
    path = tmp_path / "iphone.heic"
    try:
        Image.new("RGB", (64, 48), (200, 10, 10)).save(path, format="HEIF")
    except (KeyError, OSError, ValueError) as exc:
        pytest.skip(f"no HEIF encoder here: {exc}")
    img = load_image(path)
    assert img.size == (64, 48) and np.abs(np.asarray(img).astype(int) - (200, 10, 10)).max() < 12


# --- broken and hostile files ----------------------------------------------------------------

def test_empty_file(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"x\.jpg: file is empty \(0 bytes\)"):
        load_image(path)
    with pytest.raises(ImageLoadError, match=r"^upload\.jpg: file is empty"):
        load_image(b"", name="upload.jpg")


def test_text_file_renamed_jpg(tmp_path):
    path = tmp_path / "lesion.jpg"
    path.write_text("this is a clinic note, not a photo\n")
    with pytest.raises(ImageLoadError, match=r"lesion\.jpg: not an image \(cannot identify image file\)"):
        load_image(path)
    with pytest.raises(ImageLoadError, match=r"lesion\.jpg: not an image"):
        image_size(path)


def test_truncated_jpeg(tmp_path):
    whole = io.BytesIO()
    Image.fromarray(_smooth(256, 192)).save(whole, "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.jpg: truncated or corrupt image data"):
        load_image(path)
    with pytest.raises(ImageLoadError, match=r"cut\.jpg: truncated"):
        load_image(path, min_side=32)  # the draft path must not hide the damage either
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decoded_size_refuses_what_the_header_alone_lets_through(tmp_path, fmt):
    """image_size reads the header only; decoded_size (the pre-run check) decodes the pixels, a JPEG at 1/8 scale,
    and still finds a file cut short, while a whole photo keeps its upright size."""
    whole = io.BytesIO()
    Image.fromarray(_smooth(256, 192)).save(whole, fmt)
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(whole.getvalue()[: len(whole.getvalue()) * 2 // 3])
    assert image_size(cut) == (256, 192)
    with pytest.raises(ImageLoadError, match=r"truncated or corrupt image data") as err:
        decoded_size(cut)
    assert err.value.reason == "corrupt"
    rotated = _save_oriented_jpeg(tmp_path / "rot.jpg", Image.fromarray(_smooth(256, 192)), 6)
    assert decoded_size(rotated) == image_size(rotated) == (192, 256)


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match=r"nothere\.jpg: file not found"):
        load_image(tmp_path / "nothere.jpg")
    with pytest.raises(ImageLoadError, match="file not found"):
        image_size(str(tmp_path / "nothere.jpg"))


def test_huge_dimensions_rejected_before_decoding(tmp_path):
    path = _png_claiming(tmp_path / "bomb.png", 9000, 9000)  # 81 MP: only our limit applies
    with pytest.raises(ImageLoadError, match=r"bomb\.png: 9000x9000 pixels exceeds the 80-megapixel limit"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="80-megapixel"):
        image_size(path)


def test_decompression_bomb_error_from_pil(tmp_path):
    path = _png_claiming(tmp_path / "bomb.png", 20000, 20000)  # PIL itself refuses this at open()
    assert path.stat().st_size < 100
    with pytest.raises(ImageLoadError, match=r"bomb\.png: .*exceeds the 80-megapixel limit"):
        load_image(path)


def test_decompression_bomb_warning_as_error(tmp_path):
    path = _png_claiming(tmp_path / "big.png", 10000, 9000)  # 90 MP: PIL warns at open()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageLoadError, match=r"big\.png: .*80-megapixel limit"):
            load_image(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageLoadError, match=r"big\.png: 10000x9000 pixels"):
            load_image(path)
    assert MAX_PIXELS == 80_000_000


def test_a_file_past_the_limit_is_named_without_a_library_warning_first(tmp_path):
    """PIL's DecompressionBombWarning printed above the row that already named the file as too_large. Run as a
    user runs it: pytest replaces the warning filters a module sets when it is imported."""
    import subprocess
    import sys
    (tmp_path / "photos").mkdir()
    _png_claiming(tmp_path / "photos" / "big.png", 10000, 9000)
    Image.fromarray(_smooth(256, 192)).save(tmp_path / "photos" / "fine.png")  # one to score: exit 0
    done = subprocess.run([sys.executable, "-m", "train.screen", "--run", "demo", "--images", str(tmp_path / "photos"),
                           "--out", str(tmp_path / "p.csv"), "--workers", "0"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0, done.stderr
    assert "too_large" in (tmp_path / "p.csv").read_text() and "DecompressionBomb" not in done.stderr + done.stdout


# --- sources ---------------------------------------------------------------------------------

def test_bytes_and_file_like_sources(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_smooth(80, 60)).save(buf, "PNG")
    data = buf.getvalue()
    ref = np.asarray(Image.fromarray(_smooth(80, 60)))
    assert (np.asarray(load_image(data)) == ref).all()
    upload = _Upload(data, "IMG_0042.png")
    upload.seek(0, io.SEEK_END)  # Streamlit may hand over a stream that was already read
    assert (np.asarray(load_image(upload)) == ref).all()
    assert image_size(upload) == (80, 60)
    with pytest.raises(ImageLoadError, match=r"^IMG_0042\.png: crop box"):
        load_image(upload, crop=CropBox(0, 0, 81, 60))
    with pytest.raises(ImageLoadError, match=r"^notes\.jpg: not an image"):
        load_image(_Upload(b"hello", "notes.jpg"))
    with pytest.raises(ImageLoadError, match=r"^renamed\.jpg: not an image"):
        load_image(_Upload(b"hello", "notes.jpg"), name="renamed.jpg")


def test_supported_suffixes():
    assert {".jpg", ".jpeg", ".png", ".heic"} <= set(SUPPORTED_SUFFIXES)
    assert all(s == s.lower() and s.startswith(".") for s in SUPPORTED_SUFFIXES)


# --- draft (DCT-domain) decoding -------------------------------------------------------------

@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("draft") / "big.jpg"
    Image.fromarray(_smooth(2000, 1500)).save(path, "JPEG", quality=92)
    return path


def test_draft_downscales_but_keeps_min_side(big_jpeg):
    full = load_image(big_jpeg)
    small = load_image(big_jpeg, min_side=224)
    assert full.size == (2000, 1500)
    assert small.mode == "RGB" and small.size == (500, 375)  # 1/4: 1/8 would give 187 < 224
    assert min(small.size) >= 224
    diff = np.abs(np.asarray(small).astype(int) - np.asarray(full.resize(small.size, Image.BOX)).astype(int))
    assert diff.mean() < 3


def test_draft_crop_matches_full_resolution_crop(big_jpeg):
    box = CropBox(401, 299, 1203, 900)
    full = load_image(big_jpeg, crop=box)
    small = load_image(big_jpeg, crop=box, min_side=224)
    assert full.size == (1203, 900)
    assert min(small.size) >= 224 and small.width < 400  # reduced 4x, short side 225 or 226
    ref = np.asarray(full.resize(small.size, Image.BOX)).astype(int)
    assert np.abs(np.asarray(small).astype(int) - ref).mean() < 4


def test_draft_with_exif_rotation_and_crop(tmp_path):
    path = _save_oriented_jpeg(tmp_path / "rot.jpg", Image.fromarray(_smooth(1600, 1200)), 6)
    box = CropBox(100, 500, 1000, 960)  # upright image is 1200x1600
    full = load_image(path, crop=box)
    small = load_image(path, crop=box, min_side=200)
    assert full.size == (1000, 960) and min(small.size) >= 200 and small.width <= 260
    ref = np.asarray(full.resize(small.size, Image.BOX)).astype(int)
    assert np.abs(np.asarray(small).astype(int) - ref).mean() < 4


def test_min_side_larger_than_image_keeps_full_resolution(big_jpeg, tmp_path):
    assert load_image(big_jpeg, min_side=1000).size == (2000, 1500)
    png = tmp_path / "big.png"
    Image.fromarray(_smooth(600, 400)).save(png)
    assert load_image(png, min_side=50).size == (600, 400)  # only JPEGs are draft-decoded


# --- real photos -----------------------------------------------------------------------------

def test_real_photos_load():
    pad = sorted((SHARED / "pad_ufes_20_subset" / "images").glob("*.png"))[:3]
    isic = sorted((SHARED / "isic2017_dermoscopic_subset" / "images").glob("*.jpg"))[:3]
    if not pad or not isic:
        pytest.skip(f"shared data not found under {SHARED}")
    for path in pad:
        img = load_image(path)
        assert img.mode == "RGB" and img.size == image_size(path)
    for path in isic:
        w, h = image_size(path)
        img = load_image(path, min_side=224)
        assert img.mode == "RGB" and min(img.size) >= 224 and img.width < w


def test_min_long_stops_the_draft_before_the_long_side_gets_too_short(big_jpeg):
    assert load_image(big_jpeg, min_side=180).size == (250, 188)  # 1/8 (2000x1500; the size rounds up)
    assert load_image(big_jpeg, min_side=180, min_long=300).size == (500, 375)  # 1/8 would leave 250 < 300
    box = CropBox(0, 0, 1600, 800)
    assert load_image(big_jpeg, crop=box, min_side=100, min_long=300).size == (400, 200)  # limits apply to the crop
