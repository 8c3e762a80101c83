"""Tokenisation of conversations into token ids and a response mask, with counted truncation.

An example's ids are ``[BOS] + preamble + per round (prompt + response + [EOS])`` (BOS only when
the tokenizer has one). Each template segment is tokenised on its own (``add_special_tokens=False``,
``split_special_tokens=True`` so text such as "</s>" inside a message stays text) and the ids are
concatenated, so segment boundaries are exact. ``response_mask`` is True on every response token
and on the EOS that ends each round, False on BOS, preamble and prompts.

Truncation of an example longer than ``max_length`` tokens (a policy, never silent; every
decision is counted in a ``TruncationReport``):

- ``drop_example``: the example is dropped.
- ``drop_earliest_rounds``: whole earliest rounds are removed (BOS and preamble stay) until it
  fits; it is dropped only when its last round alone does not fit. Text is never cut mid-segment.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from icegrt_jax.data.sources import Conversation, DataError, SourceReport
from icegrt_jax.data.templates import Round, Template

TRUNCATION_POLICIES = ("drop_example", "drop_earliest_rounds")
_ENCODE_CHUNK = 1024  # conversations tokenised per tokenizer call


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids ``[L] int32`` and the aligned ``response_mask [L] bool`` of one example."""

    input_ids: np.ndarray
    response_mask: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TruncationReport:
    """What the truncation policy did to a dataset (for the trainer's log)."""

    max_length: int
    head_tokens: int = 0  # the template's preamble (and BOS) every example starts with
    examples: int = 0
    kept_whole: int = 0
    shortened: int = 0  # examples that lost their earliest rounds
    rounds_removed: int = 0
    dropped: int = 0
    dropped_sources: list[str] = field(default_factory=list)
    source: SourceReport | None = None  # what reading the files skipped or found repeated

    def record(self, source: str, first_kept: int | None) -> None:
        """Count one example: kept from round ``first_kept`` on, or dropped when None."""
        self.examples += 1
        if first_kept is None:
            self.dropped += 1
            self.dropped_sources.append(source)
        elif first_kept:
            self.shortened += 1
            self.rounds_removed += first_kept
        else:
            self.kept_whole += 1

    def metrics(self) -> dict[str, int]:
        return {"examples": self.examples, "kept_whole": self.kept_whole,
                "shortened": self.shortened, "rounds_removed": self.rounds_removed,
                "dropped": self.dropped}

    def summary(self) -> str:
        text = (f"{self.examples} examples (max_length {self.max_length}): {self.kept_whole} whole, "
                f"{self.shortened} shortened by {self.rounds_removed} earliest rounds, "
                f"{self.dropped} dropped as too long")
        if self.dropped_sources:
            shown = ", ".join(self.dropped_sources[:3])
            text += f" (e.g. {shown}{', ...' if self.dropped > 3 else ''})"
        return text if self.source is None else self.source.appended_to(text)


