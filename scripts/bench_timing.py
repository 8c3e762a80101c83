"""Timing shared by the benchmark scripts (imported as ``bench_timing``: scripts/ is on sys.path
when a script runs as ``python scripts/bench_*.py``)."""

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
