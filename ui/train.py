"""Train: start `python -m train.fit` in the background (one job at a time), watch it, stop or resume it.
All state lives in the run folders, so refreshing or restarting the app loses nothing."""
import time
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from core import appstate, jobs, runfolder
from core.backbones import BACKBONES
from ui import common

st.title("Train")
root = appstate.runs_dir()
job = jobs.current_job(root)
if job:
    st.info(f"Training **{job['run']}** on **{job['device']}** (pid {job['pid']}). One job at a time: a new one "
            "can start when it finishes or is stopped.")

# ------------------------------------------------------------------ new run
with st.expander("Start a new run", expanded=job is None):
    recipes = jobs.list_recipes()
    if not recipes:
        st.error(f"No recipes in {jobs.RECIPES_DIR}")
        st.stop()
    default_recipe = next((i for i, r in enumerate(recipes) if r.stem == "shared_demo"), 0)
    recipe = st.selectbox("Recipe", recipes, index=default_recipe, format_func=lambda p: p.name,
                          key="train_recipe", help="train/configs/*.yaml: shared_demo runs offline on ../shared; the paper_* recipes "
                               "need the ISIC / MIDAS manifests named inside.")
    summary = jobs.recipe_summary(recipe)
    st.caption("Stages: " + "; ".join(f"{s['name']} ({s['epochs']} epochs, lr {s['lr']}, data "
                                      f"{', '.join(map(str, s['data']))})" for s in summary["stages"]))
    finished = [r for r in jobs.list_runs(root) if r.has_bundle]
    names = list(BACKBONES)
    with st.form(f"train_form_{recipe.stem}"):
        k = recipe.stem  # widget keys per recipe: switching recipe resets the fields to its values
        name = st.text_input("Run name (folder under RUNS_DIR)", key=f"tf_name_{k}",
                             value=f"{summary['name']}-{time.strftime('%Y%m%d-%H%M')}")
        c1, c2 = st.columns(2)
        backbone = c1.selectbox("Backbone", names, index=names.index(summary["backbone"])
                                if summary["backbone"] in names else 0, key=f"tf_backbone_{k}")
        weights = c2.text_input("Initial weights ('imagenet', 'none' or a file)", value=str(summary["weights"]),
                                key=f"tf_weights_{k}")
        init_options = ["(recipe: " + (summary["init_from"] or "none") + ")", "none"] + [r.name for r in finished]
        init_choice = c1.selectbox("Start from a previous run (transfer)", init_options, key=f"tf_init_{k}")
        device = c2.selectbox("Device", jobs.DEVICES,
                              index=jobs.DEVICES.index(summary["device"]) if summary["device"] in jobs.DEVICES
                              else 0, key=f"tf_device_{k}")
        epochs = c1.number_input("Epochs per stage (0 = recipe)", min_value=0, max_value=500, value=0,
                                 key=f"tf_epochs_{k}")
        lr = c2.text_input("Learning rate for every stage (blank = recipe)", value="", key=f"tf_lr_{k}")
        manifest = c1.text_input("Data: a manifest CSV replacing every stage's data (optional)", value="",
                                 key=f"tf_manifest_{k}")
        domain = c2.text_input("Domain label for that manifest (optional)", value="", key=f"tf_domain_{k}")
        folds = c2.number_input("Cross-validation folds (0 = one validation split)", min_value=0, max_value=20,
                                value=summary["folds"], key=f"tf_folds_{k}",
                                help="K >= 2: the non-test patients are cut into K folds, one run per fold (each "
                                     "validated on its own fold), and the K models become one ensemble; the "
                                     "threshold is chosen on the out-of-fold predictions. K times the training time.")
        nested = c2.checkbox("Nested cross-validation (the ensemble's threshold on ensemble scores)",
                             value=summary["nested"], key=f"tf_nested_{k}",
                             help="Needs K >= 3 folds. One more run per pair of folds (K(K-1)/2 runs, each on "
                                  "(K-2)/K of the patients), so that every photo is scored by an ensemble that never "
                                  "trained on it; the ensemble's threshold and calibration are chosen on those scores. "
                                  "A single model's out-of-fold threshold, applied to the averaged ensemble, misses "
                                  "its target sensitivity. About 2.4 times the training time at K = 5.")
        data_root = c1.text_input("Data folder the recipe's data paths live in", value=summary["data_root"] or "",
                                  key=f"tf_data_root_{k}", help="The recipe's data_root: change it when your copy "
                                  "of the recipe's datasets is elsewhere (e.g. a downloaded PAD-UFES-20).")
        submitted = st.form_submit_button("Start training", type="primary")
    if submitted:
        sets = ()
        init_from = None
        weights, manifest, data_root = map(common.typed_path, (weights, manifest, data_root))
        if init_choice == "none":
            sets = ("init_from=null",)
        elif not init_choice.startswith("(recipe"):
            init_from = str(root / init_choice)
        try:
            req = jobs.TrainRequest(recipe=str(recipe), name=name.strip(),
                                    backbone=backbone if backbone != summary["backbone"] else None,
                                    weights=weights if weights != str(summary["weights"]) else None,
                                    init_from=init_from, epochs=int(epochs) or None, lr=lr.strip() or None,
                                    device=device,
                                    manifest=manifest or None, domain=domain.strip() or None, sets=sets,
                                    folds=int(folds) if int(folds) != summary["folds"] else None,
                                    nested=bool(nested) if bool(nested) != summary["nested"] else None,
                                    data_root=data_root if data_root != (summary["data_root"] or "") else None)
            with st.spinner("Checking the run's data, weights and starting run…"):
                record = jobs.start_training(req, root)
        except ValueError as e:  # LaunchError: every problem of the request, or of the run's inputs
            st.error(f"Not started: {e}")
        except jobs.TrainingBusy as e:
            st.error(f"Not started: {e}")
        else:
            st.success(f"Started **{record['run']}** on {record['device']} (pid {record['pid']}).")
            st.session_state["train_watch"] = record["run"]
            job = record
    st.caption("This recipe as it stands, from a terminal: `" + " ".join(jobs.training_command(
        jobs.TrainRequest(recipe=str(recipe.relative_to(appstate.PROJECT_ROOT)), name=summary["name"]),
        appstate.shown_path(Path(root) / summary["name"]), python="python")) + "`")