def load_tokenizer(path: str) -> Any:
    """A transformers tokenizer from a local directory (no hub access, no remote code)."""
    from transformers import (
        AutoTokenizer,  # imported on use: it takes seconds to import
    )

    if not Path(path).is_dir():
        raise DataError(f"{path}: no such tokenizer directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:  # no or broken tokenizer files (transformers' own errors)
        raise DataError(f"{path}: cannot load a tokenizer ({type(e).__name__}); the directory needs "
                        "tokenizer files (tokenizer.json, or tokenizer.model with tokenizer_config.json)") from None
    if tokenizer.eos_token_id is None:
        raise DataError(f"{path}: the tokenizer has no eos token")
    return tokenizer


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: pad, else unk, else eos (its value never reaches the loss)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise DataError("the tokenizer has no pad, unk or eos token")


def first_kept_round(head_length: int, round_lengths: Sequence[int], max_length: int,
                     policy: str) -> int | None:
    """Index of the first round to keep so the example fits ``max_length``; None: drop it.

    ``head_length`` counts BOS and preamble; ``round_lengths`` count prompt + response + EOS.
    """
    if policy not in TRUNCATION_POLICIES:
        raise ValueError(f"unknown truncation policy {policy!r}; choose from {TRUNCATION_POLICIES}")
    length = head_length + sum(round_lengths)
    if length <= max_length:
        return 0
    if policy == "drop_earliest_rounds":
        for k, removed in enumerate(round_lengths[:-1], start=1):
            length -= removed
            if length <= max_length:
                return k
    return None


def tokenize_conversations(conversations: Sequence[Conversation], tokenizer: Any,
                           template: Template, *, max_length: int, truncation: str,
                           progress: bool = False, source: SourceReport | None = None
                           ) -> tuple[list[TokenizedExample], TruncationReport]:
    """Tokenise, mask and truncate; returns the kept examples and the report of what was cut, with
    ``source`` (what reading the conversations skipped or found repeated) in it (``progress``: a
    bar over the conversations)."""
    check_segment_boundaries(tokenizer, template)
    head = _head_ids(tokenizer, template)
    report = TruncationReport(max_length=max_length, head_tokens=len(head), source=source)
    examples = []
    bar = tqdm(total=len(conversations), desc="tokenize", unit="example", leave=False, disable=not progress)
    for start in range(0, len(conversations), _ENCODE_CHUNK):
        chunk = conversations[start:start + _ENCODE_CHUNK]
        encoded = iter(_encode(tokenizer, [t for c in chunk for t in _round_texts(template, c.rounds)]))
        for conversation in chunk:
            rounds = _pair_rounds(encoded, len(conversation.rounds), tokenizer.eos_token_id)
            first = first_kept_round(len(head), [len(p) + len(r) for p, r in rounds],
                                     max_length, truncation)
            report.record(conversation.source, first)
            if first is not None:
                ids, mask = _join(head, rounds[first:])
                examples.append(TokenizedExample(np.asarray(ids, np.int32),
                                                 np.asarray(mask, bool), conversation.source))
        bar.update(len(chunk))
    bar.close()
    return examples, report


def tokenize_prompt(tokenizer: Any, template: Template, user: str,
                    history: Sequence[Round] = ()) -> np.ndarray:
    """Ids ``[L] int32`` of a generation prompt: the earlier ``history`` rounds, then ``user``'s
    prompt segment, tokenised exactly as in training."""
    encoded = iter(_encode(tokenizer, [*_round_texts(template, history), template.prompt(user)]))
    rounds = _pair_rounds(encoded, len(history), tokenizer.eos_token_id)
    ids, _ = _join(_head_ids(tokenizer, template), rounds)
    return np.asarray(ids + next(encoded), np.int32)


def tokenize_response(tokenizer: Any, template: Template, assistant: str) -> list[int]:
    """Ids of ``assistant``'s response segment, tokenised exactly as in training (special-token
    text such as a literal "</s>" stays text; no EOS appended)."""
    return _encode(tokenizer, [template.response(assistant)])[0]


def decode_response(tokenizer: Any, template: Template, ids, ended: bool) -> str:
    """A generated response's text as training data holds it: decoded without the token it ended
    with when ``ended`` (EOS or another stop token) and without the ``template``'s separator the
    model emits first (``Template.response_text``)."""
    return template.response_text(tokenizer.decode(list(ids[:-1] if ended else ids), skip_special_tokens=True))


def check_segment_boundaries(tokenizer: Any, template: Template) -> None:
    """Raise unless tokenising the template's segments one by one equals tokenising their join."""
    probe = Round("What is 2 + 2?", "It is 4.")
    segments = [template.preamble, template.prompt(probe.user), template.response(probe.assistant)]
    separately = [i for ids in _encode(tokenizer, segments) for i in ids]
    if separately != _encode(tokenizer, ["".join(segments)])[0]:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} merges tokens across "
                        f"the {template.name!r} template's segment boundaries; the loss mask "
                        "boundaries would be inexact")


def _head_ids(tokenizer: Any, template: Template) -> list[int]:
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos + _encode(tokenizer, [template.preamble])[0]


def _round_texts(template: Template, rounds: Sequence[Round]) -> list[str]:
    """Prompt and response segment texts, alternating, of each round."""
    return [t for r in rounds for t in (template.prompt(r.user), template.response(r.assistant))]


def _pair_rounds(encoded: Iterator[list[int]], num_rounds: int,
                 eos_id: int) -> list[tuple[list[int], list[int]]]:
    """The next ``num_rounds`` (prompt ids, response ids + EOS) pairs from ``encoded``."""
    return [(next(encoded), next(encoded) + [eos_id]) for _ in range(num_rounds)]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _join(head: list[int],
          rounds: Sequence[tuple[list[int], list[int]]]) -> tuple[list[int], list[bool]]:
    """Ids and response mask of ``head`` followed by ``(prompt_ids, response_ids)`` rounds."""
    ids, mask = list(head), [False] * len(head)
    for prompt_ids, response_ids in rounds:
        ids += prompt_ids + response_ids
        mask += [False] * len(prompt_ids) + [True] * len(response_ids)
    return ids, mask
