"""Saved evaluation reports and PCA outputs under RUNS_DIR: finding, loading and turning them into tables."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core import builtin, runfolder
from core.appstate import runs_dir
from core import metrics
from core.fileio import read_json_or_none

REPORT_NAMES = (runfolder.VAL_REPORT, runfolder.TEST_REPORT, runfolder.CV_REPORT)


def _walk(root: Path, max_depth: int):
    root = Path(root)
    if not root.is_dir():
        return
    base = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).parts) - base
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in (runfolder.BUNDLE, runfolder.SPLITS)
                             and depth < max_depth)
        yield Path(dirpath), sorted(filenames)


def find_reports(root: str | Path | None = None, max_depth: int = 3) -> list[Path]:
    """Saved evaluation reports: val_report.json, test_report.json and report_*.json under root."""
    root = Path(root) if root is not None else runs_dir()
    return [d / f for d, files in _walk(root, max_depth) for f in files
            if f in REPORT_NAMES or (f.startswith("report_") and f.endswith(".json"))]


def report_choices(root: str | Path | None = None) -> dict[str, Path]:
    """Reports the dashboard offers, by label: those under root, then the built-in demo's shipped evidence."""
    root = Path(root) if root is not None else runs_dir()
    found = {report_label(p, root): p for p in find_reports(root)}
    found.update({report_label(p, root): p for p in find_reports(builtin.DEMO_EVIDENCE)})
    return found


def default_choice(labels: dict[str, Path], model_folder: str | Path | None = None) -> list[str]:
    """What the dashboard shows first: the chosen model's own reports (its run folder's test, cross-validation and
    validation reports; the demo's evidence for the built-in model), else up to three of the user's own reports,
    else the built-in demo's."""
    if model_folder is not None:
        home = builtin.DEMO_EVIDENCE if builtin.is_builtin(model_folder) else Path(model_folder).resolve().parent
        order = {name: i for i, name in enumerate((runfolder.TEST_REPORT, runfolder.CV_REPORT, runfolder.VAL_REPORT))}
        mine = [label for label, path in labels.items()
                if Path(path).name in order and Path(path).resolve().parent == Path(home).resolve()]
        if mine:
            return sorted(mine, key=lambda label: order[Path(labels[label]).name])
    own = [label for label in labels if not label.startswith("built-in demo: ")]
    return (own or list(labels))[:3]


def pca_roots(root: str | Path | None = None) -> list[Path]:
    """Where PCA outputs are looked for: root (runs) and the built-in demo's evidence."""
    return [Path(root) if root is not None else runs_dir(), builtin.DEMO_EVIDENCE]


def report_label(path: str | Path, root: str | Path | None = None) -> str:
    root = Path(root) if root is not None else runs_dir()
    try:
        return f"built-in demo: {Path(path).relative_to(builtin.DEMO_EVIDENCE)}"
    except ValueError:
        pass
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def load_report(path: str | Path) -> dict:
    data = read_json_or_none(Path(path))
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise ValueError(f"{path}: not an evaluation report (no 'metrics')")
    return data


def metrics_table(named: dict[str, dict]) -> pd.DataFrame:
    """The paper's Table 1/2 layout: one row per report, a column per registered metric (cells 'value [lo, hi]',
    95% CI). How many photos (and malignant ones) come first: an interval is read beside its n, and a wide table
    scrolls its last columns out of view."""
    rows = []
    for name, rep in named.items():
        m = rep.get("metrics", {})
        rows.append({"Model": name, "n": rep.get("n"), "malignant": rep.get("n_positive"),
                     **{x.display: x.format(m.get(x.key)) for x in metrics.METRICS}, "threshold": rep.get("threshold")})
    return pd.DataFrame(rows)


def paired_comparison(label_a: str, a: dict, label_b: str, b: dict, *, n_boot: int = 1000) -> str:
    """One sentence for two reports: their ROC-AUC difference with a paired patient-bootstrap CI when they score
    the same photos, else why no paired comparison can be made."""
    from core.evaluation import compare_scores, prediction_rows  # imports torch: only when two reports are compared
    try:
        rows_a, rows_b = prediction_rows(a, label_a), prediction_rows(b, label_b)
        names = [{Path(str(i)).name for i in rows["image"]} for rows in (rows_a, rows_b)]  # the demo's: names only
        if names[0].isdisjoint(names[1]):  # e.g. a model's validation and test reports
            return ("No paired comparison: these reports score different photos (none in common, as a model's "
                    "validation and test photos are), so read each one's ROC-AUC with its own interval.")
        result = compare_scores(rows_a, rows_b, n_boot=n_boot)
    except ValueError as e:
        return f"No paired comparison: {e}."
    d = result["roc_auc"]["difference"]
    return (f"Paired on the same {result['n']} photos ({result['n_groups']} patients): ROC-AUC of **{label_b}** "
            f"minus **{label_a}** = {metrics.format_estimate(d, '+.3f', '+.3f')} (95% CI, patient bootstrap: "
            f"both reports resampled together; an interval that includes 0 means no demonstrated difference).")


