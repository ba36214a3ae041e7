"""The app's shell: page config, the navigation (our own sidebar links), the model picker, then the chosen page.

Every entry file runs this: `app.py` and each `pages/<name>.py`. Why the pages/ files are entries and the page code
lives in ui/: Streamlit 1.67 still has its legacy multipage mode. Until some script of the server process has
called st.navigation (and under AppTest, on every run), a folder named `pages/` beside the entry script makes
Streamlit build its own navigation from every pages/*.py file and, for a URL such as /predict, run
pages/predict.py by itself, without app.py. An entry that runs the shell makes that harmless with public API only:

- `client.showSidebarNavigation = false` (.streamlit/config.toml) hides the legacy list, so it is never painted;
- whichever entry Streamlit runs, st.navigation here registers the real pages and runs the requested one (a
  deep link works on a fresh server too), and the sidebar shows st.page_link links to exactly these pages.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from ui import common

PAGE_CONFIG = dict(page_title="Skin lesion screening (research)", page_icon=":material/dermatology:", layout="wide")
UI = Path(__file__).resolve().parent
PAGES = (  # (url path = file in ui/, title, icon); the first is the home page
    ("crop", "Crop", ":material/crop:"),
    ("predict", "Predict", ":material/search:"),
    ("dashboard", "Dashboard", ":material/monitoring:"),
    ("train", "Train", ":material/model_training:"),
)


def run() -> None:
    """Draw the app around the page the URL asks for."""
    st.set_page_config(**PAGE_CONFIG)
    pages = [st.Page(UI / f"{name}.py", title=title, icon=icon, url_path=name) for name, title, icon in PAGES]
    # Streamlit gives its default page the URL "/" whatever its url_path, so /crop would be "Page not found": the
    # home page is a second, unlisted entry for the first page's script, and the listed page keeps its own URL.
    name, title, icon = PAGES[0]
    home = st.Page(UI / f"{name}.py", title=title, icon=icon, url_path="home", default=True, visibility="hidden")
    page = st.navigation([home, *pages], position="hidden")
    with st.sidebar:
        with st.container(key="app_nav"):
            for p in pages:
                st.page_link(p)
    common.sidebar()
    page.run()
