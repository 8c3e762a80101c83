"""The paper's manual-annotation rubric (Table 2), scored per model in the shape of Table 3.

Each response gets one label per criterion from each labeler: Positive = 5, Neutral = 2,
Negative = 0 points. With ``p(a, c)`` the points of annotation ``a`` on criterion ``c``:

- criterion score of a model: ``S_c = 100 * mean_items( mean_labelers p(a, c) ) / 5`` (every
  response counts once, however many labelers scored it);
- overall score: ``S = sum_c w_c * S_c / sum_c w_c`` with the Table 2 weights ``w`` (Clarity,
  Accuracy, Completeness 6; Safety, Courtesy, Comfortableness 3; Conciseness, Context 1). This
  reproduces Table 3's "Overall Score" row from its criterion rows.

Inter-annotator agreement is Fleiss' kappa per criterion over all responses that two or more
labelers scored (pooled over models), in the form that allows a varying number of labelers per
response (Fleiss 1971 when the number is constant)::

    P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1))      n_ij: labelers giving response i label j
    p_j = sum_i n_ij / sum_i n_i                       P_e = sum_j p_j^2
    kappa = (mean_i P_i - P_e) / (1 - P_e)             undefined (NaN) when P_e = 1

Annotation JSONL, one line per (response, labeler); see docs/eval.md::

    {"model": "ICE-GRT", "prompt_id": "q17", "labeler": "ann1",
     "labels": {"clarity": "positive", "accuracy": "neutral", ..., "context": "positive"}}
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from icegrt_jax.data.sources import jsonl_records
from icegrt_jax.errors import UserInputError
from icegrt_jax.eval import markdown_table

CRITERION_WEIGHTS: dict[str, int] = {
    "clarity": 6, "accuracy": 6, "completeness": 6,
    "safety": 3, "courtesy": 3, "comfortableness": 3,
    "conciseness": 1, "context": 1,
}
LABEL_POINTS: dict[str, int] = {"positive": 5, "neutral": 2, "negative": 0}
MAX_POINTS = max(LABEL_POINTS.values())
REQUIRED_FIELDS = ("model", "prompt_id", "labeler", "labels")


class AnnotationError(UserInputError):
    """A malformed annotation file or record."""


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One labeler's labels for one model's response to one prompt."""

    model: str
    prompt_id: str
    labeler: str
    labels: dict[str, str]  # criterion -> label, all criteria, lower case


# --- parsing -----------------------------------------------------------------------------------

