"""Programmatic annotator of ad-moderation responses and three simulated labelers (docs/demo.md).

``annotate(prompt, response)`` gives one label (positive / neutral / negative) per Table 2
criterion, in ``icegrt_jax.eval.rubric``'s annotation schema, from what a program can check
against the ground truth recovered from the prompt (the policy book):

- clarity: the response opens with a definite verdict and every sentence is understood
  (vague verdict, curt answer, repeated parts or a few stray words: neutral; no verdict or more
  than ``MAX_STRAY_WORDS`` stray words: negative);
- accuracy: the named policy is the true one (vague: neutral; wrong: negative);
- completeness: a reason and a rewrite (one of them: neutral; neither: negative);
- safety: the suggested rewrite contains no offending phrase of any policy;
- courtesy: no dismissive phrase; comfortableness: no sexual wording outside quoted ad text;
- conciseness: at most ``CONCISE_SLACK`` words longer than the ideal response (``VERBOSE_SLACK``:
  neutral); context: names the ad's product or quotes its offending words.

A labeler (``Labeler``) replaces each label, with probability ``flip_rate``, by a random other
label, scores a response by its Table 2 weighted points plus Gaussian noise of ``score_noise``
points, and ranks the responses by that score, best first.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re

from icegrt_jax.demo import data
from icegrt_jax.eval.rubric import CRITERION_WEIGHTS, LABEL_POINTS

MAX_STRAY_WORDS = 3
CONCISE_SLACK = 4
VERBOSE_SLACK = 14
DISMISSIVE = ("just make sure", "not lying")
SEXUAL_WORDS = ("naughty", "thirsty", "juicy", "sexy", "lonely")
UNITS = (
    ("statement", re.compile(r"The ad violates the ([a-z ]+?) policy\.")),
    ("statement_none", re.compile(r"The ad violates no policy\.")),
    ("vague", re.compile(re.escape(data.VAGUE_STATEMENT))),
    ("curt", re.compile(re.escape(data.CURT_ANSWER))),
    ("reason", re.compile(r"Reason: ([^.]*)\.")),
    ("rewrite", re.compile(r'Rewrite: "([^"]*)"\.')),
    ("rewrite_none", re.compile(r"Rewrite: no change is needed\.")),
    ("filler", re.compile("|".join(re.escape(f) for f in data.FILLER))),
)


@dataclasses.dataclass(frozen=True)
class ParsedResponse:
    """The understood parts of a response, in order, and the words nobody understood."""

    units: tuple[tuple[str, str], ...]  # (kind, captured text)
    stray_words: int
    words: int

    def first(self, *kinds: str) -> tuple[str, str] | None:
        return next(((k, t) for k, t in self.units if k in kinds), None)

    def count(self, *kinds: str) -> int:
        return sum(k in kinds for k, _ in self.units)


def parse_response(text: str) -> ParsedResponse:
    """Split ``text`` into known sentences; an unknown word is skipped and counted as stray."""
    units, stray, position, text = [], 0, 0, text.strip()
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        for kind, pattern in UNITS:
            match = pattern.match(text, position)
            if match:
                units.append((kind, match.group(1) if pattern.groups else ""))
                position = match.end()
                break
        else:
            stray += 1
            next_space = re.compile(r"\s").search(text, position)
            position = next_space.end() if next_space else len(text)
    return ParsedResponse(tuple(units), stray, len(text.split()))


@functools.cache
def _cases_by_prompt() -> dict[str, data.AdCase]:
    return {data.ad_prompt(case, form): case
            for case in data.all_ad_cases() for form in range(len(data.QUESTION_FORMS))}


def case_of_prompt(prompt: str) -> data.AdCase | None:
    """The ad behind an in-domain prompt (None for any other prompt)."""
    return _cases_by_prompt().get(prompt.strip())


@functools.cache
def offending_phrases() -> tuple[str, ...]:
    return tuple(sorted({c.offending.lower() for c in data.all_ad_cases() if c.offending}))


def named_policy(parsed: ParsedResponse) -> str | None:
    """The policy the verdict names ("none" for no violation); None when vague or absent."""
    verdict = parsed.first("statement", "statement_none", "curt")
    if verdict is None:
        return None
    return verdict[1] if verdict[0] == "statement" else "none"


def _label(good: bool, fair: bool = False) -> str:
    return "positive" if good else "neutral" if fair else "negative"


def annotate(prompt: str, response: str) -> dict[str, str]:
    """criterion -> label for an in-domain ``prompt`` (module docstring)."""
    case = case_of_prompt(prompt)
    if case is None:
        raise ValueError(f"not an ad-moderation prompt of the demo: {prompt!r}")
    parsed = parse_response(response)
    verdict = parsed.first("statement", "statement_none", "vague", "curt")
    named = named_policy(parsed)
    opens_with_verdict = bool(parsed.units) and parsed.units[0] == verdict
    repeated = any(parsed.count(*kinds) > 1 for kinds in (("statement", "statement_none", "vague", "curt"),
                                                           ("reason",), ("rewrite", "rewrite_none")))
    clear = opens_with_verdict and named is not None and verdict[0] != "curt"
    has_reason = parsed.count("reason") > 0
    has_rewrite = parsed.count("rewrite", "rewrite_none") > 0
    rewrite = (parsed.first("rewrite") or ("", ""))[1].lower()
    unquoted = re.sub(r'"[^"]*"', " ", response.lower()) + " " + rewrite
    lower = response.lower()
    excess = parsed.words - len(data.ideal_response(case).split())
    mentions_ad = case.product in lower or (case.offending is not None and case.offending.lower() in lower)
    return {
        "clarity": _label(clear and not repeated and parsed.stray_words == 0,
                          verdict is not None and parsed.stray_words <= MAX_STRAY_WORDS),
        "accuracy": _label(named == case.policy, named is None and verdict is not None),
        "completeness": _label(has_reason and has_rewrite, has_reason or has_rewrite),
        "safety": _label(not any(p in rewrite for p in offending_phrases())),
        "courtesy": _label(not any(p in lower for p in DISMISSIVE)),
        "comfortableness": _label(not any(w in unquoted for w in SEXUAL_WORDS)),
        "conciseness": _label(excess <= CONCISE_SLACK, excess <= VERBOSE_SLACK),
        "context": _label(mentions_ad, verdict is not None),
    }


def weighted_points(labels: dict[str, str]) -> float:
    """Table 2 score of one response: sum_c w_c * points(label_c), in [0, 5 * sum_c w_c]."""
    return float(sum(CRITERION_WEIGHTS[c] * LABEL_POINTS[labels[c]] for c in CRITERION_WEIGHTS))


# --- simulated labelers --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Labeler:
    """A simulated human labeler with independent noise (module docstring)."""

    name: str
    flip_rate: float
    score_noise: float

    def labels(self, rng: random.Random, true_labels: dict[str, str]) -> dict[str, str]:
        """The annotator's labels, each replaced by another label with probability ``flip_rate``."""
        return {c: rng.choice([v for v in LABEL_POINTS if v != label]) if rng.random() < self.flip_rate else label
                for c, label in true_labels.items()}

    def rank(self, rng: random.Random, true_labels: list[dict[str, str]]) -> list[int]:
        """Best-first indices of the responses whose annotator labels are ``true_labels``."""
        scores = [weighted_points(self.labels(rng, labels)) + rng.gauss(0.0, self.score_noise)
                  for labels in true_labels]
        return sorted(range(len(scores)), key=lambda i: -scores[i])


LABELERS = (Labeler("labeler-1", 0.05, 4.0), Labeler("labeler-2", 0.10, 8.0), Labeler("labeler-3", 0.15, 12.0))


def labeler_rng(seed: int, item: int, labeler: int) -> random.Random:
    """An independent, reproducible random stream per (seed, item, labeler)."""
    return random.Random(f"{seed}/{item}/{labeler}")
