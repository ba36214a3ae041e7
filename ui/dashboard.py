"""Dashboard: saved evaluation reports (no model is run): metrics with 95% CIs in the paper's table layout, a
paired comparison of two reports, confusion matrices, ROC curves, clinical context, subgroups, PCA plots and
example predictions."""
from pathlib import Path

import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from core import appstate, reports
from core.calibration import ECE_INTERVAL
from ui import common


def _roc_figure(curves: list[dict], line=lambda curve: None, legend=None) -> go.Figure:
    """ROC curves (name, fpr, tpr, auc) with the chance diagonal, axes named by what they measure."""
    fig = go.Figure()
    for c in curves:
        name = f"{c['name']} (AUC {c['auc']:.3f})" if c.get("auc") is not None else c["name"]
        fig.add_trace(go.Scatter(x=c["fpr"], y=c["tpr"], mode="lines", name=name, line=line(c)))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"},
                             name="chance", hoverinfo="skip"))
    fig.update_layout(xaxis_title="False positive rate (1 - specificity)", yaxis_title="True positive rate "
                      "(sensitivity)", height=420, margin={"t": 20}, **({"legend": legend} if legend else {}))
    return fig


def _cv_line(curve: dict) -> dict:
    """Fold curves thin, the out-of-fold curve thick black, the nested (ensemble) out-of-fold curve thick dashed."""
    if not curve["oof"]:
        return {"width": 1}
    return {"width": 3, "color": "black"} | ({"dash": "dash"} if curve["name"].startswith("nested") else {})

st.title("Dashboard")
root = appstate.runs_dir()
labels = reports.report_choices(root)
if not labels:
    st.info(f"No evaluation reports in `{root}` yet. Training writes `val_report.json` (and `test_report.json` "
            "with `report_test: true`); `python -m train.evaluate --run runs/NAME --manifest M.csv` writes "
            "`report_*.json`.")
model = st.session_state.get("model_path")
if "dash_reports" not in st.session_state or st.session_state.get("dash_reports_for") != model:
    # a model chosen in the sidebar brings its own reports, also when it is switched on this page
    st.session_state["dash_reports"] = reports.default_choice(labels, model)
    st.session_state["dash_reports_for"] = model
chosen = st.multiselect("Reports", list(labels), key="dash_reports",
                        help="First shown: the reports of the model chosen in the sidebar.")

loaded = {}
for label in chosen:
    try:
        loaded[label] = reports.load_report(labels[label])
    except ValueError as e:
        st.warning(str(e))