def parse_annotation(record, where: str) -> Annotation:
    """Validate one decoded JSON record; ``where`` (file:line) prefixes every error."""
    if not isinstance(record, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise AnnotationError(f"{where}: missing field(s) {', '.join(missing)}")
    for field in ("model", "labeler", "prompt_id"):  # a prompt id may also be an integer
        value = record[field]
        is_id = isinstance(value, int) and not isinstance(value, bool) and field == "prompt_id"
        if not (is_id or (isinstance(value, str) and value.strip())):
            expected = "a non-empty string or an integer" if field == "prompt_id" else "a non-empty string"
            raise AnnotationError(f"{where}: '{field}' must be {expected}, got {value!r}")
    if not isinstance(record["labels"], dict):
        raise AnnotationError(f"{where}: 'labels' must be an object of criterion -> label")
    labels = {}
    for criterion, label in record["labels"].items():
        name, value = str(criterion).strip().lower(), str(label).strip().lower()
        if name not in CRITERION_WEIGHTS:
            raise AnnotationError(f"{where}: unknown criterion {criterion!r} "
                                  f"(expected one of {', '.join(CRITERION_WEIGHTS)})")
        if value not in LABEL_POINTS:
            raise AnnotationError(f"{where}: unknown label {label!r} for {name} "
                                  f"(expected one of {', '.join(LABEL_POINTS)})")
        if name in labels:
            raise AnnotationError(f"{where}: criterion {name!r} labelled twice ({criterion!r})")
        labels[name] = value
    absent = [c for c in CRITERION_WEIGHTS if c not in labels]
    if absent:
        raise AnnotationError(f"{where}: no label for criterion(s) {', '.join(absent)}")
    return Annotation(str(record["model"]), str(record["prompt_id"]), str(record["labeler"]), labels)


def load_annotations(paths: Sequence[str]) -> list[Annotation]:
    """All annotations of the JSONL files (blank lines skipped); duplicates are errors."""
    annotations, seen = [], {}
    for path in paths:
        for where, record in jsonl_records(path, AnnotationError):
            annotation = parse_annotation(record, where)
            key = (annotation.model, annotation.prompt_id, annotation.labeler)
            if key in seen:
                raise AnnotationError(f"{where}: labeler {key[2]!r} already scored model {key[0]!r} "
                                      f"on prompt {key[1]!r} (at {seen[key]})")
            seen[key] = where
            annotations.append(annotation)
    if not annotations:
        raise AnnotationError(f"no annotations in {', '.join(paths)}")
    return annotations


# --- scores ------------------------------------------------------------------------------------

def _by_response(annotations: Iterable[Annotation]) -> dict[tuple[str, str], list[Annotation]]:
    responses = defaultdict(list)
    for a in annotations:
        responses[(a.model, a.prompt_id)].append(a)
    return responses


def criterion_scores(annotations: Sequence[Annotation]) -> dict[str, dict[str, float]]:
    """model -> criterion -> S_c in percent (module docstring), models in order of appearance."""
    per_model: dict[str, list[list[Annotation]]] = defaultdict(list)
    for (model, _), group in _by_response(annotations).items():
        per_model[model].append(group)
    return {
        model: {c: 100.0 * float(np.mean([np.mean([LABEL_POINTS[a.labels[c]] for a in group])
                                          for group in groups])) / MAX_POINTS
                for c in CRITERION_WEIGHTS}
        for model, groups in per_model.items()
    }


def overall_score(scores: dict[str, float]) -> float:
    """S = sum_c w_c S_c / sum_c w_c over the Table 2 weights."""
    return sum(CRITERION_WEIGHTS[c] * scores[c] for c in CRITERION_WEIGHTS) / sum(CRITERION_WEIGHTS.values())


def fleiss_kappa(counts) -> float:
    """Fleiss' kappa of ``counts[i, j]`` = raters putting item i in category j (module docstring).

    Items may have different numbers of raters (each at least 2); NaN when chance agreement is 1.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or len(counts) == 0 or np.any(counts.sum(axis=1) < 2):
        raise ValueError("fleiss_kappa needs a non-empty [items, categories] table with >= 2 raters an item")
    raters = counts.sum(axis=1)
    observed = np.mean((np.sum(counts ** 2, axis=1) - raters) / (raters * (raters - 1)))
    chance = np.sum((counts.sum(axis=0) / raters.sum()) ** 2)
    return float("nan") if math.isclose(chance, 1.0) else float((observed - chance) / (1.0 - chance))


def agreement(annotations: Sequence[Annotation]) -> dict[str, float | None] | None:
    """criterion -> Fleiss' kappa over the responses scored by >= 2 labelers (None where undefined:
    every label the same); None if no response has two labelers."""
    shared = [group for group in _by_response(annotations).values() if len(group) >= 2]
    if not shared:
        return None
    categories = list(LABEL_POINTS)
    kappas = {c: fleiss_kappa([[sum(a.labels[c] == label for a in group) for label in categories]
                               for group in shared])
              for c in CRITERION_WEIGHTS}
    return {c: None if math.isnan(k) else k for c, k in kappas.items()}


def rubric_report(annotations: Sequence[Annotation]) -> dict:
    """JSON-ready report: per-model criterion and overall scores (percent), agreement, counts."""
    scores = criterion_scores(annotations)
    responses = _by_response(annotations)
    return {
        "scores": {m: {**s, "overall": overall_score(s)} for m, s in scores.items()},
        "fleiss_kappa": agreement(annotations),
        "responses": {m: sum(1 for (model, _) in responses if model == m) for m in scores},
        "shared_responses": sum(1 for group in responses.values() if len(group) >= 2),
        "labelers": sorted({a.labeler for a in annotations}),
    }


def render_markdown(report: dict) -> str:
    """Table 3's layout (criteria as rows, models as columns) and, if any, the kappa table."""
    models = list(report["scores"])
    rows = [[f"{c.capitalize()} ({w})"] + [f"{report['scores'][m][c]:.1f}%" for m in models]
            for c, w in CRITERION_WEIGHTS.items()]
    rows.append(["Overall Score"] + [f"{report['scores'][m]['overall']:.1f}%" for m in models])
    text = markdown_table(["Criterion (weight)"] + models, rows)
    text += "\n\nResponses scored: " + ", ".join(f"{m} {report['responses'][m]}" for m in models) + "\n"
    kappa = report["fleiss_kappa"]
    if kappa is not None:
        text += (f"\nInter-annotator agreement (Fleiss' kappa over {report['shared_responses']} responses "
                 f"scored by >= 2 of {len(report['labelers'])} labelers):\n\n")
        text += markdown_table(["Criterion", "Fleiss' kappa"],
                               [[c.capitalize(), "n/a" if k is None else f"{k:.3f}"] for c, k in kappa.items()])
        text += "\n"
    return text
