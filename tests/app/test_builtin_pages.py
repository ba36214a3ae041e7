"""AppTest: the built-in demo is offered when RUNS_DIR has no model and always listed; 'Try an example' makes a
shipped photo the current one on Predict."""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from core import builtin
from tests.app.conftest import APP, RUN_NAME

pytestmark = pytest.mark.skipif(not builtin.demo_available(), reason="assets/demo not built")


def app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=120).run()


def test_demo_is_the_default_without_runs_and_listed_last_with_them(without_model, monkeypatch):
    at = app()
    assert not at.exception
    picker = at.sidebar.selectbox(key="model_label")
    assert picker.value == builtin.DEMO_LABEL and picker.options == [builtin.DEMO_LABEL]
    assert "No model loaded" not in "\n".join(i.value for i in at.sidebar.info)
    monkeypatch.setenv("RUNS_DIR", str(without_model.runs))
    at = app()
    picker = at.sidebar.selectbox(key="model_label")
    assert picker.options == [RUN_NAME, builtin.DEMO_LABEL] and picker.value == RUN_NAME


def test_try_an_example_on_predict(without_model):
    at = app()
    at.switch_page("ui/predict.py").run()
    first = builtin.examples()[0]
    at.button(key="predict_example_0").click().run()
    assert not at.exception
    assert at.session_state["photo_name"] == first.path.name
    assert at.session_state["photo_bytes"] == first.path.read_bytes()
    shown = "\n".join(str(m.value) for m in at.markdown)
    assert first.path.name in shown and ("Calibrated probability of malignancy" in shown or "Model score" in shown)


def test_the_demos_calibrated_probability_keeps_its_interval_beside_the_photo_and_answers_result(without_model):
    import re
    at = app()
    at.switch_page("ui/predict.py").run()
    at.button(key="predict_example_1").click().run()
    shown = "\n".join(str(m.value) for m in at.markdown)
    assert re.search(r"### Calibrated probability of malignancy: [<>\d.]+% \(95% interval [<\d]+% to [>\d]+%\)", shown)
    at.selectbox(key="ctx_bleed").set_value("yes").run()  # the demo has a clinical-context stage
    assert not at.exception, at.exception
    photo_alone = [e.value for e in (*at.caption, *at.warning) if "photo alone" in e.value]
    assert photo_alone and re.search(r"calibrated probability [<>\d.]+% \(95% interval [<\d]+% to [>\d]+%\)",
                                     photo_alone[0])



def test_dashboard_opens_on_the_demo_evidence(without_model):
    at = app().switch_page("ui/dashboard.py").run()
    assert not at.exception
    chosen = at.multiselect(key="dash_reports").value
    assert chosen and all(label.startswith("built-in demo: ") for label in chosen)
    assert {"built-in demo: val_report.json", "built-in demo: test_report.json"} <= set(chosen)
    charts = at.get("plotly_chart")
    assert len(charts) >= 4  # ROC, two confusion matrices, at least one PCA scatter
    from core.calibration import ECE_INTERVAL  # the demo's test report has a calibration section: its caveat shows
    assert any(ECE_INTERVAL in c.value for c in at.caption)
