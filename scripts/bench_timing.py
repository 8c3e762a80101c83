"""Timing shared by the benchmark scripts (imported as ``bench_timing``: scripts/ is on sys.path
when a script runs as ``python scripts/bench_*.py``)."""

import os
import time


def best_time(fn, reps: int) -> float:
    """Seconds of the fastest of ``reps`` calls of ``fn`` after one warm-up call (which compiles)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_description() -> str:
    """This machine's CPU model, core count and widest vector extension (CPU figures depend on them)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    vectors = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} cores, {vectors}"
