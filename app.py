"""Skin-lesion screening research app: `streamlit run app.py` (models and runs come from RUNS_DIR, default runs/).

Pages: Crop (no model needed), Predict, Dashboard (saved reports), Train (background training runs).
Research tool, not a diagnostic device.
"""
import streamlit as st

from pages import common

st.set_page_config(**common.PAGE_CONFIG)

page = st.navigation([
    st.Page("pages/crop.py", title="Crop", icon=":material/crop:"),
    st.Page("pages/predict.py", title="Predict", icon=":material/search:"),
    st.Page("pages/dashboard.py", title="Dashboard", icon=":material/monitoring:"),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
])
common.sidebar()
page.run()
