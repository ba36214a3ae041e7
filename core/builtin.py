"""The built-in demo model and example photos shipped in assets/: where they live and the short names that reach them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ASSETS = PROJECT_ROOT / "assets"
DEMO_DIR = ASSETS / "demo"
DEMO_BUNDLE = DEMO_DIR / "bundle"
DEMO_EVIDENCE = DEMO_DIR / "evidence"      # its validation/test reports and PCA summary (no photos)
DEMO_EXPECTED = DEMO_DIR / "expected_predictions.json"
EXAMPLES_DIR = ASSETS / "examples"
# where the demo's photos are when ../shared sits beside the checkout (its similar cases resolve there too); its
# evidence reports keep file names only
DEMO_PHOTOS = PROJECT_ROOT.parent / "shared" / "data" / "pad_ufes_20_subset" / "images"
DEMO_LABEL = "Built-in demo (PAD-UFES-20)"  # short: the sidebar's picker cuts longer labels
SHORT_NAMES = ("demo", "builtin")


@dataclass(frozen=True)
class Example:
    path: Path
    label: int          # 1 malignant / 0 benign (biopsy or clinical consensus, as the dataset gives it)
    diagnosis: str
    fitzpatrick: int | None
    site: str
    age: int | None

    @property
    def caption(self) -> str:
        skin = f", Fitzpatrick {_ROMAN.get(self.fitzpatrick, '?')}" if self.fitzpatrick else ""
        return f"{DIAGNOSES.get(self.diagnosis, self.diagnosis)} ({self.site}{skin})"


DIAGNOSES = {"MEL": "melanoma", "BCC": "basal cell carcinoma", "SCC": "squamous cell carcinoma",
             "NEV": "nevus", "SEK": "seborrheic keratosis", "ACK": "actinic keratosis"}
_ROMAN = {1: "I", 2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI"}


def resolve_model(ref: str | Path) -> Path:
    """A bundle/run folder as given, or the built-in demo for a short name ('demo') that is not a folder here."""
    path = Path(ref).expanduser()
    if not path.exists() and str(ref).strip().lower() in SHORT_NAMES:
        return DEMO_BUNDLE
    return path


def is_builtin(path: str | Path) -> bool:
    try:
        return Path(path).resolve() in (DEMO_BUNDLE.resolve(), DEMO_DIR.resolve())
    except OSError:
        return False


def demo_available() -> bool:
    from core.bundle import META_FILE, WEIGHTS_FILE  # here, not at the top: this module stays light (no torch)
    return (DEMO_BUNDLE / META_FILE).is_file() and (DEMO_BUNDLE / WEIGHTS_FILE).is_file()


def examples(folder: str | Path = EXAMPLES_DIR) -> list[Example]:
    """The example photos listed in examples.csv (missing files are left out, so a trimmed checkout still works)."""
    table = Path(folder) / "examples.csv"
    if not table.is_file():
        return []
    out = []
    for row in pd.read_csv(table).itertuples(index=False):
        path = Path(folder) / row.file
        if path.is_file():
            out.append(Example(path, int(row.label), str(row.diagnosis),
                               None if pd.isna(row.fitzpatrick) else int(row.fitzpatrick), str(row.site),
                               None if pd.isna(row.age) else int(row.age)))
    return out


def demo_split_names() -> dict[str, str]:
    """{image file name: 'train' | 'val'} for the photos the demo trained or validated on (from splits.csv)."""
    table = DEMO_DIR / "splits.csv"
    if not table.is_file():
        return {}
    df = pd.read_csv(table)
    df = df[df["split"].isin(["train", "val"])]
    return dict(zip(df["image"].astype(str), df["split"].astype(str)))
