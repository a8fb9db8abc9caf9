"""Timing shared by the benchmark scripts (imported as `timing`: a script's own folder is first on sys.path)."""

import time

import numpy as np


def median_seconds(fn, steps: int) -> float:
    """Median seconds per call of fn() (which must block until done) over `steps` calls, after two warm-up calls
    (the median keeps a shared machine's stray slow calls out of the number)."""
    fn()
    fn()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))
