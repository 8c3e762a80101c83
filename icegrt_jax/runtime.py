"""Process settings that must be in place before the process starts: huge pages for malloc.

XLA:CPU allocates each execution's temporaries with malloc, and glibc serves large blocks from
fresh ``mmap`` memory that the kernel zero-fills one 4 KiB page at a time on first touch: a PPO
iteration on bench-small (~600 MB of temporaries over its programs) took ~150,000 page faults
and ~0.35 s of system time. glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) makes
malloc advise transparent huge pages (2 MiB) for its memory, which cuts the faults ~100x (steady
PPO iteration 1.21 -> 1.04 s on the 2-core VM; BENCHMARKS.md, issue 7). Tunables are read only
when a process starts, so the ``icegrt`` command (``cli.console_main``, not ``cli.main``) and
scripts/bench_ppo.py re-execute themselves once with the tunable added (and ``REEXEC_MARKER`` set,
so it happens at most once). It changes nothing where the kernel's THP mode is ``never``
(nothing to gain) or ``always`` (malloc's memory gets huge pages already), or the C library is
not glibc. ``ICEGRT_MALLOC_HUGEPAGES=0`` turns it off.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "ICEGRT_MALLOC_HUGEPAGES"
REEXEC_MARKER = "ICEGRT_REEXECUTED_WITH_HUGEPAGES"  # set in the re-executed process
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode (the bracketed word: always, madvise, never)."""
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return None
    return next((w[1:-1] for w in words if w.startswith("[") and w.endswith("]")), None)


def hugepage_environment(environ: Mapping[str, str], libc: tuple[str, str], mode: str | None) -> dict | None:
    """``environ`` with ``glibc.malloc.hugetlb=1`` appended to GLIBC_TUNABLES, or None when that
    would change nothing: opted out, re-executed already, not glibc >= 2.35, THP mode not
    ``madvise``, or the tunable already set."""
    name, version = libc
    if environ.get(OPT_OUT) == "0" or REEXEC_MARKER in environ or name != "glibc" or mode != "madvise":
        return None
    try:
        if tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
            return None
    except ValueError:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:
        return None
    return {**environ, REEXEC_MARKER: "1",
            "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"}


def reexec_with_malloc_hugepages() -> None:
    """Replace this process by itself (same interpreter, same arguments) with the tunable set,
    when ``hugepage_environment`` says it changes something; call it first thing in a command's
    entry point, before jax is imported (never from a library call: it replaces the process).
    Where the re-execution cannot start, the process goes on as it is."""
    env = hugepage_environment(os.environ, platform.libc_ver(), thp_mode())
    if env is None or not sys.executable:
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return
