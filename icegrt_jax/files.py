"""Output files written atomically: the text goes to a temporary file in the same directory,
flushed to disk, then renamed over the target, so a reader or a crash never sees half a file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from icegrt_jax.errors import UserInputError


def make_directory(path: str | os.PathLike, what: str = "output directory") -> None:
    """``os.makedirs(path, exist_ok=True)``; a path that is a file, or that cannot be created, is
    a one-line ``UserInputError`` naming it as ``what``."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise UserInputError(f"{os.fspath(path)}: exists and is not a directory; choose another {what}") from None
    except OSError as e:
        raise UserInputError(f"{os.fspath(path)}: cannot create the {what} ({e.strerror})") from None


def outermost_missing(path: str | os.PathLike) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist (what ``make_directory`` would
    create, so a failed run can remove it all); None when ``path`` exists."""
    path = Path(os.path.abspath(path))
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def remove_made_directories(path: str | os.PathLike, outermost: str | os.PathLike) -> None:
    """Remove ``path`` (with what is in it), then each parent up to ``outermost`` while it is
    empty (another run may have put something there since)."""
    path, outermost = Path(os.path.abspath(path)), Path(os.path.abspath(outermost))
    shutil.rmtree(path, ignore_errors=True)
    while path != outermost and path.parent != path:
        path = path.parent
        with contextlib.suppress(OSError):
            path.rmdir()  # fails, leaving it, when not empty


def read_json(path: str | os.PathLike, error: type[Exception] = UserInputError, what: str = "a JSON file"):
    """The JSON value in ``path``; a missing or unreadable file, bad UTF-8 or bad JSON is one
    ``error`` naming the file (and the line)."""
    with read_errors(path, error):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            raise error(f"{os.fspath(path)}: not found (expected {what})") from None
        except json.JSONDecodeError as e:
            raise error(f"{os.fspath(path)}:{e.lineno}: invalid JSON: {e.msg}") from None


@contextlib.contextmanager
def read_errors(path: str | os.PathLike, error: type[Exception]):
    """Reading ``path`` inside: bad UTF-8 or an OS error (a directory, no permission) becomes one
    ``error`` naming the file."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise error(f"{os.fspath(path)}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"{os.fspath(path)}: cannot read ({e.strerror})") from None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename (written and synced to a temporary file first);
    an OS error (no permission, a full disk) is one ``UserInputError`` naming ``path``."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with write_errors(path):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def write_failure(error: BaseException) -> str | None:
    """The OS's reason when ``error``, or an error it was raised from, is a failed write: an
    ``OSError``'s strerror, or the ``[os_error_code='N']`` of a TensorStore error (Orbax's
    writer, e.g. "File too large"); None for any other error."""
    while error is not None:
        if isinstance(error, OSError):
            return error.strerror or str(error)
        if code := re.search(r"os_error_code='(\d+)'", str(error)):
            return os.strerror(int(code.group(1)))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None


@contextlib.contextmanager
def write_errors(path: str | os.PathLike, error: type[Exception] = UserInputError):
    """Writing ``path`` inside: a failed write (``write_failure``: no permission, a full disk, a
    file-size limit) becomes one ``error`` naming ``path``; a ``UserInputError`` passes as it is."""
    try:
        yield
    except UserInputError:
        raise
    except Exception as e:
        if (reason := write_failure(e)) is None:
            raise
        raise error(f"{os.fspath(path)}: cannot write ({reason})") from None


def check_writable(path: str | os.PathLike) -> None:
    """Before long work whose result goes to ``path``: fail now, as writing it would then, when no
    file can be created there (in the nearest existing parent where its directories would be made)."""
    target = os.path.abspath(path)
    while not os.path.isdir(os.path.dirname(target)):
        target = os.path.dirname(target)
    probe = f"{target}.tmp-{os.getpid()}"
    with write_errors(path):
        with open(probe, "wb"):
            pass
        os.remove(probe)


def sync_path(path: str | os.PathLike) -> None:
    """fsync a file (its contents) or a directory (the names created in it or renamed into or out
    of it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: str | os.PathLike) -> None:
    """fsync every file and directory under ``path`` (before the tree is renamed into place)."""
    for root, _, names in os.walk(path):
        for name in names:
            sync_path(os.path.join(root, name))
        sync_path(root)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one rename."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, **dumps_options) -> None:
    """``obj`` as indented JSON (``json.dumps`` options such as ``default``), atomically."""
    write_text(path, json.dumps(obj, indent=2, **dumps_options) + "\n")


def write_jsonl(path: str | os.PathLike, records, **dumps_options) -> None:
    """One JSON object a line (``json.dumps`` options such as ``ensure_ascii``), atomically."""
    write_text(path, "".join(json.dumps(record, **dumps_options) + "\n" for record in records))
