"""Image-quality checks before a prediction: warnings (the result stands, qualified) and refusals (no verdict)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageStat

# Sharpness and contrast are measured on a grayscale/RGB copy shrunk to this long side, so a 12 MP
# photo and its 1000 px export score alike. Smaller photos are not enlarged: interpolation would add
# blur that is not in the photo (and "too_small" already covers them). 480 rather than 512 so that a
# 12 MP 4:3 photo may be JPEG-drafted to 1/8 (500 x 375) and still be shrunk, not enlarged, to it.
WORK_LONG_SIDE = 480

# Thresholds, measured over all 518 PAD-UFES-20 smartphone photos in shared/data (218-1024 px,
# mostly 300x300-400x300) at a 512 px working size, and re-measured at 480 with the same figures (mean luma
# 85-215); tests/core/test_quality.py re-checks the rates on a sample:
# - sharpness (Laplacian variance): PAD median 70, 1st percentile 6.2, minimum 4.5; copies blurred with
#   a Gaussian of sigma = 1% of the long side score at most 4.2 (sigma 0.5%: 70% fall below 5).
#   At 5, 2/518 (0.4%) PAD photos warn - both visibly soft - and every heavily blurred copy does.
# - mean luma: PAD ranges 86-215, so 0% warn. The dark limit is kept far below that on purpose: PAD is
#   mostly light skin, and a well-exposed photo of very dark skin (Fitzpatrick V-VI) is much darker
#   on average without being a bad photo.
# - contrast (largest per-channel standard deviation): PAD minimum 6.6, 0% warn. Pale lesions on pale
#   skin differ mostly in colour (luma std goes down to 5.3), so luma alone would flag usable photos.
# - too_small: 1 of 518 PAD photos (0.2%) has a short side below 224 (218 px).
# The 243 ISIC 2017 dermoscopic images (1024 px JPEGs) trigger no warning at all, decoded in full or as the
# app decodes them (core.dataset.decode_limits).
BLUR_THRESHOLD = 5.0
DARK_THRESHOLD = 40.0
BRIGHT_THRESHOLD = 225.0
MIN_CONTRAST = 5.0
MIN_SIDE = 224

# Refusals: photos the model cannot assess at all, so no verdict is given. Measured on the same 518 PAD photos
# (decoded as the app decodes them): mean luma 85.5-215 (1st-99th percentile 95-202), colour contrast >= 6.6
# (1st percentile 10.5), short side >= 218. Each refusal limit sits far outside that range, so it refuses none
# of the 518 (nor any of the 361 ISIC images in shared/data); what it catches is what no clinician would call a
# lesion photo: a black or blown-out frame, a uniform colour, a thumbnail.
# - far too dark: luma < 15 (almost nothing is visible; a well-exposed photo of Fitzpatrick VI skin is far above);
# - far too bright: luma > 245 (almost all pixels saturated);
# - nearly uniform: largest channel std < 2.5 (JPEG noise on a flat colour is about 0.5-2);
# - far too small: short side < 96 px (the model would see a > 2.3x interpolated enlargement, mostly invented
#   pixels).
# - no colour: mean colourfulness (max - min channel, per pixel) < 1.5, i.e. a black-and-white image. The 518 PAD
#   photos have 4.6 at the least (1st percentile 10.2, median 44.6), the 361 ISIC images 8.4 at the least; a
#   greyscale image has 0. Added after the gate accepted three greyscale scientific images (cells, a fundus crop,
#   the moon) on the built-in demo: the limit itself comes from the real photos above, not from those images.
REFUSE_DARK = 15.0
REFUSE_BRIGHT = 245.0
REFUSE_CONTRAST = 2.5
REFUSE_SIDE = 96
REFUSE_CHROMA = 1.5


@dataclass(frozen=True)
class QualityWarning:
    """One problem with a photo: a stable code for the app and a plain-English message for the clinician."""
    code: str  # "too_small" | "blurry" | "too_dark" | "too_bright" | "low_contrast" (warnings); refusals:
    #            "far_too_small" | "far_too_dark" | "far_too_bright" | "nearly_uniform" | "no_colour"
    message: str
    refusal: bool = False  # True: the photo cannot be assessed at all (no verdict), not merely a caveat


def refusals(items: list[QualityWarning]) -> list[QualityWarning]:
    """The refusals among quality_warnings' results (an empty list: the photo may be assessed)."""
    return [w for w in items if w.refusal]


