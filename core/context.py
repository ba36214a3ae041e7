"""Clinical context: stable answer fields, leak refusals, and the small fused model over the image logit + answers.

The context stage is two logistic regressions, both plain JSON (``ContextModel.to_dict``) so an outside user can
apply them with a calculator:

* the **context model**, learned from the answers of the run's *training* patients only (the rows the image model
  trains on): context_logit = intercept + sum over answered fields of weight[field][answer]; a field that was
  not answered contributes its ``missing`` weight (how that weight is learned is chosen on validation, below);
* the **fusion**, three numbers fitted on the *validation* patients' image logits (honest: the image model never
  trained on them): fused_logit = a + b * logit(P_image) + c * context_logit; P = sigmoid(fused_logit).

With no answer at all the bundle's image-only model and threshold are used unchanged (``fuse`` says so). Test
patients contribute nothing: not a photo, not an answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping

import numpy as np
import pandas as pd

from core.metrics import RESAMPLED
from core.scores import logit, sigmoid

YES_NO = ("yes", "no", "unknown")   # "unknown": the patient was asked and does not know (PAD-UFES-20's UNK)
SEXES = ("female", "male")
SITES = ("head_neck", "torso_front", "torso_back", "torso_side", "upper_limb", "lower_limb", "palms_soles",
         "oral_genital")
NUMERIC_RANGE = {"age": (0.0, 120.0), "diameter_mm": (0.0, 300.0)}
QUESTIONS = {"itch": "Does it itch?", "grew": "Has it grown?", "hurt": "Does it hurt?",
             "changed": "Has it changed (colour, shape)?", "bleed": "Has it bled?", "elevation": "Is it raised?"}
# what each answer is called in a sentence ("photo + 2 answers: age, bleeding"), not the field's column name
WORDS = {"age": "age", "sex": "sex", "site": "body site", "itch": "itching", "grew": "growth", "hurt": "pain",
         "changed": "change", "bleed": "bleeding", "elevation": "raised", "diameter_mm": "diameter"}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str                      # 'numeric' or 'categorical'
    levels: tuple[str, ...] = ()   # categorical answers
    label: str = ""
    word: str = ""                 # the answer's name in a sentence (WORDS)


FIELDS: dict[str, FieldSpec] = {
    "age": FieldSpec("age", "numeric", label="Age (years)", word=WORDS["age"]),
    "sex": FieldSpec("sex", "categorical", SEXES, "Sex", WORDS["sex"]),
    "site": FieldSpec("site", "categorical", SITES, "Body site", WORDS["site"]),
    **{q: FieldSpec(q, "categorical", YES_NO, text, WORDS[q]) for q, text in QUESTIONS.items()},
    "diameter_mm": FieldSpec("diameter_mm", "numeric", label="Largest diameter (mm)", word=WORDS["diameter_mm"]),
}
CONTEXT_COLUMNS = tuple(FIELDS)

# Columns that give the label away, by name: never context, whatever a config or manifest says. PAD-UFES-20's
# `biopsed` is true for every malignant image; ISIC's biopsy and confirmation columns are the same signal; the
# diagnosis columns and MIDAS's pathology/clinical-impression columns are the label itself or a clinician's guess.
LEAK_COLUMNS = frozenset({
    "label", "biopsed", "biopsy", "diagnostic", "diagnosis", "diagnosis_1", "diagnosis_2", "diagnosis_3",
    "diagnosis_4", "diagnosis_5", "benign_malignant", "diagnosis_confirm_type", "concomitant_biopsy", "dx",
    "dx_type", "malignant", "melanocytic", "pathology", "midas_path", "midas_pathreport", "midas_melanoma",
    "clinical_impression_1", "clinical_impression_2", "clinical_impression_3"})

# PAD-UFES-20 regions, ISIC `anatom_site_general` values and MIDAS location words -> SITES.
SITE_ALIASES = {
    "face": "head_neck", "nose": "head_neck", "ear": "head_neck", "lip": "head_neck", "scalp": "head_neck",
    "neck": "head_neck", "head": "head_neck", "head/neck": "head_neck", "cheek": "head_neck",
    "forehead": "head_neck", "temple": "head_neck", "chin": "head_neck", "eyelid": "head_neck",
    "chest": "torso_front", "abdomen": "torso_front", "anterior torso": "torso_front", "breast": "torso_front",
    "back": "torso_back", "posterior torso": "torso_back", "upper back": "torso_back", "lower back": "torso_back",
    "lateral torso": "torso_side", "flank": "torso_side", "torso": None,
    "arm": "upper_limb", "forearm": "upper_limb", "hand": "upper_limb", "upper extremity": "upper_limb",
    "shoulder": "upper_limb", "finger": "upper_limb", "wrist": "upper_limb", "elbow": "upper_limb",
    "thigh": "lower_limb", "leg": "lower_limb", "foot": "lower_limb", "lower extremity": "lower_limb",
    "knee": "lower_limb", "shin": "lower_limb", "calf": "lower_limb", "toe": "lower_limb", "ankle": "lower_limb",
    "palms/soles": "palms_soles", "palm": "palms_soles", "sole": "palms_soles",
    "oral/genital": "oral_genital", "genital": "oral_genital", "oral": "oral_genital",
}
MISSING_WORDS = {"", "nan", "none", "na", "n/a", "not answered", "-", "—"}
UNKNOWN_WORDS = {"unk", "unknown", "don't know", "dont know", "not sure"}
TRUE_WORDS = {"true", "yes", "y", "1", "1.0"}
FALSE_WORDS = {"false", "no", "n", "0", "0.0"}
CLIP_Z = 4.0


class ContextError(ValueError):
    """A context field, answer or model that cannot be used, naming it."""


# ---------------------------------------------------------------- fields and answers
def check_fields(fields) -> tuple[str, ...]:
    """The fields a context model may use: known stable names only; a label-leaking column is refused by name."""
    fields = tuple(fields)
    leaks = [f for f in fields if str(f).strip().lower() in LEAK_COLUMNS]
    if leaks:
        raise ContextError(f"context field(s) {', '.join(leaks)} give the label away and can never be context")
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise ContextError(f"unknown context field(s) {', '.join(map(str, unknown))}; "
                           f"known: {', '.join(CONTEXT_COLUMNS)}")
    if len(set(fields)) != len(fields) or not fields:
        raise ContextError(f"context fields must be a non-empty list without repeats, got {list(fields)}")
    return fields


def site_of(text) -> str | None:
    """A body-site text (PAD region, ISIC anatom_site_general, MIDAS free text) -> one of SITES, or None."""
    if _blank(text):
        return None
    t = " ".join(str(text).strip().lower().replace("_", " ").split())
    if t.replace(" ", "_") in SITES:
        return t.replace(" ", "_")
    if t in SITE_ALIASES:
        return SITE_ALIASES[t]
    words = t.replace("/", " ").replace(",", " ").split()
    for word in words:  # MIDAS: "left upper back", "r forearm"
        if word in SITE_ALIASES and SITE_ALIASES[word]:
            return SITE_ALIASES[word]
    return None


def normalise(name: str, value):
    """One answer in its canonical form (float, or a level of the field), None when not answered.

    Raises ContextError naming the field and value for an answer outside the field's range or levels."""
    spec = FIELDS[check_fields([name])[0]]
    if _blank(value):
        return None
    text = str(value).strip().lower()
    if spec.kind == "numeric":
        if text in UNKNOWN_WORDS:
            return None
        try:
            x = float(text)
        except ValueError:
            raise ContextError(f"context field {name}: {value!r} is not a number") from None
        lo, hi = NUMERIC_RANGE[name]
        if not lo <= x <= hi or math.isnan(x):
            raise ContextError(f"context field {name}: {value!r} is outside {lo:g}-{hi:g}")
        return x
    if name == "site":
        site = site_of(value)
        if site is None:
            raise ContextError(f"context field site: {value!r} is not a known body site; one of {', '.join(SITES)}")
        return site
    if name == "sex":
        sex = {"f": "female", "female": "female", "woman": "female", "m": "male", "male": "male",
               "man": "male"}.get(text)
        if sex is None:
            if text in UNKNOWN_WORDS:
                return None
            raise ContextError(f"context field sex: {value!r} is not female/male")
        return sex
    if text in TRUE_WORDS:
        return "yes"
    if text in FALSE_WORDS:
        return "no"
    if text in UNKNOWN_WORDS:
        return "unknown"
    raise ContextError(f"context field {name}: {value!r} is not yes/no/unknown")


