"""Real-app plumbing shared by the browser tests and the screenshot script: start `streamlit run app.py` on a free
local port, drive Debian's chromium through Playwright, wait for Streamlit to settle, take screenshots."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
# Without the networking flags Chromium floods the closed network with update and sync requests.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


class ServerError(RuntimeError):
    """streamlit did not come up; the message holds the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(log_path: Path, runs_dir: Path | None = None, timeout: float = 60):
    """Yield the URL of a running app; runs_dir None leaves RUNS_DIR unset (the app's own default, runs/)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RUNS_DIR"} | {"PYTHONUNBUFFERED": "1"}
    if runs_dir is not None:
        env["RUNS_DIR"] = str(runs_dir)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
             "--server.headless", "true", "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, log_path, timeout)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(url: str, proc, log_path: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().decode().strip() == "ok":
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise ServerError("streamlit did not come up:\n" + Path(log_path).read_text(errors="replace")[-3000:])
        time.sleep(0.3)


def settle(page) -> None:
    """Wait until Streamlit has finished the current run (the 'Running…' status widget is gone)."""
    page.wait_for_timeout(300)
    # no 'Running…' widget and no element still greyed out from the previous run
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]') && "
                           "!document.querySelector('[data-stale=\"true\"]')", timeout=90_000)


def wait_for_image(page, locator) -> None:
    locator.wait_for(timeout=60_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=locator.element_handle(),
                           timeout=30_000)


def wait_for_model(page, label: str) -> None:
    """Wait until the sidebar's model picker (a combobox input: its value is the label) shows `label`."""
    page.wait_for_function(
        "l => [...document.querySelectorAll('[data-testid=\"stSidebar\"] input[aria-label=\"Model bundle\"]')]"
        ".some(i => i.value === l)", arg=label, timeout=90_000)


def try_example(page, n: int = 0) -> None:
    """Click the n-th 'Try this one' button, opening the examples expander first when it is closed."""
    button = page.get_by_role("button", name="Try this one").nth(n)
    if not button.is_visible():
        page.get_by_text("Try an example photo").first.click()
    button.click()


def heatmap(page):
    """The Predict page's heat-map image (its caption says what the model saw), not an example thumbnail."""
    return page.locator('[data-testid="stMain"] [data-testid="stImage"]').filter(has_text=" on the ").locator("img").first


def nav_link(page, title: str):
    """The app's own sidebar link to a page (ui/shell.py draws them with st.page_link)."""
    return page.locator('[data-testid="stSidebar"] [data-testid="stPageLink-NavLink"]', has_text=title).first


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