def cv_fold_table(report: dict) -> pd.DataFrame:
    """A cross-validation report's per-fold rows (at the common out-of-fold threshold), their mean and standard
    deviation, and the out-of-fold row with its 95% CIs; empty for any other report."""
    cv = report.get("cv")
    if not cv:
        return pd.DataFrame()
    shown = [m for m in metrics.METRICS if m.in_table]
    fmt = lambda m, v: m.format({"value": v})  # noqa: E731 - a point value (no CI), "n/a" when undefined
    count = lambda v: "" if v is None else str(v)  # noqa: E731 - text columns: blank, not "None", where no count
    rows = [{"Fold": f"fold {f['fold']}", "n": count(f.get("n")), "malignant": count(f.get("n_positive")),
             **{m.display: fmt(m, f["metrics"].get(m.key)) for m in shown},
             "best epochs": ", ".join(map(str, f.get("best_epochs") or []))} for f in cv["per_fold"]]
    for what in ("mean", "sd"):
        rows.append({"Fold": "mean of folds" if what == "mean" else "SD of folds", "n": "", "malignant": "",
                     **{m.display: fmt(m, (cv["summary"].get(m.key) or {}).get(what)) for m in shown},
                     "best epochs": ""})
    rows.append({"Fold": "out-of-fold (95% CI)", "n": count(report.get("n")),
                 "malignant": count(report.get("n_positive")),
                 **{m.display: m.format(report["metrics"].get(m.key)) for m in shown}, "best epochs": ""})
    return pd.DataFrame(rows)


def cv_transfer_text(report: dict) -> str | None:
    """The sentence on the threshold rule's cross-fitted sensitivity on new patients; None for other reports and
    for cross-validation reports written before it was measured."""
    cv = report.get("cv")
    if not cv or "threshold_transfer" not in cv:
        return None
    from core.cv import transfer_line  # the writer of the section spells it (cv imports torch: only when needed)
    return transfer_line(cv["threshold_transfer"])


def cv_nested_text(report: dict) -> str | None:
    """The nested cross-validation's sentences (ensemble scores, the ensemble's threshold, its transfer to new
    patients); None for a report without a nested section."""
    nested = (report.get("cv") or {}).get("nested")
    if not nested:
        return None
    from core.cv import nested_line
    return nested_line(nested)


def cv_context_text(report: dict) -> str | None:
    """The cross-validated context stage's sentences (cross-fitted fused ROC-AUC, the fused threshold rule on new
    patients); None for a report without that section."""
    section = (report.get("cv") or {}).get("context")
    if not section:
        return None
    from core.cv import context_line
    return context_line(section)


def cv_roc_curves(report: dict) -> list[dict]:
    """The ROC curves of a cross-validation report: one per fold, then the out-of-fold curve (name, fpr, tpr, auc,
    oof), then with nested cross-validation the nested (ensemble) out-of-fold curve; empty for any other report."""
    cv = report.get("cv")
    if not cv:
        return []
    curves = [{"name": f"fold {f['fold']}", "fpr": f["roc"]["fpr"], "tpr": f["roc"]["tpr"],
               "auc": f["metrics"].get("roc_auc"), "oof": False} for f in cv["per_fold"] if f.get("roc")]
    if report.get("roc"):
        curves.append({"name": "out-of-fold", "fpr": report["roc"]["fpr"], "tpr": report["roc"]["tpr"],
                       "auc": (report["metrics"].get("roc_auc") or {}).get("value"), "oof": True})
    nested = cv.get("nested") or {}
    if nested.get("roc"):
        curves.append({"name": f"nested out-of-fold ({nested['members_per_photo']}-model ensembles)",
                       "fpr": nested["roc"]["fpr"], "tpr": nested["roc"]["tpr"],
                       "auc": (nested["metrics"].get("roc_auc") or {}).get("value"), "oof": True})
    return curves


