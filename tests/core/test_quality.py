"""Tests for core.quality: each warning and refusal fires on the problem it names, and stays quiet on real photos."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from core.images import load_image
from core.quality import (BLUR_THRESHOLD, REFUSE_SIDE, QualityWarning, colour_contrast, laplacian_variance,
                          quality_warnings, refusals, sharpness, colourfulness)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _textured(w: int = 640, h: int = 480, lo: int = 60, hi: int = 200, seed: int = 0,
              block: int = 4) -> Image.Image:
    """Skin-like sharp texture: random `block`-px squares plus a darker blob (a 'lesion')."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(lo, hi, size=(h // block + 1, w // block + 1, 1))
    a = np.kron(blocks, np.ones((block, block, 1)))[:h, :w] * np.array([1.0, 0.8, 0.7])
    y, x = np.mgrid[0:h, 0:w]
    a[(x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 6) ** 2] *= 0.6
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _codes(img: Image.Image, **kw) -> list[str]:
    return [w.code for w in quality_warnings(img, **kw)]


def test_sharp_textured_photo_has_no_warnings():
    assert quality_warnings(_textured()) == []


def test_blurred_photo_warns_blurry_only():
    blurred = _textured().filter(ImageFilter.GaussianBlur(6))
    warnings = quality_warnings(blurred)
    assert [w.code for w in warnings] == ["blurry"]
    assert "blurred" in warnings[0].message and "retake" in warnings[0].message
    assert f"< {BLUR_THRESHOLD:g}" in warnings[0].message
    assert _codes(blurred, blur_threshold=0.0) == []  # threshold is honoured


def test_dark_photo():
    dark = _textured(lo=5, hi=50)
    codes = _codes(dark)
    assert "too_dark" in codes and "too_bright" not in codes
    assert "better light" in quality_warnings(dark)[codes.index("too_dark")].message
    assert "too_dark" not in _codes(dark, dark=10)


def test_bright_photo():
    bright = _textured(lo=235, hi=255).point(lambda v: min(255, v + 40))  # +60 would be refused
    codes = _codes(bright)
    assert "too_bright" in codes and "too_dark" not in codes


def test_tiny_photo():
    tiny = _textured(150, 120)
    warnings = quality_warnings(tiny)
    assert [w.code for w in warnings] == ["too_small"]
    assert "150x120" in warnings[0].message
    assert _codes(tiny, min_side=64) == []


def test_flat_photo_is_low_contrast_not_blurry():
    flat = Image.new("RGB", (400, 300), (150, 120, 110))
    assert _codes(flat, refuse=False) == ["low_contrast"]
    assert _codes(flat) == ["nearly_uniform"]  # with refusals on (the default), a flat colour is refused


@pytest.mark.parametrize("img, code, advice", [
    (Image.new("RGB", (640, 480)), "far_too_dark", "daylight"),                    # an all-black JPEG
    (Image.new("RGB", (640, 480), (252, 252, 252)), "far_too_bright", "daylight"),
    (Image.new("RGB", (640, 480), (224, 172, 150)), "nearly_uniform", "closer"),   # skin-coloured, no lesion
    (_textured(8, 8, block=1), "far_too_small", "closer"),                         # the 8x8 PNG
])
def test_refusals_say_what_to_do(img, code, advice):
    found = refusals(quality_warnings(img))
    assert [w.code for w in found] == [code]
    assert found[0].refusal and advice in found[0].message
    # a refusal replaces its warning: one message per problem
    warning = {"far_too_dark": "too_dark", "far_too_bright": "too_bright", "nearly_uniform": "low_contrast",
               "far_too_small": "too_small"}[code]
    assert warning not in _codes(img) and warning in _codes(img, refuse=False)


def test_refusal_limits_sit_beyond_the_warnings():
    dim = _textured(lo=20, hi=60)  # dark but visible: a warning, not a refusal
    assert "too_dark" in _codes(dim) and not refusals(quality_warnings(dim))
    small = _textured(REFUSE_SIDE + 10, REFUSE_SIDE + 10)
    assert _codes(small) == ["too_small"]
    assert _codes(_textured(REFUSE_SIDE - 1, 200)) == ["far_too_small"]


def test_colour_only_lesion_counts_as_contrast():
    # Pink lesion on pale skin with (almost) equal luma: flat in grayscale, clear in colour.
    a = np.full((300, 400, 3), (200, 170, 160), np.float64)
    a[100:200, 150:250] = (235, 150, 170)
    img = Image.fromarray(a.astype(np.uint8))
    assert np.asarray(img.convert("L"), float).std() < 5
    assert colour_contrast(img) > 5
    assert "low_contrast" not in _codes(img)


