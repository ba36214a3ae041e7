"""Cross-validated training: K fold runs, out-of-fold predictions, the ensemble.

The test patients are held out once (as a single-split run holds them out); the other patients are cut into K
patient-grouped, label-stratified folds (core.splits.assign_folds, saved in the run folder so a resume reuses
them). Fold k is an ordinary run (core.training.fit) in folds/fold_<k>: fold k validates it (best epoch per stage),
the other folds train it. Every non-test photo is then scored once by the fold model that never trained on it
(the out-of-fold predictions); the recipe's threshold rule and the calibration are fitted on those, and the K
fold models are saved as one ensemble bundle (core.ensemble), evaluated once on the test patients. With cv.nested,
pair runs in nested/pair_<k>_<j> follow the fold runs (core.nested), and the ensemble's threshold and calibration
are fitted on their ensemble scores instead. A recipe's context stage is fitted on those same scores
(core.context_fit.fit_context_cv); the fold and pair runs fit none of their own.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import yaml

from core import metrics, nested, runfolder
from core.bundle import Threshold, load_bundle, read_meta
from core.config import ConfigError, CVConfig, RunConfig
from core.evaluation import build_report, groups_of, resample_unit
from core.fileio import atomic_write_json, report_data
from core.manifest import ManifestError, read_manifest, write_manifest
from core.runfolder import BUNDLE, CV_REPORT, RunFolder
from core.scores import sigmoid
from core.splits import TEST_FOLD, FixedSplit, assign_folds, fold_split, grouping, pair_split, split_counts

OOF_COLUMNS = ("image", "label", "patient_id", "fold", "prob", "logit")


def fold_config(cfg: RunConfig, k: int) -> RunConfig:
    """Fold k's run: the recipe as one ordinary run on the fold's split, with its own seed, no test report and no
    context stage (the ensemble's is fitted on the out-of-fold scores).

    split.val is only descriptive there (the fold decides the split): about the share one fold holds."""
    val = round((1 - cfg.split.test) / cfg.cv.folds, 4)
    return replace(cfg, name=f"{cfg.name}.fold_{k}", seed=cfg.seed + k, report_test=False, cv=CVConfig(),
                   split=replace(cfg.split, val=val), context=None)  # the ensemble's context stage comes after


def is_main_process() -> bool:
    """Rank 0 (or the only process). Read from the launcher's environment: the fold runs' Fabric does not exist yet
    when the top folder is set up, and a DDP launch re-runs this whole command on every rank."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


def _distributed(cfg: RunConfig) -> bool:
    return cfg.devices * cfg.num_nodes > 1


# ---------------------------------------------------------------- folds
def make_folds(cfg: RunConfig, rf: RunFolder) -> tuple[pd.DataFrame, list[pd.DataFrame], str]:
    """The run's fold assignment (computed once, then read back: a resumed run keeps its folds), every stage's
    rows with the ensemble's split (test, else train: every non-test photo trains some member), and how."""
    from core.training import stage_rows
    stages, union = stage_rows(cfg)
    folds, how = assign_folds(union, cfg.cv.folds, cfg.split)
    saved = runfolder.read_folds(rf.out)
    if saved is not None:
        if set(saved["image"]) != set(union["image"]):
            raise ManifestError(f"{rf.out / runfolder.FOLDS} lists other images than the recipe's data now has: "
                                "the data changed since this run started; start a new run")
        if int(saved["fold"].max()) + 1 != cfg.cv.folds:
            raise ConfigError(f"{rf.out} was split into {int(saved['fold'].max()) + 1} folds, not "
                              f"{cfg.cv.folds}; resume it with its own config")
        folds = folds.drop(columns=["split", "fold"]).merge(saved[["image", "split", "fold"]], on="image")
        how += " (as assigned when the run started)"
    elif rf.is_main:
        runfolder.write_folds(rf.out, folds)
    split_of = dict(zip(folds["image"], folds["split"]))
    return folds, [df.assign(split=df["image"].map(split_of)) for df, _ in stages], how


def _fold_done(fold_dir: Path) -> bool:
    return runfolder.has_bundle(fold_dir) and runfolder.read_status(fold_dir).get("state") == "finished"


# ---------------------------------------------------------------- the run
def fit_cv(cfg: RunConfig, out: str | Path, resume: bool = False) -> Path:
    """Train the K fold runs (skipping finished ones, resuming a stopped one), then the out-of-fold predictions,
    threshold, calibration, reports and the ensemble bundle; returns the bundle folder."""
    from core import training
    if not cfg.cv.enabled:
        raise ConfigError("fit_cv needs cv.folds >= 2")
    out, k_folds = Path(out), cfg.cv.folds
    rf = RunFolder(out, is_main=is_main_process())
    training._install_stop_handler(distributed=_distributed(cfg))
    training._watch_stop_requests(rf)
    stored_nested = bool((runfolder.read_config(out).get("cv") or {}).get("nested")) if resume else False
    if not resume or cfg.cv.nested != stored_nested:  # a resumed run keeps its config, unless nested was switched
        rf.write_config(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    done = [k for k in range(k_folds) if _fold_done(runfolder.fold_path(out, k))] if resume else []
    all_pairs = nested.pairs(k_folds) if cfg.cv.nested else []
    pairs_done = [p for p in all_pairs if _fold_done(runfolder.pair_path(out, *p))] if resume else []

    def progress(fold=None, pair=None) -> dict:
        state = {"folds": k_folds, "fold": fold, "done": list(done)}
        if cfg.cv.nested:
            state.update(pairs=len(all_pairs), pair=None if pair is None else list(pair),
                         pairs_done=[list(p) for p in pairs_done])
        return {"cv": state}

    rf.status(state="running", started=time.time(), **progress())
    try:
        folds, stages, how = make_folds(cfg, rf)
        if rf.is_main:
            for i, (stage, df) in enumerate(zip(cfg.stages, stages)):
                write_manifest(df, rf.split_path(i, stage.name), relative=False)
        if resume and cfg.cv.nested != stored_nested:
            rf.log(f"resumed with cv.nested {'on' if cfg.cv.nested else 'off'} (it was "
                   f"{'on' if stored_nested else 'off'}): config.yaml updated; the finished folds are kept, and the "
                   "threshold, calibration, reports and bundle are made again")
        rf.log(f"cross-validation, {k_folds} folds: {how}; {_fold_counts(folds)}" +
               (f"; folds already done: {', '.join(map(str, done))}" if done else "") +
               (f"; nested: {len(all_pairs)} pair runs, {len(pairs_done)} already done" if all_pairs else ""))
        for k in range(k_folds):
            if k in done:
                continue
            rf.status(**progress(fold=k), stage=None, stage_name=None, epoch=None, epochs=None)
            split = FixedSplit(fold_split(folds, k), f"cross-validation fold {k} of {k_folds} ({how})")
            _train_member(rf, cfg, fold_config(cfg, k), runfolder.fold_path(out, k), split,
                          f"fold {k + 1}/{k_folds}")
            done.append(k)
            rf.status(**progress())
        for n, (k, j) in enumerate(all_pairs):
            if (k, j) in pairs_done:
                continue
            rf.status(**progress(pair=(k, j)), stage=None, stage_name=None, epoch=None, epochs=None)
            split = FixedSplit(pair_split(folds, k, j), f"nested cross-validation: folds {k} and {j} of {k_folds} "
                                                        f"left out ({how})")
            _train_member(rf, cfg, nested.pair_config(cfg, k, j), runfolder.pair_path(out, k, j), split,
                          f"pair {n + 1}/{len(all_pairs)} (folds {k} and {j} left out)")
            pairs_done.append((k, j))
            rf.status(**progress())
        if not rf.is_main:
            return out / BUNDLE
        rf.status(**progress(None), stage=None, stage_name="out-of-fold predictions and ensemble", epoch=None,
                  epochs=None)
        bundle = finish_cv(rf, cfg, stages, how)
        if training._stop_reason():
            rf.log("a stop was requested during the final reports; the run finished first")
            rf.clear_stop()
        rf.status(state="finished", finished=time.time(), stage_name=None, **progress(None))
        return bundle
    except (training.Stopped, KeyboardInterrupt) as e:
        rf.log(f"stopped on request ({str(e) or type(e).__name__}); folds done: {len(done)} of {k_folds}; "
               "resume with --resume")
        rf.status(state="stopped")  # keeps the fold, stage and epoch it stopped in
        rf.clear_stop()
        raise
    except Exception as e:
        rf.log(f"failed: {type(e).__name__}: {e}")
        rf.status(state="failed", error=f"{type(e).__name__}: {e}")
        raise


def _train_member(rf: RunFolder, cfg: RunConfig, member: RunConfig, run: Path, split: FixedSplit, label: str) -> None:
    """Train (or resume) one fold or pair run in its own folder, logged and stoppable through the top one."""
    from core import training
    if not _distributed(cfg):  # under DDP the member run's own (collective) check_stop sees the request
        _check_stop_between_folds()
    rf.log(f"{label}: {run.relative_to(rf.out)}" + (" (resuming)" if runfolder.has_checkpoint(run) else ""))
    training.fit(member, run, resume=runfolder.has_checkpoint(run), split=split, parent=rf.out)
    training._watch_stop_requests(rf)  # the member run watched its own folder and this one; back to this one


def _check_stop_between_folds() -> None:
    from core.training import Stopped, _stop_reason
    reason = _stop_reason()
    if reason:
        raise Stopped(reason)


def _fold_counts(folds: pd.DataFrame) -> str:
    parts = []
    for k, part in folds[folds["fold"] != TEST_FOLD].groupby("fold"):
        parts.append(f"fold {k}: {len(part)} photos ({int(part['label'].sum())} malignant)")
    test = folds[folds["fold"] == TEST_FOLD]
    parts.append(f"test: {len(test)} photos ({int(test['label'].sum())} malignant)" if len(test) else "no test split")
    return "; ".join(parts)


# ---------------------------------------------------------------- after the folds
def out_of_fold(run: Path, cfg: RunConfig) -> tuple[pd.DataFrame, list]:
    """Every fold model's fp32 logits on its own validation fold (the last stage's rows), in one frame, and the
    loaded fold bundles in fold order."""
    from core.trust import features_and_logits
    last = len(cfg.stages) - 1
    parts, members = [], []
    for k in range(cfg.cv.folds):
        fold_dir = runfolder.fold_path(run, k)
        b = load_bundle(fold_dir / BUNDLE)
        split = read_manifest(runfolder.split_path(fold_dir, last, cfg.stages[last].name))
        val = split[split["split"] == "val"].reset_index(drop=True)
        _, logits = features_and_logits(b.model, val)
        parts.append(val.assign(fold=k, logit=logits, prob=sigmoid(logits)))
        members.append(b)
    return pd.concat(parts, ignore_index=True), members


def _check_coverage(oof: pd.DataFrame, last_stage: pd.DataFrame) -> None:
    """Each non-test photo of the last stage exactly once (a fold mix-up would silently bias every number)."""
    expected = set(last_stage.loc[last_stage["split"] != "test", "image"])
    dup = oof["image"][oof["image"].duplicated()]
    if len(dup) or set(oof["image"]) != expected:
        raise RuntimeError(f"out-of-fold predictions cover {oof['image'].nunique()} of {len(expected)} non-test "
                           f"photos ({len(dup)} twice): the fold runs' splits do not match {runfolder.FOLDS}")


def finish_cv(rf: RunFolder, cfg: RunConfig, stages: list[pd.DataFrame], how: str) -> Path:
    """Out-of-fold predictions, threshold and calibration on them, the reports and the ensemble bundle."""
    from core.calibration import CalibrationError, fit_calibration
    from core.ensemble import save_ensemble
    from core.context import ContextError
    from core.context_fit import fit_context_cv
    from core.training import fit_context_stage, report_test
    k_folds, t = cfg.cv.folds, cfg.threshold
    last_stage = stages[-1]
    oof, members = out_of_fold(rf.out, cfg)
    _check_coverage(oof, last_stage)
    order = {image: i for i, image in enumerate(last_stage["image"])}  # the data's own order, not fold order
    oof = oof.sort_values("image", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    runfolder.write_oof(rf.out, oof.reindex(columns=list(OOF_COLUMNS)))
    y, probs = oof["label"].to_numpy().astype(int), oof["prob"].to_numpy()
    chosen = metrics.choose_threshold(y, probs, rule=t.rule, target=t.target)
    report = build_report(oof, probs, chosen["threshold"], n_boot=cfg.n_boot, seed=cfg.seed, split="out-of-fold")
    vm = report["metrics"]
    threshold = Threshold(value=float(chosen["threshold"]), rule=t.rule, target=t.target,
                          chosen_on=f"out-of-fold predictions ({k_folds} folds)", val_sensitivity=vm["recall"],
                          val_specificity=vm["specificity"], n_val=int(len(y)), n_val_malignant=int(y.sum()))
    member_threshold, nested_section, fit_df, fitted_on = threshold, None, oof, "out-of-fold"
    if cfg.cv.nested:  # the ensemble's threshold and calibration come from ensemble-like scores instead
        fit_df, threshold, nested_section = nested_threshold(rf.out, cfg, order)
        fitted_on = "nested out-of-fold"
    try:
        calibration = replace(fit_calibration(fit_df["logit"].to_numpy(), fit_df["label"].to_numpy().astype(int),
                                              groups=groups_of(fit_df), seed=cfg.seed, unit=resample_unit(fit_df)),
                              fitted_on=fitted_on)
    except CalibrationError as e:
        calibration = None
        report["notes"].append(f"no calibration map: {e}")
    context, context_section = None, None
    if cfg.context:
        rows = context_rows(fit_df, last_stage)
        context = fit_context_stage(rf, cfg, report, partial(fit_context_cv, where=threshold.chosen_on), rows,
                                    rows["prob"].to_numpy())
        try:
            context_section = None if context is None else context_new_patients(rows, context, cfg)
        except ContextError as e:  # the stage itself is fitted; only its check on new patients is missing
            report["notes"].append(f"the fused threshold rule was not judged on new patients: {e}")
            rf.log(report["notes"][-1])
    report["notes"] += cv_notes(cfg)
    per_fold = fold_reports(oof, members, member_threshold.value, rf.out)
    transfer = threshold_transfer(oof, t.rule, t.target, n_boot=cfg.n_boot, seed=cfg.seed)
    report["cv"] = {"folds": k_folds, "how": how, "internal_estimate_only": cfg.split.test == 0,
                    "threshold": threshold.to_dict(), "threshold_transfer": transfer,
                    "per_fold": per_fold, "summary": fold_summary(per_fold),
                    "calibration": None if calibration is None else calibration.to_meta()}
    if nested_section is not None:
        report["cv"].update(member_threshold=member_threshold.to_dict(), nested=nested_section)
    if context_section is not None:
        report["cv"]["context"] = context_section
    member_info = [{"fold": f["fold"], "run": f["run"], "best_epochs": f["best_epochs"],
                    "val_metrics": b.meta.provenance.validation_metrics} for f, b in zip(per_fold, members)]
    seconds = sum(float(b.meta.provenance.train_seconds or 0) for b in members)
    seconds += (nested_section or {}).get("train_seconds", 0.0)  # the pair runs are part of making this bundle
    hardware = machines([b.meta.provenance.trained_on for b in members] +
                        [(nested_section or {}).get("trained_on")])  # the pair runs made the threshold
    provenance = replace(_provenance(cfg, members, per_fold, stages, how, vm, seconds, hardware),
                         threshold_on_new_patients=new_patients_record(
                             transfer if nested_section is None else nested_section["threshold_transfer"],
                             None if context_section is None else context_section["threshold_transfer"]))
    similar = oof.drop(columns=["prob", "logit"]).assign(split="train")  # every one trained K-1 of the members
    bundle = save_ensemble(members, rf.out / BUNDLE, threshold=threshold, provenance=provenance,
                           calibration=calibration, member_info=member_info, similar_df=similar, seed=cfg.seed,
                           context=context)
    report["model"] = read_meta(bundle).summary()
    atomic_write_json(rf.out / CV_REPORT, report_data(report), indent=1)
    rf.log(f"cross-validation ({k_folds} folds; per fold at the out-of-fold threshold {member_threshold.value:.3f}):\n"
           + cv_table(report, cfg.name) + "".join(f"\n  {n}" for n in cv_notes(cfg)))
    rf.log(transfer_line(transfer))
    if nested_section is not None:
        rf.log(nested_line(nested_section))
    if context_section is not None:
        rf.log(context_line(context_section))
    if calibration is not None:
        rf.log(f"calibration: {calibration.method} (slope {calibration.slope:.3f}, intercept "
               f"{calibration.intercept:.3f}) on {calibration.n} {calibration.fitted_on} photos; {calibration.chosen_by}")
    rf.log(f"ensemble of {k_folds} fold models; bundle: {bundle}")
    if cfg.report_test and (last_stage["split"] == "test").any():
        report_test(rf, cfg, bundle, last_stage)
    return bundle


def context_rows(scores: pd.DataFrame, last_stage: pd.DataFrame) -> pd.DataFrame:
    """Every non-test row of the last stage (its answers) with its fold and the image score the threshold was
    chosen on (`prob`: out-of-fold, or nested), in the scores' order."""
    rows = last_stage[last_stage["split"] != "test"].drop(columns=["fold", "prob", "logit"], errors="ignore")
    return scores[["image", "fold", "prob"]].merge(rows, on="image", how="left", validate="one_to_one")


def context_new_patients(rows: pd.DataFrame, stage, cfg: RunConfig) -> dict:
    """The report's `context` section: fused scores with no answer or label of their fold used (context model,
    missing-answer rule and fusion cross-fitted over the folds, core.context_fit.crossfit_fused_probs), their
    ROC-AUC with its patient-bootstrap CI, and the fused threshold rule judged on new patients as
    cv.threshold_transfer judges the image rule."""
    from core.context_fit import crossfit_fused_probs
    t = cfg.threshold
    fused = crossfit_fused_probs(rows, rows["prob"].to_numpy(), cfg.context.fields, seed=cfg.seed)
    scored = rows.assign(prob=fused)
    y = scored["label"].to_numpy().astype(int)
    auc = metrics.metric_report(y, fused, 0.5, groups=groups_of(scored), n_boot=cfg.n_boot,
                                seed=cfg.seed)["metrics"]["roc_auc"]
    return {"fields": list(stage.fields), "n": int(len(y)), "fused_threshold": stage.threshold,
            "crossfitted_roc_auc": auc, "roc": metrics.roc_points(y, fused),
            "threshold_transfer": threshold_transfer(scored, t.rule, t.target, n_boot=cfg.n_boot, seed=cfg.seed),
            "how": "each fold's fused score from a context model, missing-answer rule and fusion fitted without "
                   "that fold's answers and labels, on the image scores the ensemble's threshold was chosen on"}


def context_line(section: dict) -> str:
    """One log line: the cross-fitted fused ROC-AUC and the fused threshold rule on new patients."""
    transfer = transfer_line(section["threshold_transfer"]).replace("threshold rule on new patients",
                                                                    "fused threshold rule on new patients")
    return (f"photo + answers, cross-fitted ({section['how']}): ROC-AUC "
            f"{metrics.format_estimate(section['crossfitted_roc_auc'])} on {section['n']} photos\n{transfer}")


def nested_threshold(run: Path, cfg: RunConfig, order: dict) -> tuple[pd.DataFrame, Threshold, dict]:
    """The nested out-of-fold scores (written to the run folder), the ensemble's threshold chosen on them by the
    recipe's rule, and the report's `nested` section: their ROC-AUC and PR-AUC with patient-bootstrap CIs, the
    sensitivity and specificity at that threshold, and the rule's cross-fitted transfer to new patients."""
    from core.ensemble import DEFAULT_COMBINE
    k_folds, t = cfg.cv.folds, cfg.threshold
    scores, pair_provenance = nested.pair_scores(run, cfg)
    df = nested.nested_oof(scores, runfolder.read_folds(run), DEFAULT_COMBINE)
    df = df.sort_values("image", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    runfolder.write_nested_oof(run, df)
    y, p = df["label"].to_numpy().astype(int), df["prob"].to_numpy()
    chosen = metrics.choose_threshold(y, p, rule=t.rule, target=t.target)
    vm = metrics.metric_report(y, p, chosen["threshold"], groups=groups_of(df), n_boot=cfg.n_boot,
                               seed=cfg.seed)["metrics"]
    threshold = Threshold(value=float(chosen["threshold"]), rule=t.rule, target=t.target,
                          chosen_on=nested.how(k_folds), val_sensitivity=vm["recall"],
                          val_specificity=vm["specificity"], n_val=int(len(y)), n_val_malignant=int(y.sum()))
    section = {"how": nested.how(k_folds), "pairs": len(nested.pairs(k_folds)), "members_per_photo": k_folds - 1,
               "combine": DEFAULT_COMBINE, "n": int(len(y)), "n_positive": int(y.sum()),
               "metrics": {key: vm[key] for key in ("roc_auc", "pr_auc", "recall", "specificity")},
               "roc": metrics.roc_points(y, p),
               "threshold": threshold.to_dict(),
               "threshold_transfer": threshold_transfer(df, t.rule, t.target, n_boot=cfg.n_boot, seed=cfg.seed),
               "train_seconds": sum(float(p.train_seconds or 0) for p in pair_provenance),
               "trained_on": machines([p.trained_on for p in pair_provenance])}
    return df, threshold, section


def nested_line(section: dict) -> str:
    """One log line: the nested ensemble scores, the ensemble threshold chosen on them and its transfer."""
    m, est = section["metrics"], metrics.format_estimate
    transfer = transfer_line(section["threshold_transfer"]).replace("threshold rule on new patients",
                                                                    "ensemble threshold on new patients")
    return (f"nested out-of-fold ({section['members_per_photo']}-model ensembles, {section['pairs']} pair models, "
            f"{section['n']} photos): ROC-AUC {est(m['roc_auc'])}, PR-AUC {est(m['pr_auc'])}; the ensemble's "
            f"threshold {section['threshold']['value']:.3f} chosen here: sensitivity {est(m['recall'])}, "
            f"specificity {est(m['specificity'])}\n{transfer}")


def cv_notes(cfg: RunConfig) -> list[str]:
    """What every cross-validation report says about its numbers."""
    notes = [f"out-of-fold: every non-test photo scored once, by the one of the {cfg.cv.folds} fold models that "
             "never trained on it; the threshold was chosen on these same predictions, so sensitivity and "
             "specificity at it are not an independent estimate (cv.threshold_transfer is: each fold judged at "
             "the threshold chosen on the other folds)",
             "each fold model's best epoch was chosen by its own fold's validation metric, so the out-of-fold "
             "ROC-AUC and PR-AUC lean slightly optimistic; the test split is the independent estimate"]
    if cfg.cv.nested:
        notes.append("nested: the ensemble's threshold and calibration were fitted on nested out-of-fold scores (each "
                     f"photo scored by the {cfg.cv.folds - 1} pair models that never trained on it, combined as the "
                     "ensemble combines), not on the single models' out-of-fold scores above; see cv.nested")
    if cfg.split.test == 0:
        notes.append("no test split (split.test = 0): these out-of-fold metrics are the run's only internal "
                     "estimate; evaluate the ensemble on an outside test set (python -m train.evaluate)")
    return notes


def threshold_transfer(oof: pd.DataFrame, rule: str, target: float | None, *, n_boot: int = 1000,
                       seed: int = 0) -> dict | None:
    """The threshold rule tried on new patients without touching the test split: each fold's photos are judged at
    the threshold the rule picks on the other folds' out-of-fold predictions (cross-fitting). Pooled, every photo
    meets a threshold chosen without it: an honest estimate of the rule's sensitivity and specificity on new
    patients, with patient-bootstrap CIs; per fold, their spread. None when some fold's complement lacks a class."""
    oof = oof.reset_index(drop=True)
    flagged, rows = np.zeros(len(oof), dtype=bool), []
    for k, part in oof.groupby("fold", sort=True):
        rest = oof[oof["fold"] != k]
        if rest["label"].nunique() < 2:
            return None
        t = metrics.choose_threshold(rest["label"].to_numpy(), rest["prob"].to_numpy(), rule=rule,
                                     target=target)["threshold"]
        flagged[part.index] = part["prob"].to_numpy() >= t
        point = metrics.point_metrics(part["label"].to_numpy(), part["prob"].to_numpy(), t)
        rows.append({"fold": int(k), "threshold": float(t), "n": int(len(part)),
                     "n_positive": int(part["label"].sum()), "sensitivity": point["recall"],
                     "specificity": point["specificity"]})
    # The decisions come from K thresholds, so score them as 0/1 at 0.5: sensitivity and specificity (and their
    # patient-bootstrap intervals) are those of the decisions; the report's AUCs would be meaningless and are dropped.
    pooled = metrics.metric_report(oof["label"].to_numpy().astype(int), flagged.astype(float), 0.5,
                                   groups=groups_of(oof), n_boot=n_boot, seed=seed)["metrics"]
    return {"rule": rule, "target": target, "per_fold": rows, "sensitivity": pooled["recall"],
            "specificity": pooled["specificity"],
            "how": "each fold judged at the threshold the rule chose on the other folds' out-of-fold predictions"}


def new_patients_record(image: dict | None, fused: dict | None) -> dict | None:
    """The bundle's provenance record of its threshold rules on new patients (the image threshold's transfer, and
    the fused threshold's when the bundle has a context stage); None when neither was estimated."""
    if image is None and fused is None:
        return None
    return {"image": image, "fused": fused}


def transfer_line(transfer: dict | None) -> str:
    """One log line: the threshold rule's cross-fitted sensitivity and specificity, pooled and per fold."""
    if transfer is None:
        return "threshold on new patients: not estimated (some fold's complement has one class only)"
    span = lambda key: "-".join(f"{v:.2f}" for v in _range([r[key] for r in transfer["per_fold"]]))  # noqa: E731
    return (f"threshold rule on new patients ({transfer['how']}): sensitivity "
            f"{metrics.format_estimate(transfer['sensitivity'], '.3f')} (per fold {span('sensitivity')}), "
            f"specificity {metrics.format_estimate(transfer['specificity'], '.3f')} (per fold {span('specificity')})")


def _range(values: list) -> list[float]:
    present = [v for v in values if v is not None]
    return [min(present), max(present)] if present else []


def fold_reports(oof: pd.DataFrame, members: list, threshold: float, run: Path) -> list[dict]:
    """Per fold: its validation photos' metrics at the common out-of-fold threshold, ROC points, its own
    best epochs and its own (validation-fold) threshold."""
    out = []
    for k, part in oof.groupby("fold", sort=True):
        y, p = part["label"].to_numpy().astype(int), part["prob"].to_numpy()
        rep = metrics.metric_report(y, p, threshold, n_boot=0)
        meta = members[int(k)].meta
        out.append({"fold": int(k), "run": f"{runfolder.FOLD_RUNS}/{runfolder.fold_path(run, int(k)).name}",
                    "n": rep["n"], "n_positive": rep["n_positive"], "n_patients": int(grouping(part)[1].nunique()),
                    "metrics": {key: m["value"] for key, m in rep["metrics"].items()},
                    "roc": metrics.roc_points(y, p),
                    "best_epochs": [s.get("best_epoch") for s in meta.provenance.stages or []],
                    "own_threshold": meta.threshold.value})
    return out


def fold_summary(per_fold: list[dict]) -> dict:
    """Mean and standard deviation (ddof 1) over folds of each metric; folds where it is undefined are left out."""
    out = {}
    for key in per_fold[0]["metrics"]:
        values = np.array([f["metrics"][key] for f in per_fold if f["metrics"][key] is not None], dtype=float)
        out[key] = {"mean": float(values.mean()) if len(values) else None,
                    "sd": float(values.std(ddof=1)) if len(values) > 1 else None, "n_folds": int(len(values))}
    return out


def cv_table(report: dict, name: str) -> str:
    """Per-fold rows, their mean and SD, and the out-of-fold row with its 95% CIs, in the paper's table layout."""
    cv = report["cv"]
    rows = [(f"fold {f['fold']} (n={f['n']})", {k: {"value": v} for k, v in f["metrics"].items()})
            for f in cv["per_fold"]]
    rows.append(("mean of folds", {k: {"value": s["mean"]} for k, s in cv["summary"].items()}))
    rows.append(("SD of folds", {k: {"value": s["sd"]} for k, s in cv["summary"].items()}))
    rows.append((f"{name} out-of-fold (n={report['n']})", report["metrics"]))
    return metrics.format_table(rows)


def machines(records: list) -> list:
    """The distinct machines (core.device.hardware_record) in several runs' `trained_on` lists (None: not
    recorded, a bundle older than the record), in first-seen order."""
    out = []
    for run in records:
        out += [h for h in run or [] if h not in out]
    return out


def _provenance(cfg, members, per_fold, stages_df, how, vm, seconds, hardware):
    """The ensemble's provenance: the recipe, each stage's data and split (the folds), every fold's best epochs."""
    from core.training import _provenance as run_provenance
    first = members[0].meta.provenance
    stages = []
    for i, stage in enumerate(first.stages or []):
        stages.append({**stage, "split": how, "split_counts": split_counts(stages_df[i]), "best_epoch": None,
                       "best_epoch_per_fold": [f["best_epochs"][i] if i < len(f["best_epochs"]) else None
                                               for f in per_fold], "recipe": asdict(cfg.stages[i])})
    parent = read_meta(cfg.init_from) if cfg.init_from else None
    return run_provenance(cfg, SimpleNamespace(stage_prov=stages, hardware=hardware), parent, vm, seconds)