def context_table(report: dict) -> pd.DataFrame:
    """A report's clinical-context section (core.context_report) in the paper's table layout: image only, context
    only, fused (each at its own threshold), then the fused model with each answer withheld; empty without one."""
    c = report.get("context")
    if not c:
        return pd.DataFrame()
    rows = {"image only": c["image_only"], "context only": c["context_only"], "photo + answers (fused)": c["fused"]}
    rows.update({f"fused, {f} withheld" if f != "all answers" else "no answers (photo only, as the app does)": r
                 for f, r in (c.get("withheld") or {}).items()})
    return metrics_table(rows).rename(columns={"Model": "Inputs"})


def context_roc_curves(report: dict) -> list[dict]:
    """ROC curves (name, fpr, tpr, auc) of the image-only, context-only and fused scores of a report's
    clinical-context section, from its per-image rows; empty without one."""
    rows = pd.DataFrame((report.get("context") or {}).get("per_image") or [])
    if rows.empty:
        return []
    y = rows["label"].to_numpy().astype(int)
    names = {"image_prob": ("image only", "image_only"), "context_prob": ("context only", "context_only"),
             "fused_prob": ("photo + answers (fused)", "fused")}
    out = []
    for column, (name, key) in names.items():
        if column in rows and rows[column].notna().all():
            curve = metrics.roc_points(y, rows[column].to_numpy(dtype=float))
            auc = ((report["context"].get(key) or {}).get("metrics", {}).get("roc_auc") or {}).get("value")
            out.append({"name": name, "fpr": curve["fpr"], "tpr": curve["tpr"], "auc": auc})
    return out


def context_weights_table(report: dict) -> pd.DataFrame:
    """What each answer adds to the fused logit (core.context.ContextModel.per_field_weights), one row per field:
    categorical answers and 'missing' as columns, numeric fields per standard deviation; empty without one."""
    weights = (report.get("context") or {}).get("weights_per_field") or {}
    rows = []
    for field, w in weights.items():
        if "per_std" in w:
            rows.append({"Field": field, "answer": f"per {w['std']:.3g} (1 SD)", "weight": w["per_std"]})
            rows.append({"Field": field, "answer": "missing", "weight": w.get("missing")})
        else:
            rows += [{"Field": field, "answer": answer, "weight": v} for answer, v in w.items()]
    return pd.DataFrame(rows, columns=["Field", "answer", "weight"])


def subgroup_tables(report: dict) -> dict[str, pd.DataFrame]:
    """{'fitzpatrick': table, 'domain': table}: the same layout with one row per subgroup value."""
    from core.sources import fitzpatrick_roman
    out = {}
    for kind, groups in (report.get("subgroups") or {}).items():
        if groups:  # Fitzpatrick types as clinicians write them (II), whatever the report's key (2, 2.0, II)
            name = (lambda k: fitzpatrick_roman(k) or str(k)) if kind == "fitzpatrick" else str
            table = metrics_table({name(k): v for k, v in groups.items()}).rename(columns={"Model": kind})
            out[kind] = table.drop(columns=["threshold"])
    return out


def trust_table(named: dict[str, dict]) -> pd.DataFrame:
    """Per report with a trust section: photos not assessed, and Brier / ECE before and after calibration."""
    rows = []
    for name, rep in named.items():
        t = rep.get("trust")
        if not t:
            continue
        before, after = t.get("calibration_before") or {}, t.get("calibration_after") or {}
        fmt = lambda e: metrics.format_estimate(e, ".4f", ".3f")  # noqa: E731
        rows.append({"Model": name, "not assessed": f"{t.get('n_not_assessed')} of {t.get('n')}",
                     "of them: unlike the training photos": t.get("n_refused_by_gate"),
                     "of them: unusable photo": t.get("n_refused_by_quality"),
                     "Brier (raw)": fmt(before.get("brier")), "Brier (calibrated)": fmt(after.get("brier")),
                     "ECE (raw)": fmt(before.get("ece")), "ECE (calibrated)": fmt(after.get("ece"))})
    return pd.DataFrame(rows)


def reliability_curves(report: dict) -> dict[str, list[dict]]:
    """{'raw': bins, 'calibrated': bins} from a report's trust section (each bin: mean_predicted, observed, n)."""
    t = report.get("trust") or {}
    out = {}
    for key, name in (("calibration_before", "raw score"), ("calibration_after", "calibrated")):
        if t.get(key) and t[key].get("reliability"):
            out[name] = t[key]["reliability"]
    return out


