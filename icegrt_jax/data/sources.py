"""Loading SFT conversations from files or hub datasets, validated record by record.

Accepted records (extra fields are ignored; a null field counts as absent)::

    {"prompt": str, "response": str}                                   # one round
    {"conversations": [{"role": "user", "content": str},
                       {"role": "assistant", "content": str}, ...]}    # alternating, user first,
                                                                         # assistant last

Sources, chosen by path: ``*.jsonl`` (read and validated here line by line, so errors name
``file:line``), ``*.parquet`` and ``*.arrow`` (read through HF ``datasets``; errors name
``file row i``, 0-based), a directory written by ``Dataset.save_to_disk``, or, for a name that is
not a local path, a hub dataset ``org/name`` or ``org/name:split`` (default split ``train``).
Every problem raises ``DataError`` with a one-line message.
"""

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icegrt_jax.data.templates import Round
from icegrt_jax.errors import UserInputError

TABLE_SUFFIXES = (".parquet", ".arrow")


class DataError(UserInputError):
    """Unusable data: the one-line message names the file, line (or row) and field."""


@dataclass(frozen=True)
class Conversation:
    """A validated example: its rounds and where it came from (``file:line`` or ``file row i``)."""

    rounds: tuple[Round, ...]
    source: str


def load_conversations(specs: Sequence[str]) -> list[Conversation]:
    """All conversations of the given files (or hub datasets), in file order."""
    if not specs:
        raise DataError("no data files given")
    return [parse_record(record, where) for spec in specs for where, record in iter_records(spec)]


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


def iter_records(spec: str) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` pairs of one source: a JSONL, Parquet or Arrow file, a saved dataset
    directory or a hub dataset name; ``where`` is ``file:line`` or ``spec row i``."""
    path = Path(spec)
    if path.suffix in (".jsonl", *TABLE_SUFFIXES) or path.exists():
        if not path.exists():
            raise DataError(f"{spec}: no such file")
        if path.suffix == ".jsonl":
            yield from jsonl_records(path)
        else:
            yield from _rows(spec, _open_local_dataset(path))
    else:
        yield from _rows(spec, _open_hub_dataset(spec))


def jsonl_records(path: str | Path, error: type[UserInputError] = DataError) -> Iterator[tuple[str, Any]]:
    """(``file:line``, parsed object) of each non-blank line of a JSONL file; an unreadable file,
    bad UTF-8 or bad JSON raises ``error`` naming the file (and line)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line.rstrip("\r\n"))  # a column past the end names this line
                except json.JSONDecodeError as e:
                    raise error(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield where, record
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None


def _rows(spec: str, dataset: Iterable[dict]) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(dataset):
        yield f"{spec} row {i}", row


def _open_local_dataset(path: Path) -> Iterable[dict]:
    import datasets  # imported on use: it takes seconds to import and JSONL does not need it

    readers = {".parquet": datasets.Dataset.from_parquet, ".arrow": datasets.Dataset.from_file}
    if not path.is_dir() and path.suffix not in readers:
        raise DataError(f"{path}: unsupported file type; expected .jsonl, .parquet, .arrow "
                        "or a saved dataset directory")
    library_log = logging.getLogger("datasets")  # it logs the failure we report as one line below
    level = library_log.level
    library_log.setLevel(logging.CRITICAL)
    try:
        loaded = datasets.load_from_disk(str(path)) if path.is_dir() else readers[path.suffix](str(path))
    except (OSError, ValueError) as e:  # not a saved dataset, a corrupt table (pyarrow's errors are these)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot read it as a dataset ({reason})") from None
    finally:
        library_log.setLevel(level)
    if isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{path}: holds splits {sorted(loaded)}; name one split's directory")
    return loaded


def _open_hub_dataset(spec: str) -> Iterable[dict]:
    import datasets

    name, _, split = spec.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # any hub, network or format failure: report it on one line
        message = " ".join(str(e).split())
        raise DataError(f"{spec}: no such local file, and loading it as a hub dataset failed "
                        f"({type(e).__name__}: {message})") from e
