"""Domain-overlap analysis: PCA of raw pixels and of embeddings, and a cross-validated domain-classifier AUC per pair.

The paper reads "substantial overlap" off 2-D PCA scatter plots (its Figures 6-7). To make that a number,
each pair of domains gets a domain classifier, scored by out-of-fold ROC-AUC (0.5: indistinguishable,
1.0: fully separable):

* ``auc``: standardise -> PCA to ``OVERLAP_PCS`` whitened components -> L2 logistic regression, all
  fitted inside each training fold (no information from the held-out fold), 5-fold stratified,
  grouped by patient where patient ids exist (a patient's images never straddle folds).
* ``auc_2pc``: the same classifier on the two plotted PCs only: how separable the figure itself is.
* ``silhouette_2pc``: silhouette of the domain labels on the two plotted PCs (about 0 or below:
  overlapping, towards 1: separate clusters).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, silhouette_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core.images import load_image
from core.manifest import crop_of, read_manifest

PIXEL_SIZE = 32       # each image (after its crop) -> centre square, resized to 32x32 RGB, 3072 numbers
N_COMPONENTS = 10     # explained variance is reported for this many PCs
OVERLAP_PCS = 50      # the domain classifier sees this many PCs (fewer when the data has fewer)
N_FOLDS = 5
OVERLAP_METHOD = (f"out-of-fold ROC-AUC of a domain classifier (standardise -> PCA to <= {OVERLAP_PCS} whitened "
                  f"components -> L2 logistic regression, C=1), {N_FOLDS}-fold stratified, grouped by patient "
                  f"where patient ids exist; auc_2pc: the same on the 2 plotted PCs; silhouette_2pc: silhouette "
                  f"of domain labels on the 2 plotted PCs. 0.5 / 0: indistinguishable, 1.0: separable")


def load_manifests(paths) -> pd.DataFrame:
    """Concatenate manifests; a row's domain is its `domain` cell, else its manifest's file stem."""
    parts = []
    for p in paths:
        df = read_manifest(p)
        stem = Path(p).stem
        df["domain"] = df["domain"].fillna(stem) if "domain" in df else stem
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def subsample(df: pd.DataFrame, max_per_domain: int | None, seed: int = 0) -> pd.DataFrame:
    """At most max_per_domain random rows of each domain (seeded), original order kept."""
    if not max_per_domain:
        return df.reset_index(drop=True)
    keep = [g.sample(n=min(len(g), max_per_domain), random_state=seed).index
            for _, g in df.groupby("domain", sort=True)]
    return df.loc[sorted(np.concatenate(keep))].reset_index(drop=True)


def pixel_vector(path: str, crop: dict | None, size: int = PIXEL_SIZE) -> np.ndarray:
    """One image as size*size*3 floats in [0, 1]: cropped, centre square (no distortion), antialiased resize."""
    img = load_image(path, crop=crop, min_side=size)
    img = ImageOps.fit(img, (size, size), method=Image.BILINEAR)
    return np.asarray(img, dtype=np.float32).reshape(-1) / 255.0


def pixel_features(df: pd.DataFrame, size: int = PIXEL_SIZE) -> np.ndarray:
    return np.stack([pixel_vector(r["image"], crop_of(r), size) for _, r in df.iterrows()])


def pca_2d(X: np.ndarray, n_components: int = N_COMPONENTS, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Standardised features -> (N, 2) coordinates on the first two PCs, and the explained variance ratios."""
    Z = StandardScaler().fit_transform(X)
    k = max(2, min(n_components, *Z.shape))
    pca = PCA(n_components=k, random_state=seed).fit(Z)
    coords = pca.transform(Z)[:, :2]
    return coords, [float(v) for v in pca.explained_variance_ratio_]


def patient_groups(df: pd.DataFrame) -> np.ndarray:
    """Patient ids (namespaced by domain) where present; every other image is a group of its own."""
    pid = df["patient_id"] if "patient_id" in df else pd.Series([None] * len(df), index=df.index)
    own = "img:" + pd.Series(np.arange(len(df)), index=df.index).astype(str)
    named = df["domain"].astype(str) + ":" + pid.astype(str)
    return np.where(pid.notna(), named, own)


def _classifier(n_train: int, dim: int, n_pcs: int | None):
    if n_pcs is None:
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    k = max(1, min(n_pcs, dim, n_train - 1))  # PCA keeps at most min(rows, dims) components
    return make_pipeline(StandardScaler(), PCA(n_components=k, whiten=True, random_state=0),
                         LogisticRegression(max_iter=2000))


