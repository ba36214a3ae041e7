"""Real-browser test: `streamlit run app.py` against the fixture RUNS_DIR, driven by Debian's chromium through
Playwright. Records every navigation the sidebar shows from the first paint on (it must only ever be the app's own:
Crop, Predict, Dashboard, Train); uploads a synthetic lesion photo on the Predict page and waits for the
probability and the Grad-CAM image; screenshots every page (into a tmp folder, and into $SCREENSHOT_DIR when set).

Skipped when /usr/bin/chromium or the playwright package is missing (CI installs chromium)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.app import browser
from tests.app.conftest import ROOT

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"),
    pytest.mark.timeout(240),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(app_env, tmp_path):
    port = _free_port()
    log = open(tmp_path / "streamlit.log", "wb")
    env = {**os.environ, "RUNS_DIR": str(app_env.runs), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
         "--server.headless", "true", "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail("streamlit did not come up:\n" + (tmp_path / "streamlit.log").read_text()[-3000:])
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


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


def _settle(page) -> None:
    """Wait until Streamlit has finished the current run (the 'Running…' status widget is gone)."""
    page.wait_for_timeout(300)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60_000)


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
            prob = page.get_by_text("Probability of malignancy:")
            prob.wait_for(timeout=90_000)
            cam = page.locator('[data-testid="stImage"] img').first
            cam.wait_for(timeout=30_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=cam.element_handle(),
                                   timeout=30_000)
            _settle(page)
            shot = _shot(page, "predict", tmp_path)
            text = page.locator("body").inner_text()
            assert "Probability of malignancy:" in text
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
                assert page.url.rstrip("/").endswith("" if name == "crop" else f"/{name}"), page.url
            assert all(not n["streamlit_nav"] for n in _navigations(page))
        finally:
            chromium.close()
