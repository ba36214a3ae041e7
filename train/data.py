"""Command line: import a dataset into the manifest format (`python -m train.data <source> ...`)."""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from core.fileio import UnwritableError, check_writable
from core.dataset import keep_decodable
from core.manifest import ManifestError, import_csv, import_folder, read_manifest, write_manifest

ISIC_FIX = "install the official ISIC command line tool with `pip install isic-cli`"


def _csv(args) -> list:
    df, report = import_csv(args.labels, args.images, image_col=args.image_col, label_col=args.label_col,
                            patient_col=args.patient_col, lesion_col=args.lesion_col,
                            fitzpatrick_col=args.fitzpatrick_col, domain=args.domain)
    return [(df, report, args.out)]


def _folder(args) -> list:
    return [(*import_folder(args.root, domain=args.domain), args.out)]


def _isic(args) -> list:
    from core.sources import import_isic
    return [(*import_isic(args.metadata, args.images, domain=args.domain), args.out)]


def _pad_ufes(args) -> list:
    from core.sources import import_pad_ufes
    return [(*import_pad_ufes(args.metadata, args.images, domain=args.domain), args.out)]


def _midas(args) -> list:
    from core.sources import import_midas, keep_one_per_lesion, midas_cropped
    if bool(args.crops) != bool(args.cropped_out):
        raise ManifestError("--crops and --cropped-out go together")
    df, report = import_midas(args.xlsx, args.images, domain=args.domain)
    df = keep_decodable(df, report)  # before one photo per lesion is picked: a bad pick must not cost a lesion
    # Default as in the paper: one image per lesion in the cropped subset only.
    outputs = [(*(keep_one_per_lesion(df, report) if args.one_per_lesion else (df, report)), args.out)]
    if args.crops:
        crops = _given_crops(args.crops)
        once = True if args.one_per_lesion is None else args.one_per_lesion
        outputs.append((*midas_cropped(df, report, crops, one_per_lesion=once), args.cropped_out))
    return outputs


def _given_crops(path):
    """The crop-box file a command was given: the app treats a missing one as 'nothing cropped yet', a command
    that was handed one must not (every image would be dropped as 'no crop box')."""
    from core.cropbox import read_crops
    if not Path(path).is_file():
        raise ManifestError(f"{path}: crop-box file not found (the Crop page's dataset mode writes it)")
    return read_crops(path)


def _crops(args) -> list:
    from core.cropbox import apply_crops
    df, report = apply_crops(read_manifest(args.manifest), _given_crops(args.crops))
    if not len(df):
        raise ManifestError(f"{args.crops}: no image of {args.manifest} has a usable crop box "
                            f"({report.summary()})")
    return [(df, report, args.out)]


def shell_line(cmd: list[str], windows: bool = os.name == "nt") -> str:
    """A command as the user's shell takes it when pasted: POSIX quoting, or the Windows convention (its shells
    do not read single quotes)."""
    return subprocess.list2cmdline(cmd) if windows else shlex.join(cmd)


def _isic_download(args) -> list:
    from core.sources import import_isic, isic_download_command
    out = Path(args.out)
    cmd = isic_download_command(out, limit=args.limit, search=args.search)
    print(shell_line(cmd))
    manifest = out / "manifest.csv"
    then = ["python", "-m", "train.data", "isic", "--metadata", str(out / "metadata.csv"),
            "--images", str(out), "--out", str(manifest)]
    if not args.run:
        print(f"# then: {shell_line(then)}\n# (or rerun with --run to do both)")
        return []
    exe = shutil.which(cmd[0])
    if exe is None:
        raise ManifestError(f"`{cmd[0]}` not found on PATH: {ISIC_FIX}")
    try:
        result = subprocess.run([exe, *cmd[1:]], check=False)  # no shell: the query holds quotes
    except OSError as e:
        raise ManifestError(f"could not run {cmd[0]} ({e}): {ISIC_FIX}") from e
    if result.returncode != 0:
        raise ManifestError(f"`isic image download` failed (exit {result.returncode}); it needs network "
                            f"access to the ISIC Archive. If the tool itself is broken: "
                            f"`pip install -U isic-cli`")
    return [(*import_isic(out / "metadata.csv", out, domain=args.domain), manifest)]