def domain_auc(X: np.ndarray, is_b: np.ndarray, groups: np.ndarray, *, n_pcs: int | None = OVERLAP_PCS,
               seed: int = 0) -> tuple[float | None, int]:
    """Out-of-fold ROC-AUC of telling domain b from domain a, and the folds used (None, 0 if too few)."""
    y = np.asarray(is_b, dtype=int)
    n_min = min(len(set(groups[y == 0])), len(set(groups[y == 1])))
    folds = min(N_FOLDS, n_min)
    if folds < 2:
        return None, 0
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = np.empty(len(y))
    for train, test in cv.split(X, y, groups):
        if len(set(y[train])) < 2:
            return None, 0
        clf = _classifier(len(train), X.shape[1], n_pcs).fit(X[train], y[train])
        scores[test] = clf.predict_proba(X[test])[:, 1]
    return float(roc_auc_score(y, scores)), folds


def overlap(X: np.ndarray, coords: np.ndarray, df: pd.DataFrame, seed: int = 0) -> list[dict]:
    """One record per pair of domains: the figures of merit described in the module docstring."""
    domains = sorted(df["domain"].astype(str).unique())
    groups = patient_groups(df)
    out = []
    for a, b in itertools.combinations(domains, 2):
        mask = df["domain"].isin([a, b]).to_numpy()
        is_b = (df["domain"][mask] == b).to_numpy()
        auc, folds = domain_auc(X[mask], is_b, groups[mask], seed=seed)
        auc2, _ = domain_auc(coords[mask], is_b, groups[mask], n_pcs=None, seed=seed)
        sil = float(silhouette_score(coords[mask], is_b)) if folds else None
        out.append({"domain_a": a, "domain_b": b, "n_a": int((~is_b).sum()), "n_b": int(is_b.sum()),
                    "auc": auc, "auc_2pc": auc2, "silhouette_2pc": sil, "folds": folds,
                    "grouped_by": "patient_id" if "patient_id" in df and df["patient_id"][mask].notna().any()
                    else "image"})
    return out


def scatter_frame(df: pd.DataFrame, coords: np.ndarray) -> pd.DataFrame:
    """The CSV the dashboard reads: image, domain, label, pc1, pc2."""
    return pd.DataFrame({"image": df["image"].to_numpy(), "domain": df["domain"].astype(str).to_numpy(),
                         "label": df["label"].astype(int).to_numpy(), "pc1": coords[:, 0], "pc2": coords[:, 1]})


def figure(frames: dict[str, pd.DataFrame], explained: dict[str, list[float]]):
    """A 2x2 plotly figure: rows = spaces (pixels, embeddings), columns = coloured by domain, by label."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    spaces = list(frames)
    titles = [f"{s}: by {c} (PC1 {explained[s][0]:.0%}, PC2 {explained[s][1]:.0%})"
              for s in spaces for c in ("domain", "label")]
    fig = make_subplots(rows=len(spaces), cols=2, subplot_titles=titles)
    domains = sorted(set().union(*(f["domain"] for f in frames.values())))
    colours = {d: qualitative.Plotly[i % len(qualitative.Plotly)] for i, d in enumerate(domains)}
    label_colours = {0: "#1f77b4", 1: "#d62728"}
    for r, space in enumerate(spaces, start=1):
        f = frames[space]
        for d in domains:
            part = f[f["domain"] == d]
            fig.add_trace(_points(go, part, d, colours[d], legend="domain", show=r == 1), row=r, col=1)
        for lab, name in ((0, "benign"), (1, "malignant")):
            part = f[f["label"] == lab]
            fig.add_trace(_points(go, part, name, label_colours[lab], legend="label", show=r == 1), row=r, col=2)
        for c in (1, 2):
            fig.update_xaxes(title_text="PC1", row=r, col=c)
            fig.update_yaxes(title_text="PC2", row=r, col=c)
    fig.update_layout(height=450 * len(spaces), width=1100, title="PCA of raw pixels and backbone embeddings")
    return fig


def _points(go, part: pd.DataFrame, name: str, colour: str, legend: str, show: bool):
    return go.Scatter(x=part["pc1"], y=part["pc2"], mode="markers", name=name, legendgroup=f"{legend}:{name}",
                        showlegend=show, marker=dict(size=5, opacity=0.6, color=colour),
                        text=[Path(p).name for p in part["image"]], hovertemplate="%{text}<extra>" + name + "</extra>")
