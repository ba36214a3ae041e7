"""The app's model picker: RUNS_DIR, the bundles in it, uploaded bundle zips, and the provenance shown with each."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from core import builtin, metrics, runfolder
from core.bundle import (META_FILE, TRUST_FILE, WEIGHTS_FILE, BundleError, BundleMeta, bundle_folder, read_meta,
                         verify_trust, verify_weights)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MAX_BUNDLE_UNZIPPED = 4 << 30     # a zip that expands beyond this is refused (zip bomb guard)


def shown_path(path: str | Path) -> str:
    """A path as a command run from the project root takes it: relative inside the project, else absolute."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(resolved)


def runs_dir() -> Path:
    """RUNS_DIR from the environment (relative to the working directory), else <project>/runs."""
    env = os.environ.get("RUNS_DIR")
    return Path(env).expanduser().resolve() if env else PROJECT_ROOT / "runs"


@dataclass(frozen=True)
class BundleEntry:
    label: str                 # what the picker shows: the run name (or folder name of a bare bundle)
    path: Path                 # the bundle folder (holds META_FILE + WEIGHTS_FILE)
    meta: BundleMeta | None = None
    error: str | None = None   # why it cannot be used (e.g. a format-version mismatch)


def list_bundles(root: str | Path | None = None) -> list[BundleEntry]:
    """Run folders with bundle/model.json and bare bundle folders directly under root, newest first."""
    root = Path(root) if root is not None else runs_dir()
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if not d.is_dir() or d.name.startswith("."):
            continue
        folder = bundle_folder(d)
        if not (folder / META_FILE).is_file():
            continue
        try:
            entry = BundleEntry(d.name, folder, meta=read_meta(folder))
        except BundleError as e:
            entry = BundleEntry(d.name, folder, error=str(e))
        found.append(((folder / META_FILE).stat().st_mtime, entry))
    found.sort(key=lambda t: (-t[0], t[1].label))
    return [e for _, e in found]


def model_entries(root: str | Path | None = None) -> list[BundleEntry]:
    """What the picker offers: the bundles under root (newest first), then the built-in demo, always listed."""
    entries = list_bundles(root)
    if builtin.demo_available():
        try:
            entries.append(BundleEntry(builtin.DEMO_LABEL, builtin.DEMO_BUNDLE, meta=read_meta(builtin.DEMO_BUNDLE)))
        except BundleError as e:
            entries.append(BundleEntry(builtin.DEMO_LABEL, builtin.DEMO_BUNDLE, error=str(e)))
    return entries


