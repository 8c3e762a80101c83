"""``icegrt``: the command-line entry point; subcommands live in ``icegrt_jax.commands``.

Any ``UserInputError`` (bad file, flag, config key, tensor) becomes one line on stderr and exit
code 2; argparse usage errors also exit 2. Training that diverged (``NonFiniteError``) is one line
and exit code 1. A trainer stopped by SIGTERM/SIGINT (its checkpoint
saved) says so on stderr and exits 128 + the signal number. The ``icegrt`` command is ``console_main``: it first
re-executes itself with malloc on huge pages where that helps (``icegrt_jax.runtime``), and a
SIGINT/SIGTERM anywhere outside the training loop (which saves a checkpoint first) ends it at
once: one line on stderr, exit 128 + the signal number (outputs are written atomically, so none is
left half-written). ``main(argv)`` has neither side effect.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys

from icegrt_jax.errors import NonFiniteError, TrainingStopped, UserInputError
from icegrt_jax.runtime import reexec_with_malloc_hugepages

EXIT_USAGE = 2
EXIT_DIVERGED = 1
COMMANDS = ("convert", "demo", "train", "generate", "eval", "rubric", "plan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icegrt", description="ICE-GRT in JAX: SFT, reward model, PPO.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"icegrt_jax.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserInputError as e:
        print(f"icegrt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingStopped as e:
        print(f"icegrt {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteError as e:
        print(f"icegrt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED


def console_main() -> int:
    """The ``icegrt`` command: ``main`` on ``sys.argv``, in a process with malloc on huge pages."""
    reexec_with_malloc_hugepages()
    exit_on_signals(command_name(sys.argv[1:]))
    sys.unraisablehook = _drop_abandoned_reads
    logging.getLogger("asyncio").addFilter(_not_an_abandoned_read)
    return main()


def command_name(argv: list[str]) -> str:
    """The subcommand ``argv`` names, known before parsing: its first word (the parser takes no
    option before it but ``--help``); "" when there is none."""
    return argv[0] if argv and not argv[0].startswith("-") else ""


def exit_on_signals(command: str) -> None:
    """Make SIGINT and SIGTERM end the process at once: one line on stderr (``icegrt CMD:
    interrupted by SIGINT``), exit 128 + the signal number, with no traceback and no interpreter
    teardown (an exception raised in the middle of an XLA compile or from a garbage-collection
    callback crashed the process or was swallowed). The training loop replaces these handlers
    while it runs (a signal there saves a checkpoint) and puts them back after."""
    prog = f"icegrt {command}" if command else "icegrt"

    def handle(signum, frame):
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            print(f"{prog}: interrupted by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)


def _drop_abandoned_reads(unraisable) -> None:
    """``sys.unraisablehook`` of the ``icegrt`` process. When one array of a damaged checkpoint
    fails to read (a one-line error), Orbax's other reads finish on a closed event loop and report
    it as they end or at exit: those reports are dropped, any other goes to the default hook."""
    error, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    if (isinstance(error, RuntimeError) and str(error) == "Event loop is closed") or (
            code is not None and "orbax" in code.co_filename):
        return
    sys.__unraisablehook__(unraisable)


def _not_an_abandoned_read(record: logging.LogRecord) -> bool:
    """asyncio's log filter in the ``icegrt`` process: the same abandoned Orbax reads, when asyncio
    collects one as a task whose exception was never retrieved, are not logged."""
    return "_read_array_index_and_device_put" not in record.getMessage()


if __name__ == "__main__":
    sys.exit(console_main())