def quality_warnings(img: Image.Image, *, min_side: int = MIN_SIDE, blur_threshold: float = BLUR_THRESHOLD,
                     dark: float = DARK_THRESHOLD, bright: float = BRIGHT_THRESHOLD,
                     min_contrast: float = MIN_CONTRAST, refuse: bool = True) -> list[QualityWarning]:
    """Every quality problem found in `img` (an empty list means the photo looks usable).

    With `refuse`, a problem far beyond its warning limit comes back as a refusal (``refusal=True``) instead of
    its warning: the photo gets no verdict."""
    out: list[QualityWarning] = []
    w, h = img.size
    if refuse and min(w, h) < REFUSE_SIDE:
        out.append(QualityWarning(
            "far_too_small", f"The photo is only {w}x{h} pixels (shortest side {min(w, h)} < {REFUSE_SIDE}): far "
                             "too small to assess. Retake it closer, with the lesion filling most of the frame, "
                             "and send the original photo rather than a thumbnail.", True))
    elif min(w, h) < min_side:
        out.append(QualityWarning(
            "too_small", f"The photo is only {w}x{h} pixels (shortest side {min(w, h)} < {min_side}); "
                         "use a higher-resolution photo or a larger crop around the lesion."))
    rgb = _working_copy(img)
    luma = np.asarray(rgb.convert("L"), dtype=np.float32)
    brightness = float(luma.mean(dtype=np.float64))
    contrast, chroma = colour_contrast(rgb), colourfulness(rgb)
    # A black-and-white image with something in it (a screenshot of text, a scanned page, a greyscale picture) is
    # refused for having no colour. Its brightness is the page's, not the light's: no lighting advice for it.
    monochrome = refuse and chroma < REFUSE_CHROMA and contrast >= REFUSE_CONTRAST
    if monochrome:
        pass
    elif refuse and brightness < REFUSE_DARK:
        out.append(QualityWarning(
            "far_too_dark", f"The photo is almost black (brightness {brightness:.0f} < {REFUSE_DARK:.0f} out of "
                            "255): nothing can be assessed. Retake it in daylight or good indoor light.", True))
    elif refuse and brightness > REFUSE_BRIGHT:
        out.append(QualityWarning(
            "far_too_bright", f"The photo is almost white (brightness {brightness:.0f} > {REFUSE_BRIGHT:.0f} out of "
                              "255): nothing can be assessed. Retake it in daylight without flash or direct "
                              "sunlight on the skin.", True))
    elif brightness < dark:
        out.append(QualityWarning(
            "too_dark", f"The photo looks too dark (brightness {brightness:.0f} < {dark:.0f} out of 255); "
                        "retake it in better light."))
    elif brightness > bright:
        out.append(QualityWarning(
            "too_bright", f"The photo looks overexposed (brightness {brightness:.0f} > {bright:.0f} "
                          "out of 255); retake it without flash glare or direct sunlight."))
    if refuse and contrast < REFUSE_CONTRAST and not any(x.code in ("far_too_dark", "far_too_bright") for x in out):
        out.append(QualityWarning(
            "nearly_uniform", f"The photo is nearly one flat colour (contrast {contrast:.1f} < {REFUSE_CONTRAST:g}): "
                              "there is no lesion to assess. Retake it closer, in focus, with the lesion in the "
                              "centre of the frame and the lens clean.", True))
    elif contrast < min_contrast and not (refuse and contrast < REFUSE_CONTRAST):
        out.append(QualityWarning(
            "low_contrast", f"The photo has very little contrast ({contrast:.1f} < {min_contrast:.0f}); "
                            "check that the lesion is in frame and the lens is clean."))
    if refuse and not any(x.refusal for x in out) and chroma < REFUSE_CHROMA:
        out.append(QualityWarning(
            "no_colour", f"The photo has no colour (colourfulness {chroma:.1f} < {REFUSE_CHROMA:g}: a black-and-white "
                         "image, such as a screenshot of text or a scanned page): the model needs a colour photo of "
                         "the skin. If this is a lesion, retake it with the phone's normal camera, without a "
                         "black-and-white filter" + _page_light(brightness) + ".", True))
    score = laplacian_variance(luma)
    # A flat image has no edges at all; "low contrast" already explains it, so don't also blame focus.
    if score < blur_threshold and contrast >= min_contrast:
        out.append(QualityWarning(
            "blurry", f"The photo looks blurred (sharpness {score:.1f} < {blur_threshold:g}); "
                      "retake it in focus, holding the phone steady."))
    return out


def _page_light(brightness: float) -> str:
    """For a black-and-white image that is also almost black or white: the light, said second (a page of text is
    white because it is a page, a photo because of the flash)."""
    if brightness > REFUSE_BRIGHT:
        return f", and without flash or direct sunlight (it is almost white: brightness {brightness:.0f})"
    if brightness < REFUSE_DARK:
        return f", and in better light (it is almost black: brightness {brightness:.0f})"
    return ""


def sharpness(img: Image.Image) -> float:
    """Laplacian variance of the grayscale working copy (higher is sharper)."""
    return laplacian_variance(np.asarray(_working_copy(img).convert("L"), dtype=np.float32))


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian: edges and fine texture raise it, defocus lowers it."""
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    lap = (gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1]
           - 4.0 * gray[1:-1, 1:-1])
    return float(lap.var(dtype=np.float64))


def colour_contrast(rgb: Image.Image) -> float:
    """Largest per-channel standard deviation, so red-on-pink lesions count as contrast."""
    return float(max(ImageStat.Stat(rgb).stddev))  # from per-band histograms: exact, and 10x faster than numpy


def colourfulness(rgb: Image.Image) -> float:
    """Mean over pixels of (largest - smallest channel): 0 for a black-and-white image, tens for skin photos."""
    a = np.asarray(rgb, dtype=np.int16)
    return float((a.max(axis=2) - a.min(axis=2)).mean())


def _working_copy(img: Image.Image) -> Image.Image:
    """RGB copy whose long side is at most WORK_LONG_SIDE (antialiased downscale, never enlarged)."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    w, h = rgb.size
    scale = WORK_LONG_SIDE / max(w, h)
    if scale >= 1:
        return rgb
    return rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