if loaded:
    st.subheader("Metrics (95% confidence intervals)")
    st.dataframe(reports.metrics_table(loaded), hide_index=True, width="stretch")
    for label, rep in loaded.items():
        notes = rep.get("notes") or []
        if rep.get("ci_method") or notes:
            st.caption(f"**{label}**: {rep.get('ci_method', '')}" + "".join(f"; {n}" for n in notes))
    if len(loaded) == 2:  # two models: did one beat the other on these photos, or did the photos differ?
        st.markdown(reports.paired_comparison(*[x for item in loaded.items() for x in item]))

    st.subheader("ROC curves")
    curves = [{"name": label, "fpr": rep["roc"]["fpr"], "tpr": rep["roc"]["tpr"],
               "auc": (rep["metrics"].get("roc_auc") or {}).get("value")} for label, rep in loaded.items()
              if rep.get("roc")]
    st.plotly_chart(_roc_figure(curves, legend={"yanchor": "bottom", "y": 0.02, "xanchor": "right", "x": 0.98}),
                    width="stretch", key="roc")

    cv_reports = {label: rep for label, rep in loaded.items() if rep.get("cv")}
    if cv_reports:
        st.subheader("Cross-validation: per-fold and out-of-fold")
    for n, (label, rep) in enumerate(cv_reports.items()):
        st.markdown(f"**{label}**: {rep['cv']['folds']} folds; per-fold metrics at the out-of-fold threshold "
                    f"{rep.get('threshold', 0):.3f}" + (" (no test split: the out-of-fold metrics are the only "
                                                        "internal estimate)" if rep["cv"].get("internal_estimate_only")
                                                        else ""))
        st.dataframe(reports.cv_fold_table(rep), hide_index=True, width="stretch")
        transfer = reports.cv_transfer_text(rep)
        if transfer:
            st.caption(transfer[0].upper() + transfer[1:] + ".")
        for text in (reports.cv_nested_text(rep), reports.cv_context_text(rep)):
            if text:
                st.caption(". ".join(line[0].upper() + line[1:] for line in text.splitlines()) + ".")
        st.plotly_chart(_roc_figure(reports.cv_roc_curves(rep), _cv_line), width="stretch", key=f"cv_roc_{n}")

    context_reports = {label: rep for label, rep in loaded.items() if rep.get("context")}
    if context_reports:
        st.subheader("Clinical context: the photo, the answers, and both")
    for n, (label, rep) in enumerate(context_reports.items()):
        st.markdown(f"**{label}**: image only, answers only, and fused, each at its own threshold (fixed when the "
                    "model was trained); then the fused model with each answer withheld in turn.")
        st.dataframe(reports.context_table(rep), hide_index=True, width="stretch")
        st.plotly_chart(_roc_figure(reports.context_roc_curves(rep)), width="stretch", key=f"context_roc_{n}")
        with st.expander("What each answer adds to the fused logit"):
            st.dataframe(reports.context_weights_table(rep), hide_index=True, width="stretch")
            for field, why in (rep["context"].get("excluded_fields") or {}).items():
                st.caption(f"Not used: {field}, {why}.")

    st.subheader("Calibration and refusals")
    trust = reports.trust_table(loaded)
    if trust.empty:
        st.caption("The chosen reports have no calibration section (reports written before the out-of-distribution "
                   "gate and calibration existed, or validation reports).")
    else:
        st.dataframe(trust, hide_index=True, width="stretch")
        rel = go.Figure()
        for label, rep in loaded.items():
            for kind, bins in reports.reliability_curves(rep).items():
                rel.add_trace(go.Scatter(x=[b["mean_predicted"] for b in bins], y=[b["observed"] for b in bins],
                                         mode="lines+markers", name=f"{label}: {kind}",
                                         text=[f"{b['n']} photos" for b in bins]))
        rel.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"},
                                 name="perfect calibration", hoverinfo="skip"))
        rel.update_layout(xaxis_title="Mean predicted probability (bin)", yaxis_title="Observed share malignant",
                          height=420, margin={"t": 20})
        st.plotly_chart(rel, width="stretch", key="reliability")
        st.caption("Reliability diagram: 10 equal-width bins; a calibrated model's points lie on the diagonal. "
                   "Brier score and ECE with 95% patient-bootstrap intervals in the table above; "
                   f"{ECE_INTERVAL}.")

    st.subheader("Confusion matrices (at each model's threshold)")
    cols = st.columns(min(3, len(loaded)))
    for n, (label, rep) in enumerate(loaded.items()):
        cm = rep.get("confusion_matrix")
        if not cm:
            continue
        fig = px.imshow(cm, text_auto=True, color_continuous_scale="Blues", aspect="equal",
                        x=["not flagged", "flagged"], y=["benign", "malignant"],
                        labels={"x": "prediction", "y": "truth", "color": "images"})
        fig.update_layout(title=f"{label} (threshold {rep.get('threshold', 0):.3f})", height=340,
                          margin={"t": 40, "b": 10}, coloraxis_showscale=False)
        cols[n % len(cols)].plotly_chart(fig, width="stretch", key=f"cm_{n}")

    st.subheader("Subgroups")
    any_sub = False
    for label, rep in loaded.items():
        for kind, table in reports.subgroup_tables(rep).items():
            any_sub = True
            st.markdown(f"**{label}** by {kind}")
            st.dataframe(table, hide_index=True, width="stretch")
    if not any_sub:
        st.caption("The chosen reports have no Fitzpatrick or domain columns.")

st.subheader("PCA of the data (ISIC vs smartphone photos)")
pca_extra = common.typed_path(st.text_input("Another folder with PCA outputs (`python -m train.pca ... --out DIR`)",
                                            key="pca_dir"))
pcas = reports.find_pca(reports.pca_roots(root) + ([Path(pca_extra)] if pca_extra else []))
if not pcas:
    st.caption("No PCA outputs found (a folder with summary.json and CSVs with pc1, pc2 columns).")
for n, res in enumerate(pcas):
    with st.expander(f"{reports.report_label(res.folder, root)}", expanded=n == 0):
        if described := reports.pca_description(res.summary):
            st.caption(described)
        overlap = reports.pca_overlap_table(res.summary)
        if overlap is not None:
            st.dataframe(overlap, hide_index=True, width="stretch")
        for m, table in enumerate(res.tables):
            df = reports.read_pca_table(table)
            color = "domain" if "domain" in df else None
            symbol = "label" if "label" in df else None
            if symbol:
                df["label"] = df["label"].map({0: "benign", 1: "malignant"}).fillna(df["label"].astype(str))
            fig = px.scatter(df, x="pc1", y="pc2", color=color, symbol=symbol, opacity=0.7, title=table.name,
                             hover_data=[c for c in ("image",) if c in df])
            fig.update_layout(height=420, margin={"t": 40})
            st.plotly_chart(fig, width="stretch", key=f"pca_{n}_{m}")
        if res.summary is not None:
            st.caption("Everything the PCA recorded (`summary.json`):")
            st.json(res.summary, expanded=False)

if loaded:
    st.subheader("Example predictions")
    label = st.selectbox("From report", list(loaded), key="dash_examples")
    examples = reports.example_predictions(loaded[label], n=4)
    thr = loaded[label].get("threshold", 0.5)
    for kind in ("correct", "incorrect"):
        st.markdown(f"**Most confident {kind} predictions**")
        rows = examples[kind]
        if not rows:
            st.caption("none")
            continue
        cols = st.columns(4)
        for col, row in zip(cols, rows):
            caption = reports.example_caption(row, thr)
            thumb = common.thumbnail(reports.example_image(row, labels[label]), 160)
            if thumb is not None:
                col.image(thumb, caption=caption)
            else:
                col.caption(f"(image not found) {caption}")

st.caption(common.DISCLAIMER)