def example_predictions(report: dict, n: int = 4) -> dict[str, list[dict]]:
    """The most confident correct and incorrect predictions (rows of report['predictions'])."""
    thr = report.get("threshold", 0.5)
    rows = [r for r in report.get("predictions") or [] if r.get("prob") is not None and "label" in r
            and not ("pred" in r and r["pred"] is None)]  # photos not assessed have no prediction to show
    for r in rows:
        r.setdefault("pred", int(r["prob"] >= thr))
    margin = lambda r: abs(r["prob"] - thr)  # noqa: E731
    correct = sorted((r for r in rows if int(r["pred"]) == int(r["label"])), key=margin, reverse=True)
    wrong = sorted((r for r in rows if int(r["pred"]) != int(r["label"])), key=margin, reverse=True)
    return {"correct": correct[:n], "incorrect": wrong[:n]}


def example_image(row: dict, report_path: str | Path) -> str:
    """Where an example's photo is on this machine: the path its report recorded, else, for the built-in demo's
    reports (file names only), the shared folder the demo was trained from, when present."""
    image = Path(str(row.get("image") or ""))
    if not image.is_file() and Path(report_path).resolve().is_relative_to(builtin.DEMO_EVIDENCE.resolve()):
        shared = builtin.DEMO_PHOTOS / image.name
        if shared.is_file():
            return str(shared)
    return str(image)


def example_caption(row: dict, threshold: float) -> str:
    """File name, truth, and the raw score beside the threshold it was judged against, spelled apart."""
    score, thr = metrics.spell_apart(row["prob"], threshold)
    truth = "malignant" if int(row["label"]) == 1 else "benign"
    return f"{Path(str(row.get('image', '?'))).name}\ntruth {truth} · raw score {score} (threshold {thr})"


@dataclass(frozen=True)
class PcaResult:
    folder: Path
    summary: dict | None
    tables: tuple[Path, ...]    # CSVs with pc1, pc2 columns
    html: tuple[Path, ...]


def find_pca(roots, max_depth: int = 4) -> list[PcaResult]:
    """Folders holding PCA outputs (summary.json and/or CSVs with pc1, pc2 columns); absent ones are skipped."""
    found = []
    for root in roots:
        for d, files in _walk(Path(root), max_depth):
            tables = tuple(d / f for f in files if f.endswith(".csv") and _has_pc_columns(d / f))
            summary = read_json_or_none(d / "summary.json") if "summary.json" in files else None
            if tables or (summary is not None and "pca" in json.dumps(summary)[:2000].lower()):
                found.append(PcaResult(d, summary, tables, tuple(d / f for f in files if f.endswith(".html"))))
    return found


def pca_description(summary: dict | None) -> str | None:
    """Whose feature space a PCA's embeddings come from, and what its pixel space is, in words."""
    if not isinstance(summary, dict):
        return None
    model = summary.get("model") if isinstance(summary.get("model"), dict) else {}
    who = model.get("run_name") or model.get("run") or model.get("backbone") or "a model not recorded"
    backbone = f" ({model['backbone']})" if model.get("backbone") and who != model.get("backbone") else ""
    size = summary.get("pixel_size")
    pixels = f"the centre square at {size}x{size} RGB" if size else "raw pixels"
    return (f"Embeddings: the pooled features of {who}{backbone}. Pixels: {pixels}. {summary.get('n', '?')} photos; "
            "colour = dataset, marker = label.")


def pca_overlap_table(summary: dict | None) -> pd.DataFrame | None:
    """How separable each pair of datasets is in each space (out-of-fold ROC-AUC of a domain classifier: 0.5 =
    indistinguishable, 1.0 = fully separable), one row per pair; None when the summary has none."""
    spaces = (summary or {}).get("spaces") if isinstance(summary, dict) else None
    rows = [{"space": space, "dataset A": r.get("domain_a"), "dataset B": r.get("domain_b"),
             "photos (A, B)": f"{r.get('n_a', '?')}, {r.get('n_b', '?')}",
             "separability ROC-AUC (0.5 = same, 1 = apart)": r.get("auc"), "cross-validated by": r.get("grouped_by")}
            for space, v in (spaces or {}).items() if isinstance(v, dict)
            for r in v.get("overlap") or [] if isinstance(r, dict)]
    return pd.DataFrame(rows) if rows else None


def _has_pc_columns(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = f.readline().lower().strip().split(",")
    except (OSError, UnicodeDecodeError):
        return False
    return "pc1" in header and "pc2" in header


def read_pca_table(path: str | Path, max_rows: int = 20000) -> pd.DataFrame:
    df = pd.read_csv(path, nrows=max_rows)
    df.columns = [c.lower() for c in df.columns]
    return df