def answers_of(row: Mapping, fields) -> dict:
    """The answered fields of one manifest row or form, canonical (unanswered fields left out)."""
    out = {}
    for name in fields:
        value = normalise(name, row.get(name)) if name in row else None
        if value is not None:
            out[name] = value
    return out


def context_frame(df: pd.DataFrame, fields, problems: dict | None = None) -> pd.DataFrame:
    """The manifest's context columns in canonical form (None = not answered); absent columns are all None.

    A bad answer (out of range, not a level) raises ContextError; with a `problems` dict it counts as unanswered
    instead and problems[row position] lists why, so one bad answer does not stop a job over thousands of rows."""
    fields = check_fields(fields)

    def one(name, i, value):
        if problems is None:
            return normalise(name, value)
        try:
            return normalise(name, value)
        except ContextError as e:
            problems.setdefault(i, []).append(f"{e}; counted as not answered")
            return None
    return pd.DataFrame({f: [one(f, i, v) for i, v in enumerate(df[f])] if f in df else [None] * len(df)
                         for f in fields}, index=df.index)


def missing_counts(df: pd.DataFrame) -> dict[str, int]:
    """Rows without an answer, per stable context column present in df (importers report these)."""
    return {f: int(df[f].map(_blank).sum()) for f in CONTEXT_COLUMNS if f in df}


