"""Skin-lesion screening research app: `streamlit run app.py` (models and runs come from RUNS_DIR, default runs/).

Pages: Crop (no model needed), Predict, Dashboard (saved reports), Train (background training runs); their code is
in ui/, the shell that draws navigation and sidebar in ui/shell.py. Research tool, not a diagnostic device.
"""
from ui.shell import run

run()
