"""Real-browser test: `streamlit run app.py` against the fixture RUNS_DIR, driven by Debian's chromium through
Playwright. Records every navigation the sidebar shows from the first paint on (it must only ever be the app's own:
Crop, Predict, Dashboard, Train); uploads a synthetic lesion photo on the Predict page and waits for the
probability and the Grad-CAM image; screenshots every page (into a tmp folder, and into $SCREENSHOT_DIR when set).

Skipped when /usr/bin/chromium or the playwright package is missing (CI installs chromium)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.app import browser

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

CHROMIUM, ARGS = browser.CHROMIUM, browser.ARGS

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"),
    pytest.mark.timeout(240),
    pytest.mark.slow,  # starts the app server and a browser
]


@pytest.fixture
def server(app_env, tmp_path):
    try:
        with browser.serve(tmp_path / "streamlit.log", app_env.runs) as url:
            yield url
    except browser.ServerError as e:
        pytest.fail(str(e))


def _shot(page, name: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("SCREENSHOT_DIR"):
        out = Path(os.environ["SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)
    return path


APP_PAGES = ["Crop", "Predict", "Dashboard", "Train"]

# Installed before any page script runs: records each distinct navigation the sidebar shows, from the first paint
# on (Streamlit's own sidebar list and the app's page links), so a list that is replaced a moment later still counts.
RECORD_NAVIGATION = """
window.__navs = [];
const snapshot = () => {
  const own = [...document.querySelectorAll('[data-testid="stSidebar"] [data-testid="stPageLink-NavLink"]')];
  const legacy = [...document.querySelectorAll('[data-testid="stSidebarNav"] a')];
  // a link's text is its icon's ligature name, then its label: keep the label
  const text = els => els.map(e => e.innerText.trim().split('\\n').pop().trim()).filter(t => t).join('|');
  const seen = JSON.stringify({streamlit_nav: text(legacy), app_links: text(own)});
  if (seen !== window.__navs[window.__navs.length - 1]) window.__navs.push(seen);
};
new MutationObserver(snapshot).observe(document, {subtree: true, childList: true, characterData: true});
"""


def _navigations(page) -> list[dict]:
    import json
    return [json.loads(n) for n in page.evaluate("window.__navs")]


_settle = browser.settle


def test_predict_page_in_chromium(server, app_env, tmp_path):
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = chromium.new_page(viewport={"width": 1400, "height": 1700})
            page.add_init_script(RECORD_NAVIGATION)
            # a deep link as the server's very first request: the case where Streamlit's legacy pages/ mode runs
            # pages/predict.py by itself and would list every file in pages/
            page.goto(f"{server}/predict", wait_until="domcontentloaded")
            page.locator("h1", has_text="Predict").first.wait_for(timeout=60_000)
            page.locator('[data-testid="stSidebar"]').get_by_text("mobilenetv2_100").first.wait_for(timeout=30_000)
            _settle(page)
            navs = [n for n in _navigations(page) if n["streamlit_nav"] or n["app_links"]]
            assert navs, "no navigation was ever shown"
            # from the first paint on, only the app's own links (while they render, a prefix of them), never
            # Streamlit's list of the files in pages/ (which would name app, common, ...)
            assert all(not n["streamlit_nav"] for n in navs), f"Streamlit's own page list was painted: {navs}"
            for n in navs:
                links = n["app_links"].split("|")
                assert links == APP_PAGES[:len(links)], navs
            assert navs[-1]["app_links"].split("|") == APP_PAGES, navs
            # the main area's uploader (the sidebar has one too, for bundle zips)
            page.locator('[data-testid="stMain"] input[type="file"]').first.set_input_files(str(app_env.photo))
            prob = page.get_by_text("Model score:")
            prob.wait_for(timeout=90_000)
            cam = browser.heatmap(page)
            cam.wait_for(timeout=30_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=cam.element_handle(),
                                   timeout=30_000)
            _settle(page)
            shot = _shot(page, "predict", tmp_path)
            text = page.locator("body").inner_text()
            assert "Model score:" in text
            assert "What the threshold means" in text and "validation images" in text
            assert "Research tool, not a diagnostic device" in text
            assert page.get_by_text("Grad-CAM on the").count() >= 1
            assert shot.stat().st_size > 10_000
            assert not page.locator('[data-testid="stException"]').count()

            # the other pages, through the sidebar navigation (same session: the photo goes to the Crop page)
            for name in ("crop", "dashboard", "train"):
                browser.nav_link(page, name.capitalize()).click()
                page.locator("h1", has_text=name.capitalize()).first.wait_for(timeout=60_000)
                _settle(page)
                if name == "crop":  # the cropper component (an iframe) shows the photo carried over
                    page.frame_locator("iframe").first.locator("canvas").first.wait_for(timeout=30_000)
                    page.wait_for_timeout(1000)
                if name == "dashboard":
                    page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
                    page.wait_for_timeout(1000)
                _shot(page, name, tmp_path)
                assert not page.locator('[data-testid="stException"]').count(), name
                assert page.url.rstrip("/").endswith(f"/{name}"), page.url
            assert all(not n["streamlit_nav"] for n in _navigations(page))
            # every page's own URL works as a link, the home page's too (Streamlit serves its default page at "/"
            # only, and said "Page not found" for /crop)
            for path, title in (("/crop", "Crop"), ("/", "Crop")):
                page.goto(f"{server}{path}", wait_until="domcontentloaded")
                page.locator("h1", has_text=title).first.wait_for(timeout=60_000)
                _settle(page)
                assert "Page not found" not in page.locator("body").inner_text(), path
        finally:
            chromium.close()
