"""``icegrt``: the command-line entry point; subcommands live in ``icegrt_jax.commands``.

Any ``UserInputError`` (bad file, flag, config key, tensor) becomes one line on stderr and exit
code 2; argparse usage errors also exit 2. Training that diverged (``NonFiniteError``) is one line
and exit code 1. A trainer stopped by SIGTERM/SIGINT (its checkpoint
saved) says so on stderr and exits 128 + the signal number. The ``icegrt`` command is ``console_main``: it first
re-executes itself with malloc on huge pages where that helps (``icegrt_jax.runtime``);
``main(argv)`` has no such side effect.
"""

from __future__ import annotations

import argparse
import importlib
import logging
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
    sys.unraisablehook = _drop_abandoned_reads
    logging.getLogger("asyncio").addFilter(_not_an_abandoned_read)
    return main()


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