# ------------------------------------------------------------------ runs
runs = jobs.list_runs(root)
st.subheader("Runs")
if not runs:
    st.caption(f"No runs in `{root}` yet.")
    st.stop()

run_names = [r.name for r in runs]
default = st.session_state.get("train_watch") or (job or {}).get("run")
if st.session_state.get("train_watch") not in run_names:
    st.session_state["train_watch"] = default if default in run_names else run_names[0]
watched = st.selectbox("Show run", run_names, key="train_watch")
run_path = root / watched


def _stop(path, force: bool = False) -> None:
    st.session_state["train_msg"] = jobs.stop_training(path, force=force)


def _resume(path) -> None:
    try:
        rec = jobs.resume_training(path, root)
        st.session_state["train_msg"] = f"resumed {rec['run']} (pid {rec['pid']})"
    except (jobs.TrainingBusy, ValueError) as e:
        st.session_state["train_msg"] = f"Not resumed: {e}"


def progress_panel() -> None:
    st.dataframe(jobs.runs_table(jobs.list_runs(root)), hide_index=True, width="stretch")
    info = jobs.run_info(run_path)
    was_alive = st.session_state.get("_train_alive")
    st.session_state["_train_alive"] = info.alive
    if was_alive is not None and was_alive != info.alive:
        # the job ended (refresh the model picker, stop polling) or was resumed (start polling)
        st.rerun(scope="app")
    where = info.progress()
    st.markdown(f"**{info.name}**: {info.state}" + (f" · {where}" if where else ""))
    if info.error:
        st.error(info.error)
    if info.cv:
        share, text = info.cv_progress()
        st.progress(share, text=text)
    if info.alive and info.epoch is not None and info.epochs:
        st.progress(min(1.0, (info.epoch) / info.epochs), text=where)
    b1, b2, b3 = st.columns(3)
    if info.alive:
        b1.button("Stop (keeps the finished epochs)", on_click=_stop, args=(run_path,), key="stop_btn")
        b2.button("Force stop", on_click=_stop, args=(run_path, True), key="kill_btn",
                  help="Kills the trainer and its workers at once: the current epoch is lost (resume from the last "
                       "checkpoint)")
    elif info.resumable:
        b1.button("Resume", on_click=_resume, args=(run_path,), key="resume_btn", disabled=job is not None)
    elif info.state == "stopped" and not info.has_bundle:
        st.warning("Stopped before its first epoch finished: nothing was saved, so it cannot be resumed. Start it "
                   "again.")
    if st.session_state.get("train_msg"):
        b3.caption(st.session_state["train_msg"])
    m = runfolder.read_fold_metrics(run_path) if info.cv else runfolder.read_metrics(run_path)
    if not m.empty:
        fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss", "Validation ROC-AUC"))
        # one set of lines per fold of a cross-validation (each validated on its own fold)
        for fold, part in (m.groupby("fold") if "fold" in m else [(None, m)]):
            tag = "" if fold is None else f"fold {fold} "
            hover = (part["stage_name"].astype(str) + " epoch " + part["epoch"].astype(str)
                     if "stage_name" in part else None)
            for col, dash in (("train_loss", None), ("val_loss", "dot")):
                if col in part:
                    fig.add_trace(go.Scatter(x=part["step"], y=part[col], name=f"{tag}{col}", line={"dash": dash},
                                             text=hover), row=1, col=1)
            if "val_roc_auc" in part:
                fig.add_trace(go.Scatter(x=part["step"], y=part["val_roc_auc"], name=f"{tag}val ROC-AUC",
                                         text=hover), row=1, col=2)
        fig.update_xaxes(title_text="epoch (all stages)")
        fig.update_layout(height=320, margin={"t": 40, "b": 10})
        st.plotly_chart(fig, width="stretch", key="train_curves")
    tail = runfolder.log_tail(run_path, runfolder.LOG, 25)
    console = runfolder.log_tail(run_path, runfolder.CONSOLE, 25)
    if tail:
        st.code(tail, language=None)
    if console and (info.state in ("failed", "starting") or not tail):
        st.caption(f"{runfolder.CONSOLE} (stdout/stderr of the process)")
        st.code(console, language=None)


info_now = jobs.run_info(run_path)
# Poll the run folder every 2 s while the process lives; a finished run is drawn once.
st.fragment(progress_panel, run_every=2 if info_now.alive else None)()
st.caption(common.DISCLAIMER)
