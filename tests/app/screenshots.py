"""Regenerate the README's screenshots from the real app in headless Chromium, with the built-in demo model:

    python -m tests.app.screenshots            # writes assets/screenshots/*.jpg

Pages: predict (an example lesion), predict-refused (a photo that is not a skin lesion) and predict-unusable
(a nearly black photo) when the model can refuse them, crop, dashboard (the demo's shipped evidence), train.
Needs Debian's chromium (/usr/bin/chromium) and the playwright package (requirements-dev.txt)."""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core import builtin
from tests.app import browser

OUT = builtin.ASSETS / "screenshots"


def _shot(page, out: Path, name: str) -> Path:
    browser.settle(page)
    page.wait_for_timeout(800)  # plotly and the cropper iframe draw after Streamlit settles
    path = out / f"{name}.jpg"
    page.screenshot(path=str(path), full_page=True, type="jpeg", quality=70)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return path


def non_skin_photo() -> bytes:
    """A synthetic street-sign-like scene: sky, a road and text (not a skin lesion)."""
    img = Image.new("RGB", (800, 600), (110, 160, 220))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 380, 800, 600], fill=(70, 70, 75))
    draw.rectangle([300, 120, 520, 300], fill=(20, 110, 40))
    draw.text((330, 190), "EXIT 42", fill=(255, 255, 255))
    for x in range(0, 800, 120):
        draw.rectangle([x, 480, x + 60, 492], fill=(240, 240, 240))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def unusable_photo() -> bytes:
    rng = np.random.default_rng(0)
    arr = np.clip(rng.normal(6, 2, (600, 800, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _upload(page, tmp: Path, name: str, data: bytes) -> None:
    path = tmp / name
    path.write_bytes(data)
    page.locator('[data-testid="stMain"] input[type="file"]').first.set_input_files(str(path))
    page.get_by_text(f"Photo {name}").first.wait_for(timeout=60_000)


def capture(out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        tmp = Path(tmp)
        (tmp / "runs").mkdir()
        with browser.serve(tmp / "streamlit.log", tmp / "runs") as url:
            chromium = browser.launch(p)
            page = chromium.new_page(viewport={"width": 1400, "height": 2600})
            page.goto(f"{url}/predict", wait_until="domcontentloaded")
            browser.wait_for_model(page, builtin.DEMO_LABEL)
            browser.settle(page)
            browser.try_example(page)
            browser.heatmap(page).wait_for(timeout=120_000)
            shots.append(_shot(page, out, "predict"))
            for name, data in (("not_a_lesion.jpg", non_skin_photo()), ("too_dark.jpg", unusable_photo())):
                _upload(page, tmp, name, data)
                shots.append(_shot(page, out, f"predict_{Path(name).stem}"))
            browser.try_example(page)
            for name in ("crop", "dashboard", "train"):
                browser.nav_link(page, name.capitalize()).click()
                page.locator("h1", has_text=name.capitalize()).first.wait_for(timeout=60_000)
                if name == "dashboard":
                    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
                shots.append(_shot(page, out, name))
            chromium.close()
    return shots


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.app.screenshots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if not Path(browser.CHROMIUM).exists():
        print(f"error: {browser.CHROMIUM} not found (apt-get install chromium)", file=sys.stderr)
        return 2
    capture(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