def _blank(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).strip().lower() in MISSING_WORDS


# ---------------------------------------------------------------- the model
@dataclass(frozen=True)
class ContextModel:
    """The fitted context stage, serialisable to plain JSON (see the module docstring for the formulas)."""
    fields: tuple[str, ...]
    intercept: float
    weights: dict            # field -> {"kind", "weights": {level: w} | "weight", "mean", "std", "missing"}
    fusion: dict             # {"intercept", "image", "context"}
    missing_rule: str        # how unanswered fields were taught (chosen on validation)
    threshold: dict = field(default_factory=dict)          # fused threshold + its validation numbers
    context_threshold: dict = field(default_factory=dict)  # context-only threshold + its validation numbers
    excluded: dict = field(default_factory=dict)           # field -> why it is not in the model
    fitted: dict = field(default_factory=dict)             # what it was fitted on, and the measured choices
    fusion_bootstrap: dict = field(default_factory=dict)   # the fusion's refits (FUSION_BOOT_KEYS); {}: none kept

    def to_dict(self) -> dict:
        return {"kind": "logistic_context_fusion", "fields": list(self.fields), "intercept": self.intercept,
                "weights": self.weights, "fusion": self.fusion, "missing_rule": self.missing_rule,
                "threshold": self.threshold, "context_threshold": self.context_threshold,
                "excluded": self.excluded, "fitted": self.fitted,
                **({"fusion_bootstrap": self.fusion_bootstrap} if self.fusion_bootstrap else {}),
                "formula": "context_logit = intercept + sum_f contribution_f (an unanswered field contributes its "
                           "'missing' weight; numeric: weight * clip((x - mean) / std, -4, 4)); fused_logit = "
                           "fusion.intercept + fusion.image * logit(P_image) + fusion.context * context_logit; "
                           "P = sigmoid(fused_logit). With no answer at all, use the image-only model and its "
                           "threshold."}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "context") -> "ContextModel":
        if not isinstance(d, Mapping) or d.get("kind") != "logistic_context_fusion":
            raise ContextError(f"{where}: not a context stage description (kind must be 'logistic_context_fusion')")
        try:
            return cls(fields=check_fields(d["fields"]), intercept=float(d["intercept"]), weights=dict(d["weights"]),
                       fusion=dict(d["fusion"]), missing_rule=str(d["missing_rule"]),
                       threshold=dict(d.get("threshold") or {}), context_threshold=dict(d.get("context_threshold")
                                                                                         or {}),
                       excluded=dict(d.get("excluded") or {}), fitted=dict(d.get("fitted") or {}),
                       fusion_bootstrap=check_fusion_bootstrap(d.get("fusion_bootstrap") or {}, where))
        except KeyError as e:
            raise ContextError(f"{where}: context stage description lacks {e}") from None

    @cached_property
    def _refits(self) -> np.ndarray:
        """The fusion's refits as a (3, K) array (intercept, image, context), built once per stage."""
        return np.array([self.fusion_bootstrap[k] for k in FUSION_BOOT_KEYS], dtype=np.float64)

    def fused_interval(self, image_prob: float, answers: Mapping, level: float = 0.95) -> tuple[float, float] | None:
        """The fused probability's `level` interval over the fusion's refits (None when none are stored), widened
        to contain the fitted fusion's own value, as core.calibration does for the photo-only probability."""
        if not self.fusion_bootstrap:
            return None
        a, b, c = self._refits
        values = sigmoid(a + b * image_logit(image_prob) + c * self.context_logit(answers))
        lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
        point = float(sigmoid(self.fused_logit(image_prob, answers)))
        return min(float(lo), point), max(float(hi), point)

    def interval_sentence(self, ci: tuple[float, float] | None, text: str) -> str:
        """What the fused probability's interval (printed as `text`) means, or why there is none."""
        if ci is None:
            return ("No interval: this context stage has no refits of its fusion stored (it was saved before they "
                    "were kept, or too few of its resamples held both malignant and benign photos).")
        b = self.fusion_bootstrap
        unit = RESAMPLED.get(b["unit"], "whole groups resampled")
        return (f"95% interval {text}: the fusion refitted on {b['fits']} bootstrap resamples of the {b['n']} photos "
                f"it was fitted on ({unit}) put this number in that range. The photo model and the answers' weights "
                "are held fixed, so the range shows how much fitting the fusion on other patients would move it, not "
                "every uncertainty.")

    def contribution(self, name: str, value) -> float:
        w = self.weights[name]
        if value is None:
            return float(w["missing"])
        if w["kind"] == "numeric":
            return float(w["weight"]) * _z(value, w["mean"], w["std"])
        return float(w["weights"].get(value, 0.0))

    def context_logit(self, answers: Mapping) -> float:
        return self.intercept + sum(self.contribution(f, answers.get(f)) for f in self.fields)

    def fused_logit(self, image_prob: float, answers: Mapping) -> float:
        f = self.fusion
        return f["intercept"] + f["image"] * image_logit(image_prob) + f["context"] * self.context_logit(answers)

    def threshold_note(self) -> str:
        """The fused threshold's numbers in words: where it was chosen, and why they lean optimistic."""
        t = self.threshold
        where = str(t.get("chosen_on") or "validation split").removesuffix(" (fused output)")
        sens, spec = (t.get(k) or {} for k in ("val_sensitivity", "val_specificity"))
        if sens.get("value") is None or spec.get("value") is None:
            return (f"Photo + answers threshold chosen on the {where}; its sensitivity and specificity there are not "
                    "recorded.")
        return (f"Photo + answers threshold chosen on the {where}: sensitivity {sens['value']:.0%}, specificity "
                f"{spec['value']:.0%} on {t.get('n_val', '?')} images. The fusion was fitted on those same images, so "
                "these two numbers lean optimistic; held-out patients measure them (a test report, or a "
                "cross-validated run's check on new patients).")

    def answered_note(self, used) -> str | None:
        """When fewer questions were answered than the stage has: its numbers were measured with the validation
        photos' own answers to all of them, so for this photo they are not measured."""
        if len(set(used)) >= len(self.fields):
            return None
        return (f"Those numbers come from photos with answers to the stage's {len(self.fields)} questions (as their "
                f"records had them); with {len(set(used))} answered here, how well it does is not measured.")

    def per_field_weights(self) -> dict:
        """Each field's weight in the fused logit (context weight x fusion weight): what each answer adds."""
        c = self.fusion["context"]
        out = {}
        for name in self.fields:
            w = self.weights[name]
            if w["kind"] == "numeric":
                out[name] = {"per_std": round(c * w["weight"], 4), "std": w["std"], "missing": round(c * w["missing"],
                                                                                                     4)}
            else:
                out[name] = {**{k: round(c * v, 4) for k, v in w["weights"].items()},
                             "missing": round(c * w["missing"], 4)}
        return out


