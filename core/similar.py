"""Similar cases: the k training/validation photos nearest to a new photo in the model's own feature space.

The index stores L2-normalised pooled features as float16 (a 1280-d MobileNetV2 vector is 2.5 kB) and, per photo,
a reference to the image (its path as the manifest gave it, resolved), its split, label and diagnosis where the
manifest has one: never a copy of a patient's photo. Similarity is cosine similarity (1 = same direction).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.fileio import portable_path

DEFAULT_K = 6
# Very large training sets are subsampled (seeded) so a bundle stays small; the README says so.
MAX_ITEMS = 20000
LABEL_NAMES = {0: "benign", 1: "malignant"}
_CARRIED = ("diagnosis", "patient_id", "domain")
# the manifest columns each carried field is read from, first found wins: the PAD-UFES-20 importer keeps the
# dataset's own name for the diagnosis (`diagnostic`)
_SOURCES = {"diagnosis": ("diagnosis", "diagnostic")}


# Cosine similarity at or above which an indexed photo counts as the same photo (or a near copy: a re-save, a
# slightly different crop) for the "seen in training" warning; different lesions of the shared data stay below it.
SEEN_SIMILARITY = 0.99


class SimilarError(ValueError):
    """An index that does not match the features it is asked about, or is described inconsistently."""


@dataclass(frozen=True)
class SimilarCase:
    image: str
    label: int
    label_name: str
    split: str
    similarity: float
    diagnosis: str | None = None
    available: bool = False  # the image file exists on this machine


@dataclass(frozen=True)
class SimilarIndex:
    """Normalised float16 embeddings (N, D) plus one record per row (image, split, label, diagnosis...)."""
    embeddings: np.ndarray = field(repr=False)
    records: tuple[dict, ...] = field(repr=False)
    base: Path | None = field(default=None, compare=False)  # relative image references are relative to this

    def __post_init__(self):
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.records):
            raise SimilarError(f"{len(self.records)} records but embeddings of shape {self.embeddings.shape}")

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def query(self, feats, k: int = DEFAULT_K) -> list[list[SimilarCase]]:
        """For each row of `feats` (N, D), its k most similar indexed photos, most similar first."""
        x = np.asarray(feats, dtype=np.float32)
        x = x[None] if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise SimilarError(f"features of shape {x.shape} do not match the index's {self.dim} dimensions")
        k = min(k, len(self.records))
        sims = _normalise(x) @ self.embeddings.astype(np.float32).T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return [[self._case(j, float(sims[i, j])) for j in row] for i, row in enumerate(top)]

    def _case(self, j: int, sim: float) -> SimilarCase:
        r = self.records[j]
        label = int(r["label"])
        image = Path(str(r["image"]))
        if not image.is_absolute() and self.base is not None:
            image = self.base / image
        return SimilarCase(image=str(image), label=label, label_name=LABEL_NAMES.get(label, str(label)),
                           split=str(r.get("split") or ""), similarity=sim, diagnosis=r.get("diagnosis"),
                           available=image.is_file())

    def to_meta(self) -> dict:
        return {"n": len(self.records), "dim": self.dim, "dtype": "float16", "similarity": "cosine",
                "splits": dict(pd.Series([r.get("split") for r in self.records]).value_counts().astype(int)),
                "records": list(self.records)}

    @classmethod
    def from_meta(cls, meta: dict, embeddings, base: Path | None = None) -> SimilarIndex:
        return cls(np.asarray(embeddings, dtype=np.float16), tuple(meta.get("records", ())), base)

    def filled_from(self, df: pd.DataFrame) -> SimilarIndex:
        """The same index with the carried fields its records lack taken from the manifest rows of the same photos
        (matched by path, else by a file name only one row has; what a record has is kept): an index built before a
        field was carried gains it without embedding a photo again."""
        by_path, by_name = {}, {}
        for _, row in df.iterrows():
            fields, path = _carried_fields(row, df.columns), Path(str(row["image"]))
            by_path[str(path.resolve())] = fields
            by_name.setdefault(path.name, []).append(fields)
        return SimilarIndex(self.embeddings, tuple(self._found(r, by_path, by_name) | r for r in self.records),
                            self.base)

    def _found(self, record: dict, by_path: dict, by_name: dict) -> dict:
        """A record's fields from the rows: its own path first, else its file name when only one row has it (two
        datasets can share a name like 001.jpg)."""
        image = Path(str(record["image"]))
        if not image.is_absolute() and self.base is not None:
            image = self.base / image
        if str(image.resolve()) in by_path:
            return by_path[str(image.resolve())]
        named = by_name.get(image.name, [])
        return named[0] if len(named) == 1 else {}

    def relative_to(self, folder: Path) -> SimilarIndex:
        """The same index with image references relative to `folder` (a bundle that travels with its data
        beside it, e.g. the built-in demo and ../shared), so no machine's absolute paths are stored."""
        records = tuple({**r, "image": portable_path(Path(str(r["image"])).resolve(), Path(folder).resolve())}
                        for r in self.records)
        return SimilarIndex(self.embeddings, records, Path(folder))


def _carried_fields(row, columns) -> dict:
    """The carried fields (diagnosis, patient, domain) a manifest row has, each from its first column present."""
    out = {}
    for col in _CARRIED:
        source = next((c for c in _SOURCES.get(col, (col,)) if c in columns and not pd.isna(row[c])), None)
        if source is not None:
            out[col] = str(row[source])
    return out


def seen_in_training(cases: list[SimilarCase]) -> SimilarCase | None:
    """The first training or validation photo the query is (nearly) identical to, or None: the model has learned or
    been tuned on that photo, so its result for it is no estimate for a new patient."""
    return next((c for c in cases if c.similarity >= SEEN_SIMILARITY and c.split in ("train", "val")), None)


def build_index(df: pd.DataFrame, feats, *, seed: int = 0) -> SimilarIndex:
    """Index the rows of a manifest (image, label, split[, diagnosis, patient_id, domain]) with their features."""
    x = np.asarray(feats, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(df):
        raise SimilarError(f"{len(df)} manifest rows but features of shape {x.shape}")
    rows = df.reset_index(drop=True)
    if len(rows) > MAX_ITEMS:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), MAX_ITEMS, replace=False))
        rows, x = rows.iloc[keep].reset_index(drop=True), x[keep]
    records = []
    for _, r in rows.iterrows():
        rec = {"image": str(Path(str(r["image"])).resolve()), "label": int(r["label"]),
               "split": None if pd.isna(r.get("split")) else str(r.get("split"))}
        records.append(rec | _carried_fields(r, rows.columns))
    return SimilarIndex(_normalise(x).astype(np.float16), tuple(records))


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
