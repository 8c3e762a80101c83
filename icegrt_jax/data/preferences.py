"""Reward-model data: labelers' rankings (the paper's) or ready-made pairs -> (chosen, rejected).

Two JSONL record shapes are accepted, and may be mixed in one file:

- Rankings (paper section 3.2 / 4.1)::

    {"prompt": "...", "responses": ["r0", "r1", "r2", "r3", "r4"],
     "rankings": [[3, 0, 4, 1, 2], [3, 4, 0, 1, 2], [0, 3, 4, 2, 1]]}

  ``rankings`` holds one best-first permutation of the response indices per labeler. Their
  consensus is ``aggregate_rankings`` (Borda count, ties by head-to-head majority, then index)
  and the pairs are ``ranking_to_pairs(consensus, top_k, bottom_k)``: 5 responses -> 4 pairs.
  Every ranking record of a dataset must have the same number of responses and of labelers
  (the paper: 5 and 3); a record that differs is an error naming its line, since mixed counts
  usually mean a broken export. A response may be empty (a sample that ended at once); an
  optional ``truncated`` list (one flag a response, as ``icegrt sample`` writes) marks responses
  cut at the maximum length, which are trained on without EOS, as PPO scores them. Pairs
  that carry no preference are dropped and counted in the report: two identical response texts
  (sampling can repeat itself), and two responses without a labeler majority for the order the
  consensus gives them (``labelers_prefer``): a tie (as many Borda points and no strict majority
  either way, e.g. an even number of labelers split evenly) or a cycle, with any number of
  labelers: three who rank ``[0,1,2,3,4]``, ``[0,2,3,1,4]`` and ``[0,3,1,2,4]`` give 1, 2 and 3
  the same points, a majority prefers 1 to 2, 2 to 3 and 3 to 1, and the consensus
  ``[0,1,2,3,4]`` pairs 1 (top 2) against 3 (bottom 2) though 2 of 3 labelers prefer 3.
- Pairs::

    {"prompt": "...", "chosen": "...", "rejected": "..."}

  or UltraFeedback-binarised's shape, ``chosen`` and ``rejected`` as messages
  ``[{"role": "user", "content": <the prompt>}, {"role": "assistant", "content": <the response>}]``
  (a first message that is not the prompt's user turn, or more turns, is an error naming the
  field). Identical ``chosen`` and ``rejected`` responses are dropped and counted, as above.

Blank lines and records repeating an earlier one are counted in the report (``SourceReport``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from icegrt_jax.data.rankings import (
    InvalidRankingError,
    aggregate_rankings,
    labelers_prefer,
    ranking_to_pairs,
)
from icegrt_jax.data.sources import DataError, SourceReport, iter_records, required_text


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """``*_ended``: whether that response ended with EOS (false for a sample cut at its maximum
    length: trained on without EOS, as PPO scores a truncated rollout)."""

    prompt: str
    chosen: str
    rejected: str
    source: str
    chosen_ended: bool = True
    rejected_ended: bool = True


@dataclasses.dataclass
class PreferenceReport:
    """What a preference dataset held, and labeler agreement over its ranking records."""

    ranking_records: int = 0
    pair_records: int = 0
    pairs: int = 0
    identical_pairs_dropped: int = 0
    tied_pairs_dropped: int = 0  # no labeler majority for the consensus order: ties or cycles
    responses_per_prompt: int | None = None
    labelers_per_prompt: int | None = None
    kendall_w_sum: float = 0.0
    kendall_tau_sum: float = 0.0
    source: SourceReport = dataclasses.field(default_factory=SourceReport)

    @property
    def mean_kendall_w(self) -> float | None:
        return self.kendall_w_sum / self.ranking_records if self.ranking_records else None

    @property
    def mean_kendall_tau(self) -> float | None:
        if not self.ranking_records or (self.labelers_per_prompt or 0) < 2:
            return None
        return self.kendall_tau_sum / self.ranking_records

    def metrics(self) -> dict[str, float]:
        out = {"ranking_records": self.ranking_records, "pair_records": self.pair_records,
               "pairs": self.pairs, "identical_pairs_dropped": self.identical_pairs_dropped,
               "tied_pairs_dropped": self.tied_pairs_dropped, **self.source.metrics()}
        for name in ("mean_kendall_w", "mean_kendall_tau"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def summary(self) -> str:
        text = (f"{self.pairs} pairs from {self.ranking_records} ranking records and "
                f"{self.pair_records} pair records; {self.identical_pairs_dropped} identical pairs dropped")
        if self.tied_pairs_dropped:
            text += (f"; {self.tied_pairs_dropped} pairs without a labeler majority for the consensus order "
                     "(ties or cycles) dropped")
        if self.ranking_records:
            text += (f"; {self.responses_per_prompt} responses x {self.labelers_per_prompt} labelers a prompt, "
                     f"Kendall's W {self.mean_kendall_w:.3f}")
            if self.mean_kendall_tau is not None:
                text += f", mean Kendall tau {self.mean_kendall_tau:.3f}"
        return self.source.appended_to(text)


def load_preferences(specs: Sequence[str], top_k: int = 2, bottom_k: int = 2
                     ) -> tuple[list[PreferencePair], PreferenceReport]:
    """All (chosen, rejected) pairs of the given files, and the report."""
    if not specs:
        raise DataError("no preference files given")
    pairs: list[PreferencePair] = []
    report = PreferenceReport()
    for spec in specs:
        for where, record in iter_records(spec, report.source):
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected an object, got {type(record).__name__}")
            # a null field counts as absent: a table mixing both shapes has every column in every row
            if record.get("rankings") is not None or record.get("responses") is not None:
                pairs += _ranking_pairs(record, where, top_k, bottom_k, report)
            else:
                pairs += _explicit_pair(record, where, report)
    report.pairs = len(pairs)
    if not pairs:
        raise DataError(f"{', '.join(specs)}: no preference pairs ({report.summary()})")
    return pairs, report


def _explicit_pair(record: dict, where: str, report: PreferenceReport) -> list[PreferencePair]:
    """The record's pair; none when ``chosen`` and ``rejected`` are identical (counted)."""
    prompt = required_text(record, "prompt", where)
    chosen, rejected = (_pair_response(record, key, prompt, where) for key in ("chosen", "rejected"))
    report.pair_records += 1
    if chosen == rejected:
        report.identical_pairs_dropped += 1
        return []
    return [PreferencePair(prompt, chosen, rejected, where)]


