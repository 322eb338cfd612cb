"""Timing and peak-memory measurement shared by the benchmark scripts (CPU).

Peak memory: the process's resident high-water mark is reset (Linux /proc/self/clear_refs) before each call
and read after it, so "extra" is what the call itself allocated on top of its inputs. Large tensors are
mmap-backed, so freed memory leaves RSS and the next measurement starts clean.
"""
from __future__ import annotations

import gc
import statistics
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(fn) -> float:
    """Run fn once; return the peak resident memory it added, in MiB."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    base = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    gc.collect()
    return (peak - base) / 1024


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