def build_parser() -> argparse.ArgumentParser:
    from core.sources import ISIC_CLINICAL_QUERY
    p = argparse.ArgumentParser(prog="python -m train.data", description=__doc__)
    sub = p.add_subparsers(dest="source", required=True)
    c = sub.add_parser("csv", help="any labelled CSV + image folder")
    c.add_argument("labels", help="CSV with one row per image")
    c.add_argument("--images", required=True, help="folder the image column is relative to")
    c.add_argument("--image-col", default="image")
    c.add_argument("--label-col", default="label", help="1/0, malignant/benign")
    c.add_argument("--patient-col", default="patient_id")
    c.add_argument("--lesion-col", default="lesion_id")
    c.add_argument("--fitzpatrick-col", default="fitzpatrick")
    c.set_defaults(handler=_csv)
    f = sub.add_parser("folder", help="ROOT/benign/* and ROOT/malignant/*")
    f.add_argument("root")
    f.set_defaults(handler=_folder)
    for s in (c, f):
        s.add_argument("--out", required=True, help="manifest CSV to write")
        s.add_argument("--domain", default=None, help="tag every row with this domain name")

    d = sub.add_parser("isic-download", help="print (or --run) the isic-cli command for clinical ISIC images")
    d.add_argument("--out", required=True,
                   help="download folder (images, metadata.csv; manifest.csv with --run)")
    d.add_argument("--limit", type=int, default=None, help="download at most N images")
    d.add_argument("--search", default=ISIC_CLINICAL_QUERY, help="isic-cli search query")
    d.add_argument("--run", action="store_true", help="run the download, then import it")
    d.add_argument("--domain", default="isic")
    d.set_defaults(handler=_isic_download)
    i = sub.add_parser("isic", help="an isic-cli download folder (metadata.csv + images)")
    i.add_argument("--metadata", required=True, help="metadata.csv written by isic-cli")
    i.add_argument("--domain", default="isic")
    i.set_defaults(handler=_isic)
    m = sub.add_parser("midas", help="MRA-MIDAS release_midas.xlsx + images")
    m.add_argument("--xlsx", required=True, help="release_midas.xlsx")
    m.add_argument("--crops", help="crop-box CSV (from the app's crop page) for the cropped subset")
    m.add_argument("--cropped-out", help="manifest CSV for the cropped <= 6 in subset")
    m.add_argument("--one-per-lesion", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the closest image per lesion (default: on for the cropped output only)")
    m.add_argument("--domain", default="midas")
    m.set_defaults(handler=_midas)
    u = sub.add_parser("pad-ufes", help="PAD-UFES-20 metadata.csv + images (open smartphone photos)")
    u.add_argument("--metadata", required=True, help="PAD-UFES-20 metadata.csv")
    u.add_argument("--domain", default="pad_ufes_20")
    u.set_defaults(handler=_pad_ufes)
    for s in (i, m, u):
        s.add_argument("--images", required=True, help="folder holding the image files")
        s.add_argument("--out", required=True, help="manifest CSV to write")
    k = sub.add_parser("crops", help="apply a crop-box CSV to a manifest (drops unusable/uncropped rows)")
    k.add_argument("--manifest", required=True)
    k.add_argument("--crops", required=True, help="crop-box CSV")
    k.add_argument("--out", required=True, help="cropped manifest CSV to write")
    k.set_defaults(handler=_crops)
    return p


def summary_table(df, report) -> str:
    """Kept and dropped counts per reason, one aligned row each."""
    pos = int(df["label"].sum()) if len(df) else 0
    detail = f"{pos} malignant, {len(df) - pos} benign"
    if "patient_id" in df and df["patient_id"].notna().any():
        detail += f", {df['patient_id'].nunique()} patients"
    rows = [("kept", report.kept, detail)]
    rows += [(f"dropped: {reason}", n, "") for reason, n in
             sorted(report.dropped.items(), key=lambda kv: (-kv[1], kv[0]))]
    rows.append(("total rows", report.kept + sum(report.dropped.values()), ""))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {n:>7}  {extra}".rstrip() for name, n, extra in rows)


def context_line(df) -> str:
    """How many images lack each clinical-context answer (the importer's stable context columns)."""
    from core.context import missing_counts
    missing = missing_counts(df)
    if not missing:
        return ""
    return f"  context answers missing (of {len(df)}): " + ", ".join(f"{k} {n}" for k, n in missing.items())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    given = [getattr(args, k, None) for k in ("labels", "metadata", "xlsx", "crops", "manifest")]
    try:
        for out in (getattr(args, k, None) for k in ("out", "cropped_out")):
            if out is not None and args.handler is not _isic_download:
                check_writable(out, given)  # before the import's work: a folder in the way, an input file
        outputs = args.handler(args)
        for df, report, out in outputs:
            if args.handler not in (_folder, _midas):  # these decode as they import
                df = keep_decodable(df, report)
                if df.empty:
                    raise ManifestError(f"{out}: not written, no usable images ({report.summary()})")
            check_writable(out, [*given, *df["image"]])
            path = write_manifest(df, out)
            print(f"{path}:")
            print(summary_table(df, report))
            if named := report.write_named(path):
                print(f"  every dropped file or row is named, with its reason, in {named}")
            if line := context_line(df):
                print(line)
    except (ManifestError, UnwritableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
