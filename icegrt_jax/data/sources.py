"""Loading SFT conversations from files or hub datasets, validated record by record.

Accepted records (extra fields are ignored; a null field counts as absent)::

    {"prompt": str, "response": str}                                   # one round
    {"conversations": [{"role": "user", "content": str},
                       {"role": "assistant", "content": str}, ...]}    # alternating, user first,
                                                                         # assistant last

Sources, chosen by path: ``*.jsonl`` (read and validated here line by line, so errors name
``file:line``; blank lines are skipped and counted), ``*.parquet`` and ``*.arrow`` (read through
HF ``datasets``; errors name ``file row i``, 0-based), a directory written by
``Dataset.save_to_disk``, any other directory as ``datasets.load_dataset`` reads a folder of data
files (a hub dataset's clone: its ``train`` split), or, for a spec that is no local path and looks
like a hub dataset name (``is_hub_name``), a hub dataset ``org/name`` or ``org/name:split``
(default split ``train``); any other spec is a missing file. Every problem raises ``DataError``
with a one-line message. A record equal to an earlier one of the same load is kept and counted
(``SourceReport``): deduplicating is the user's call.
"""

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icegrt_jax.data.templates import Round
from icegrt_jax.errors import UserInputError

# a spec ending in one of these names a file, never a hub dataset (hub names may hold dots: "org/set-2.5")
FILE_SUFFIXES = frozenset((".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".gz", ".bz2",
                           ".xz", ".zst", ".zip", ".tar", ".yaml", ".yml", ".md", ".xml", ".html", ".pkl"))
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_SHOWN_REPEATS = 3  # repeated records named in a report


class DataError(UserInputError):
    """Unusable data: the one-line message names the file, line (or row) and field."""


@dataclass(frozen=True)
class Conversation:
    """A validated example: its rounds and where it came from (``file:line`` or ``file row i``)."""

    rounds: tuple[Round, ...]
    source: str


@dataclass
class SourceReport:
    """What reading one load's records met besides them: blank JSONL lines (skipped) and records
    equal to an earlier record of the load, in any of its files (kept)."""

    blank_lines: int = 0
    repeated_records: int = 0
    repeats: list[str] = field(default_factory=list)  # the first few, "file:5 repeats file:2"
    _seen: dict[bytes, str] = field(default_factory=dict, repr=False)

    def add(self, where: str, record: Any) -> None:
        """Count one record: a repeat when an earlier one is equal (every field, compared as JSON)."""
        text = json.dumps(record, sort_keys=True, ensure_ascii=False, default=repr)
        key = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if key not in self._seen:
            self._seen[key] = where
            return
        self.repeated_records += 1
        if len(self.repeats) < _SHOWN_REPEATS:
            self.repeats.append(f"{where} repeats {self._seen[key]}")

    def metrics(self) -> dict[str, int]:
        return {"blank_lines": self.blank_lines, "repeated_records": self.repeated_records}

    def appended_to(self, text: str) -> str:
        """``text; summary()``, or ``text`` when there is nothing to say."""
        return f"{text}; {self.summary()}" if self.summary() else text

    def summary(self) -> str:
        """``"2 blank lines skipped; 1 record repeats an earlier one (kept: f:5 repeats f:2)"``; the
        parts with a count of 0 are left out ("" when both are)."""
        parts = []
        if self.blank_lines:
            parts.append(f"{self.blank_lines} blank line{'s' * (self.blank_lines > 1)} skipped")
        if n := self.repeated_records:
            more = ", ..." if n > len(self.repeats) else ""
            parts.append(f"{n} record{'s' * (n > 1)} repeat{'s' * (n == 1)} an earlier one "
                         f"(kept: {', '.join(self.repeats)}{more})")
        return "; ".join(parts)


def load_conversations(specs: Sequence[str], report: SourceReport | None = None) -> list[Conversation]:
    """All conversations of the given files (or hub datasets), in file order; ``report`` counts
    blank lines and repeated records."""
    if not specs:
        raise DataError("no data files given")
    return [parse_record(record, where) for spec in specs for where, record in iter_records(spec, report)]