def _pair_response(record: dict, key: str, prompt: str, where: str) -> str:
    """Field ``key``: a string, or UltraFeedback-binarised's [prompt's user turn, response] messages."""
    messages = record.get(key)
    if not isinstance(messages, list):
        return required_text(record, key, where)
    if len(messages) != 2 or not all(isinstance(m, dict) for m in messages) or \
            [m.get("role") for m in messages] != ["user", "assistant"]:
        raise DataError(f"{where}: field '{key}' must be a string or two messages, the prompt's user turn "
                        "and the assistant's response")
    if messages[0].get("content") != prompt:
        raise DataError(f"{where}: field '{key}[0].content' differs from field 'prompt'")
    return required_text(messages[1], "content", where, name=f"{key}[1].content")


def _ranking_pairs(record: dict, where: str, top_k: int, bottom_k: int,
                   report: PreferenceReport) -> list[PreferencePair]:
    prompt = required_text(record, "prompt", where)
    responses, rankings = record.get("responses"), record.get("rankings")
    if not isinstance(responses, list) or not responses:
        raise DataError(f"{where}: field 'responses' must be a non-empty list of strings")
    for i, text in enumerate(responses):  # an empty response is a real (bad) sample: it gets ranked
        if not isinstance(text, str):
            raise DataError(f"{where}: field 'responses[{i}]' must be a string, got {type(text).__name__}")
    texts = list(responses)
    if not isinstance(rankings, list) or not rankings or not all(isinstance(r, list) for r in rankings):
        raise DataError(f"{where}: field 'rankings' must be a non-empty list of rankings (one per labeler)")
    _check_counts(report, len(texts), len(rankings), where)
    try:
        for k, ranking in enumerate(rankings):
            if len(ranking) != len(texts):
                raise InvalidRankingError(f"labeler {k} ranks {len(ranking)} responses, expected {len(texts)}")
        consensus = aggregate_rankings(rankings)
        index_pairs = ranking_to_pairs(consensus.order, top_k, bottom_k)
    except InvalidRankingError as e:
        raise DataError(f"{where}: field 'rankings': {e}") from None
    report.ranking_records += 1
    report.kendall_w_sum += consensus.kendall_w
    report.kendall_tau_sum += consensus.mean_kendall_tau or 0.0
    decided = [(i, j) for i, j in index_pairs if labelers_prefer(rankings, consensus.borda_points, i, j)]
    kept = [(i, j) for i, j in decided if texts[i] != texts[j]]
    report.tied_pairs_dropped += len(index_pairs) - len(decided)
    report.identical_pairs_dropped += len(decided) - len(kept)
    ended = _ended_flags(record, len(texts), where)
    return [PreferencePair(prompt, texts[i], texts[j], where, ended[i], ended[j]) for i, j in kept]


def _ended_flags(record: dict, count: int, where: str) -> list[bool]:
    """Which responses ended with EOS: not those ``truncated`` lists (``icegrt sample`` writes it),
    all when the record has no such field."""
    truncated = record.get("truncated")
    if truncated is None:
        return [True] * count
    if not (isinstance(truncated, list) and len(truncated) == count and all(isinstance(t, bool) for t in truncated)):
        raise DataError(f"{where}: field 'truncated' must be a list of {count} true/false values, one a response")
    return [not t for t in truncated]


def _check_counts(report: PreferenceReport, responses: int, labelers: int, where: str):
    if report.responses_per_prompt is None:
        report.responses_per_prompt, report.labelers_per_prompt = responses, labelers
    elif responses != report.responses_per_prompt:
        raise DataError(f"{where}: field 'responses' has {responses} responses; earlier records have "
                        f"{report.responses_per_prompt}")
    elif labelers != report.labelers_per_prompt:
        raise DataError(f"{where}: field 'rankings' has {labelers} labelers; earlier records have "
                        f"{report.labelers_per_prompt}")