def test_sharpness_does_not_depend_on_resolution():
    # The same (band-limited) scene photographed at 2048 and at 1024 px.
    big = _textured(2048, 1536, seed=3, block=16).filter(ImageFilter.GaussianBlur(3))
    half = big.resize((1024, 768), Image.BILINEAR)
    assert sharpness(big) == pytest.approx(sharpness(half), rel=0.2)
    # On native pixels the two would differ several-fold: that is what the working size removes.
    native = [laplacian_variance(np.asarray(i.convert("L"), float)) for i in (big, half)]
    assert native[1] > 3 * native[0]


def test_accepts_non_rgb_modes_but_refuses_black_and_white():
    assert quality_warnings(_textured().convert("RGBA")) == []
    assert quality_warnings(_textured().convert("CMYK")) == []
    grey = quality_warnings(_textured().convert("L"))
    assert [w.code for w in grey] == ["no_colour"] and grey[0].refusal
    assert quality_warnings(_textured().convert("L"), refuse=False) == []  # a warning-only check says nothing


def _text_page(background, ink, size=(390, 844), spacing=24) -> Image.Image:
    """A phone screenshot of text: a flat page, lines of ink, no colour."""
    from PIL import ImageDraw
    page = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(page)
    for y in range(20, size[1] - 20, spacing):
        draw.text((10, y), "Messages  Are you free at 12:45 tomorrow?", fill=ink)
    return page


@pytest.mark.parametrize("page, light", [
    (_text_page((255, 255, 255), (0, 0, 0)), None),                     # brightness 244: white, not blown out
    (_text_page((0, 0, 0), (255, 255, 255)), "almost black"),           # dark mode: brightness 11
    (_text_page((255, 255, 255), (60, 60, 60), spacing=48), "almost white"),  # sparse text: brightness > 245
    (_text_page((30, 30, 30), (200, 200, 200), spacing=96), None)])    # a dim grey page: under the warning
def test_a_screenshot_of_text_is_refused_for_having_no_colour_not_for_the_light(page, light):
    found = quality_warnings(page)
    assert [w.code for w in found if w.code != "blurry"] == ["no_colour"] and found[0].refusal
    message = found[0].message
    assert "screenshot of text" in message and "daylight" not in message
    if light:  # the light is said too, after the colour
        assert light in message and message.index("black-and-white filter") < message.index(light)
    else:
        assert "almost" not in message
    codes = _codes(page)
    assert "too_dark" not in codes and "too_bright" not in codes  # no lighting warning beside it either


def test_a_blown_out_or_black_frame_is_still_refused_for_the_light():
    # nothing in it (contrast below the refusal limit): the light is the problem, and the advice says so
    for colour, code in (((252, 252, 252), "far_too_bright"), ((3, 3, 3), "far_too_dark")):
        found = quality_warnings(Image.new("RGB", (640, 480), colour))
        assert [w.code for w in found] == [code] and "daylight" in found[0].message


def test_warning_is_frozen_value():
    w = QualityWarning("blurry", "x")
    assert w == QualityWarning("blurry", "x")
    with pytest.raises(AttributeError):
        w.code = "too_dark"  # type: ignore[misc]


def test_real_photo_rates():
    """Real smartphone photos mostly pass; heavily blurred copies of them all warn (see core/quality.py)."""
    files = sorted((SHARED / "pad_ufes_20_subset" / "images").glob("*.png"))
    if not files:
        pytest.skip(f"shared data not found under {SHARED}")
    sample = files[::4]  # 126 photos keeps the test to about a second
    least_colourful = min(files, key=lambda p: colourfulness(load_image(p).convert("RGB")))
    assert not refusals(quality_warnings(load_image(least_colourful)))  # the 518's palest photo is still colour
    counts: dict[str, int] = {}
    for path in sample:
        for w in quality_warnings(load_image(path)):
            counts[w.code] = counts.get(w.code, 0) + 1
    rates = {code: n / len(sample) for code, n in counts.items()}
    assert rates.get("blurry", 0) <= 0.05, rates
    assert rates.get("too_small", 0) <= 0.05, rates
    for code in ("too_dark", "too_bright", "low_contrast", "far_too_small", "far_too_dark", "far_too_bright",
                 "nearly_uniform", "no_colour"):
        assert rates.get(code, 0) == 0, rates
    for path in sample[:10]:
        img = load_image(path)
        blurred = img.filter(ImageFilter.GaussianBlur(max(img.size) * 0.01))
        assert "blurry" in _codes(blurred), path.name


def test_colour_contrast_is_the_largest_channel_standard_deviation():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (123, 77, 3), dtype=np.uint8)
    a[..., 1] //= 4  # channels with different spreads, so "largest" matters
    expected = a.reshape(-1, 3).astype(np.float64).std(axis=0).max()
    assert colour_contrast(Image.fromarray(a)) == pytest.approx(expected, rel=1e-9)
