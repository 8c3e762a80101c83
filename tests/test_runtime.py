"""Malloc on huge pages: when the re-execution applies, that it sets the glibc tunable, and that
the tunable does cut the page faults of touching fresh large allocations."""

import os
import platform
import subprocess
import sys

import pytest

from icegrt_jax.runtime import (
    OPT_OUT,
    REEXEC_MARKER,
    TUNABLE,
    hugepage_environment,
    thp_mode,
)

GLIBC = ("glibc", "2.36")


@pytest.mark.parametrize("environ, libc, mode, expected", [
    ({}, GLIBC, "madvise", f"{TUNABLE}=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, GLIBC, "madvise",
     f"glibc.malloc.tcache_count=0:{TUNABLE}=1"),
    ({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, GLIBC, "madvise", None),  # the user's own choice stands
    ({OPT_OUT: "0"}, GLIBC, "madvise", None),
    ({REEXEC_MARKER: "1"}, GLIBC, "madvise", None),  # at most one re-execution
    ({}, GLIBC, "always", None),  # malloc's memory gets huge pages already
    ({}, GLIBC, "never", None),
    ({}, GLIBC, None, None),  # no THP in this kernel
    ({}, ("glibc", "2.34"), "madvise", None),  # the tunable came with 2.35
    ({}, ("", ""), "madvise", None),  # musl, or unknown
])
def test_hugepage_environment_applies_only_where_it_changes_something(environ, libc, mode, expected):
    env = hugepage_environment({"PATH": "/bin", **environ}, libc, mode)
    if expected is None:
        assert env is None
    else:
        assert env["GLIBC_TUNABLES"] == expected and env["PATH"] == "/bin" and env[REEXEC_MARKER] == "1"


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert thp_mode(str(path)) == "madvise"
    assert thp_mode(str(tmp_path / "missing")) is None


CHILD = """
import os, resource, sys
from icegrt_jax.runtime import reexec_with_malloc_hugepages
if sys.argv[1] == "reexec":
    reexec_with_malloc_hugepages()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):  # fresh 64 MiB blocks from malloc (as XLA:CPU's buffers; numpy advises huge pages itself)
    block = libc.malloc(2**26)
    ctypes.memset(block, 1, 2**26)
    libc.free(block)
print(os.environ.get("GLIBC_TUNABLES", ""), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _child(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT, REEXEC_MARKER)}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, env=env)
    tunables, faults = out.stdout.rsplit(maxsplit=1) if " " in out.stdout.strip() else ("", out.stdout)
    return tunables.strip(), int(faults)


def test_reexecution_sets_the_tunable_and_cuts_page_faults_where_it_applies():
    applies = hugepage_environment({}, platform.libc_ver(), thp_mode()) is not None
    tunables, faults = _child("reexec")
    plain_tunables, plain_faults = _child("plain")
    assert plain_tunables == ""
    if applies:  # this machine: glibc 2.36, THP madvise
        assert tunables == f"{TUNABLE}=1"
        # 4 x 64 MiB touched: ~65,000 faults of 4 KiB pages without, ~130 of 2 MiB pages with
        assert plain_faults > 10_000 and faults < plain_faults / 10, (faults, plain_faults)
    else:
        assert tunables == ""