@dataclass(frozen=True)
class Fused:
    """One fused prediction: what was used, and the image-only result beside it."""
    prob: float
    malignant: bool
    threshold: float
    used: tuple[str, ...]          # the answered context fields that entered the model
    image_prob: float
    image_malignant: bool
    image_threshold: float
    ignored: tuple[str, ...] = ()  # answers given for fields this model does not use
    ci95: tuple[float, float] | None = None  # prob's interval over the fusion's refits (None: none stored, or unfused)

    @property
    def inputs(self) -> str:
        n = len(self.used)
        return "photo only" if not n else f"photo + {n} answer{'s' if n != 1 else ''}"

    @property
    def used_words(self) -> str:
        """The answers used, named as a clinician would ('age, bleeding'), in the stage's field order."""
        return ", ".join(FIELDS[f].word for f in self.used)

    @property
    def verdicts_differ(self) -> bool:
        return self.malignant != self.image_malignant


def fuse(model: ContextModel | None, image_prob: float, image_threshold: float, answers: Mapping | None) -> Fused:
    """The fused result for one photo's P(malignant) and any subset of answers (raw values are normalised).

    No answer (or no context stage): the image-only probability and threshold, unchanged."""
    image_malignant = image_prob >= image_threshold
    given = {k: v for k, v in (answers or {}).items() if not _blank(v)}
    ignored = tuple(k for k in given if model is None or k not in model.fields)
    clean = answers_of(given, model.fields) if model is not None else {}
    if not clean:
        return Fused(image_prob, image_malignant, image_threshold, (), image_prob, image_malignant, image_threshold,
                     ignored)
    p = sigmoid(model.fused_logit(image_prob, clean))
    t = float(model.threshold["value"])
    return Fused(p, p >= t, t, tuple(f for f in model.fields if f in clean), image_prob, image_malignant,
                 image_threshold, ignored, model.fused_interval(image_prob, clean))