def parse_record(record: Any, where: str) -> Conversation:
    """Validate one record of either schema; ``where`` prefixes every error message."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    present = {k for k in ("prompt", "response", "conversations") if record.get(k) is not None}
    if "conversations" in present:
        if present & {"prompt", "response"}:
            raise DataError(f"{where}: has both 'conversations' and 'prompt'/'response'; use one")
        return Conversation(_parse_turns(record["conversations"], where), where)
    if not present:
        raise DataError(f"{where}: expected fields 'prompt' and 'response', or 'conversations'")
    single = Round(required_text(record, "prompt", where), required_text(record, "response", where))
    return Conversation((single,), where)


def _parse_turns(turns: Any, where: str) -> tuple[Round, ...]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list")
    contents = []
    for i, turn in enumerate(turns):
        name = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field '{name}' must be an object")
        role = "user" if i % 2 == 0 else "assistant"
        if turn.get("role") != role:
            raise DataError(f"{where}: field '{name}.role' must be {role!r} (turns alternate, "
                            f"user first), got {turn.get('role')!r}")
        contents.append(required_text(turn, "content", where, name=f"{name}.content"))
    if len(turns) % 2:
        raise DataError(f"{where}: field 'conversations' must end with an assistant turn")
    return tuple(Round(u, a) for u, a in zip(contents[::2], contents[1::2]))


def required_text(record: dict, key: str, where: str, name: str | None = None) -> str:
    name = name or key
    value = record.get(key)
    if value is None:
        raise DataError(f"{where}: missing field '{name}'")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def is_hub_name(spec: str) -> bool:
    """Whether ``spec`` (no local path) can name a hub dataset: ``name`` or ``org/name``, optionally
    ``:split``, each part starting with a letter or digit, not ending in a file suffix (``.json``,
    ``.csv``, ...). Anything else (``./x``, ``../x``, ``/x``, ``a/b/c``, ``data/x.json``) is a path."""
    name = spec.partition(":")[0]
    return bool(_HUB_NAME.fullmatch(name)) and Path(name).suffix.lower() not in FILE_SUFFIXES


def numbered_records(spec: str, report: SourceReport | None = None) -> Iterator[tuple[int, str, Any]]:
    """``(number, where, record)`` of one source: a JSONL, Parquet or Arrow file, a dataset
    directory or a hub dataset name; ``where`` is ``file:line`` or ``spec row i`` and ``number`` that
    line (1-based) or row (0-based). ``report`` counts blank lines and repeated records."""
    path = Path(spec)
    if path.exists():
        located = _jsonl_lines(path, DataError, report) if path.suffix == ".jsonl" else \
            _rows(spec, _open_local_dataset(path))
    elif is_hub_name(spec):
        located = _rows(spec, _open_hub_dataset(spec))
    else:
        raise DataError(f"{spec}: no such file")
    for number, where, record in located:
        if report is not None:
            report.add(where, record)
        yield number, where, record


def iter_records(spec: str, report: SourceReport | None = None) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` pairs of one source (``numbered_records`` without the numbers)."""
    for _, where, record in numbered_records(spec, report):
        yield where, record


def jsonl_records(path: str | Path, error: type[UserInputError] = DataError) -> Iterator[tuple[str, Any]]:
    """(``file:line``, parsed object) of each non-blank line of a JSONL file; an unreadable file,
    bad UTF-8 or bad JSON raises ``error`` naming the file (and line)."""
    for _, where, record in _jsonl_lines(Path(path), error, None):
        yield where, record


def _jsonl_lines(path: Path, error: type[UserInputError], report: SourceReport | None
                 ) -> Iterator[tuple[int, str, Any]]:
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    if report is not None:
                        report.blank_lines += 1
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line.rstrip("\r\n"))  # a column past the end names this line
                except json.JSONDecodeError as e:
                    raise error(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield number, where, record
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None


def _rows(spec: str, dataset: Iterable[dict]) -> Iterator[tuple[int, str, Any]]:
    for i, row in enumerate(dataset):
        yield i, f"{spec} row {i}", row


@contextlib.contextmanager
def quiet_hub_libraries():
    """``datasets`` and ``huggingface_hub`` log the failures (and retries) we report as one line."""
    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _open_local_dataset(path: Path) -> Iterable[dict]:
    import datasets  # imported on use: it takes seconds to import and JSONL does not need it

    readers = {".parquet": datasets.Dataset.from_parquet, ".arrow": datasets.Dataset.from_file}
    if not path.is_dir() and path.suffix not in readers:
        raise DataError(f"{path}: unsupported file type; expected .jsonl, .parquet, .arrow "
                        "or a dataset directory")
    with quiet_hub_libraries():
        try:
            if not path.is_dir():
                loaded = readers[path.suffix](str(path))
            elif any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):  # save_to_disk's
                loaded = datasets.load_from_disk(str(path))
            else:  # a folder of data files, e.g. a hub dataset's clone: read locally as the hub would
                loaded = datasets.load_dataset(str(path), split="train")
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
            # not a dataset, a corrupt table (pyarrow raises OSError, ValueError), no data files, no train split
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{path}: cannot read it as a dataset ({reason})") from None
    if isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{path}: holds splits {sorted(loaded)}; name one split's directory")
    return loaded


def _open_hub_dataset(spec: str) -> Iterable[dict]:
    import datasets

    name, _, split = spec.partition(":")
    with quiet_hub_libraries():
        try:
            return datasets.load_dataset(name, split=split or "train")
        except Exception as e:  # any hub, network or format failure: report it on one line
            message = " ".join(str(e).split())
            raise DataError(f"{spec}: no such local file, and loading it as a hub dataset failed "
                            f"({type(e).__name__}: {message})") from e