def extract_bundle_zip(data: bytes, dest_root: str | Path | None = None) -> Path:
    """Unpack an uploaded bundle zip (model.json + model.safetensors, and trust.safetensors when the bundle has the
    trust parts; at the top or in one folder) and check it.

    Only those files are extracted (never other members, never paths from the archive), into
    dest_root/<content hash>/, so the same upload is unpacked once. Raises BundleError with the reason."""
    required = (META_FILE, WEIGHTS_FILE)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise BundleError(f"the upload is not a zip file (zip the bundle folder: {META_FILE} + "
                          f"{WEIGHTS_FILE})") from None
    with zf:
        members = {}
        for info in zf.infolist():
            name = Path(info.filename).name
            if info.is_dir() or name not in (*required, TRUST_FILE) or "__MACOSX" in info.filename:
                continue
            if name in members:
                raise BundleError(f"the zip holds more than one {name}; upload one bundle at a time")
            members[name] = info
        missing = [n for n in required if n not in members]
        if missing:
            raise BundleError(f"the zip has no {' or '.join(missing)} (a bundle is {META_FILE} + {WEIGHTS_FILE})")
        if len({str(Path(i.filename).parent) for i in members.values()}) != 1:
            raise BundleError(f"{', '.join(sorted(members))} must sit in the same folder of the zip")
        if sum(i.file_size for i in members.values()) > MAX_BUNDLE_UNZIPPED:
            raise BundleError("the zip expands to more than 4 GB; refusing to unpack it")
        digest = hashlib.sha256(data).hexdigest()[:16]
        base = Path(dest_root) if dest_root else Path(tempfile.gettempdir()) / "skinscreen_bundles"
        dest = base / digest
        unpacked = lambda: all((dest / n).is_file() for n in members)  # noqa: E731 - META_FILE is written last
        if not unpacked():
            tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=_mkdir(base)))
            try:
                for name, info in members.items():
                    with zf.open(info) as src, open(tmp / name, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                if dest.exists() and not unpacked():
                    shutil.rmtree(dest)  # a half-written leftover, or one unpacked without the trust file
                os.replace(tmp, dest)
            except (OSError, zipfile.BadZipFile, EOFError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if not unpacked():  # else another session unpacked it meanwhile
                    raise BundleError(f"could not unpack the zip ({e})") from e
    meta = read_meta(dest)
    verify_weights(meta)  # format, version and weights hash: the clear messages come from there
    if meta.trust_arrays is not None and TRUST_FILE not in members:
        raise BundleError(f"the zip has no {TRUST_FILE}, which its {META_FILE} records (zip the whole bundle "
                          f"folder)")
    verify_trust(meta)
    return dest


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def describe_model(meta: BundleMeta) -> dict:
    """The provenance the app shows next to every probability, as display-ready strings."""
    thr, prov = meta.threshold, meta.provenance
    data_lines = _data_lines(prov)
    split_text = ", ".join(f"{k} {v.get('images', '?')} ({v.get('malignant', '?')} malignant)"
                           for k, v in (prov.split_counts or {}).items() if isinstance(v, dict)) or "not recorded"
    return {
        "run": prov.run_name or "?",
        "backbone": meta.backbone.get("name"),
        "weights": prov.weights or "?",
        "weights_hash": meta.short_hash or "not recorded (format-1 bundle)",
        "training_data": data_lines or ["not recorded"],
        "training_sets": _data_sets(prov),
        "splits": split_text,
        "threshold": thr.value,
        "threshold_rule": metrics.describe_rule(thr.rule, thr.target, on=thr.population),
        "sensitivity": metrics.format_percent(thr.val_sensitivity),
        "specificity": metrics.format_percent(thr.val_specificity),
        "n_val": thr.n_val,
        "n_val_malignant": thr.n_val_malignant,
        "val_auc": metrics.metric("roc_auc").format((prov.validation_metrics or {}).get("roc_auc")),
        "intended_use": meta.intended_use or "Research tool, not a diagnostic device.",
        # an ensemble's threshold is chosen on out-of-fold predictions: every non-test photo, each scored by the
        # one model (or, nested, the ensemble of pair models) that did not train on it
        "val_images": thr.population,
        "members": _members_line(meta),
        "trained_on": _trained_on_line(prov.trained_on),
        # a cross-validated bundle's rules tried on new patients: the honest counterpart of the in-sample numbers
        "new_patients": _new_patients_line(prov.threshold_on_new_patients, "image"),
        "fused_new_patients": _new_patients_line(prov.threshold_on_new_patients, "fused"),
        # the run's one evaluation on its test patients: beside the validation numbers, which chose the threshold
        "test": _test_line(own_test_report(meta)),
    }


def _data_lines(prov) -> list[str]:
    """One line per data source, dataset first, with the stages that used it (the stages of a transfer recipe
    often share one source: it is said once)."""
    stages, lines = prov.stages or [], {}
    for i, sources in enumerate(prov.data or []):
        stage = stages[i]["name"] if i < len(stages) and isinstance(stages[i], dict) else f"stage {i}"
        for src in sources or []:
            where = Path(str(src.get("manifest") or src.get("csv") or src.get("metadata") or "?")).name
            line = (f"{src.get('domain') or 'no dataset name'}: {src.get('images', '?')} images, "
                    f"{src.get('malignant', '?')} malignant (from {where})")
            lines.setdefault(line, []).append(stage)
    return [f"{line}; stage{'s' if len(used) > 1 else ''} {', '.join(used)}" for line, used in lines.items()]


def _data_sets(prov) -> str:
    """The datasets a model learned from, in a clinician's words ('pad_ufes_20 (518 photos)'): once each, however
    many stages used them; 'not recorded' when the bundle does not say."""
    sets = {}
    for sources in prov.data or []:
        for src in sources or []:
            sets.setdefault(src.get("domain") or "a dataset with no name", src.get("images", "?"))
    return ", ".join(f"{name} ({n} photos)" for name, n in sets.items()) or "not recorded"


def own_test_report(meta: BundleMeta) -> dict | None:
    """The test report of this very model (its run folder's test_report.json, or the built-in demo's evidence),
    None when there is none or the one there scored other weights (a run re-packaged, a bundle moved)."""
    folders = [builtin.DEMO_EVIDENCE] if meta.folder is not None and builtin.is_builtin(meta.folder) else []
    if meta.folder is not None:
        folders.append(Path(meta.folder).parent)
    for folder in folders:
        try:  # read on every rerun: a cache keyed by mtime could miss a rewrite within the clock's tick
            report = json.loads((folder / runfolder.TEST_REPORT).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.weights_sha256 and isinstance(report, dict) and \
                (report.get("model") or {}).get("weights_sha256") == meta.weights_sha256:
            return report
    return None


def _test_line(report: dict | None) -> str | None:
    """A test report's headline numbers at the model's threshold, in words."""
    if not report or not isinstance(report.get("metrics"), dict):
        return None
    m = report["metrics"]
    patients = f", {report['n_groups']} patients" if isinstance(report.get("n_groups"), int) else ""
    auc = metrics.metric("roc_auc").format(m.get("roc_auc"))
    return (f"sensitivity {metrics.format_percent(m.get('recall'))}, specificity "
            f"{metrics.format_percent(m.get('specificity'))}, ROC-AUC {auc}"
            f" on {report.get('n', '?')} test photos ({report.get('n_positive', '?')} malignant{patients}), "
            "evaluated once after the model and its threshold were chosen")


def _new_patients_line(record, which: str) -> str | None:
    """A threshold rule's cross-fitted sensitivity and specificity on new patients, in words; None where the
    bundle has no such record (a single-split model, or a bundle written before it)."""
    entry = record.get(which) if isinstance(record, dict) else None
    if not isinstance(entry, dict):
        return None
    values = [entry.get(k) if isinstance(entry.get(k), dict) else None for k in ("sensitivity", "specificity")]
    folds = len(entry["per_fold"]) if isinstance(entry.get("per_fold"), list) else "?"
    return (f"sensitivity {metrics.format_percent(values[0])}, specificity {metrics.format_percent(values[1])}; "
            f"each of {folds} folds judged at the threshold the same rule chose on the other folds")


def _trained_on_line(records: list | None) -> str:
    """The machines a model trained on, in words: bf16 and fp32 training give different models from one recipe."""
    records = [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []
    if not records:  # absent, or not in this tool's form (a hand-edited model.json): nothing is claimed
        return "not recorded (a bundle written before this record)"
    parts = []
    for r in records:
        where = r.get("gpu") or f"{str(r.get('device', '?')).upper()} ({r.get('cpu_capability', '?')}" + \
            (", native bf16)" if r.get("cpu_native_bf16") else ")")
        setting = ", chosen by precision 'auto'" if r.get("precision_setting") == "auto" else ""
        procs = f" x {r['processes']}" if isinstance(r.get("processes"), int) and r["processes"] > 1 else ""
        parts.append(f"{where}{procs}, {r.get('precision', '?')} training{setting}")
    more = " (a resumed run, or folds trained on different machines)" if len(parts) > 1 else ""
    return "; ".join(parts) + more


def _members_line(meta: BundleMeta) -> str | None:
    """One sentence on an ensemble's members; None for a single model."""
    e = meta.ensemble
    if e is None:
        return None
    folds = [m.get("fold") for m in e.member_info if isinstance(m, dict) and m.get("fold") is not None]
    made = f" (the fold models of a {len(folds)}-fold cross-validation)" if len(folds) == e.members else ""
    rule = {"mean_prob": "the mean of their probabilities", "mean_logit": "the mean of their logits"}[e.combine]
    return f"{e.members} models{made}; its score is {rule}, its heat-map the mean of theirs"