def fused_probs(model: ContextModel, image_probs, answers: pd.DataFrame, image_threshold: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise fuse over a context_frame: (probabilities, thresholds, number of answers used)."""
    out = [fuse(model, float(p), image_threshold, {k: v for k, v in row.items() if v is not None})
           for p, row in zip(image_probs, answers.to_dict("records"))]
    return (np.array([r.prob for r in out]), np.array([r.threshold for r in out]),
            np.array([len(r.used) for r in out]))


def image_logit(p) -> float | np.ndarray:
    """The image probability on the logit scale, as the fusion reads it (clipped at 1e-6: the clip every stored
    context stage was fitted with; a different clip would move the fused score of very confident photos)."""
    return logit(p, eps=1e-6)


FUSION_BOOT_KEYS = ("intercept", "image", "context")


def check_fusion_bootstrap(boot: Mapping, where: str = "context") -> dict:
    """A stored set of fusion refits: equal-length lists of finite numbers under FUSION_BOOT_KEYS, `fits` of them."""
    if not boot:
        return {}
    try:
        arrays = [np.asarray(boot[k], dtype=np.float64) for k in FUSION_BOOT_KEYS]
        fits = int(boot["fits"])
    except (KeyError, TypeError, ValueError) as e:
        raise ContextError(f"{where}: fusion_bootstrap incomplete or malformed: {e}") from None
    if any(x.ndim != 1 or len(x) != fits or not np.isfinite(x).all() for x in arrays) or fits < 1:
        raise ContextError(f"{where}: fusion_bootstrap needs {fits} finite numbers under each of {FUSION_BOOT_KEYS}")
    return dict(boot)


def _z(x, mean, std) -> float:
    return float(np.clip((float(x) - mean) / std, -CLIP_Z, CLIP_Z))


def context_of(meta) -> ContextModel | None:
    """The context stage of a bundle's metadata (core.bundle.BundleMeta, or its JSON form), or None."""
    raw = meta.get("context") if isinstance(meta, Mapping) else getattr(meta, "context", None)
    return raw if raw is None or isinstance(raw, ContextModel) else ContextModel.from_dict(raw)
