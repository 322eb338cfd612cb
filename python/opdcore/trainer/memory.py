"""Resident memory per phase: the process's high-water mark over a block of code (Linux: VmHWM, reset by writing
5 to /proc/self/clear_refs), and the run's overall peak. Other systems fall back to getrusage's peak since start,
which cannot be reset: every phase then reports the peak so far."""
from __future__ import annotations

import ctypes
import math
from contextlib import contextmanager
from typing import Dict

_run_peak_kib = 0.0  # clear_refs resets the kernel's high-water mark too: the run's peak is kept here


def _hwm_kib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # not POSIX
        return math.nan
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def _reset_hwm() -> None:
    global _run_peak_kib
    _run_peak_kib = max(_run_peak_kib, _hwm_kib())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_peak_mib() -> float:
    """The process's resident high-water mark since it started, MiB."""
    return max(_run_peak_kib, _hwm_kib()) / 1024


@contextmanager
def phase_peak(peaks: Dict[str, float], name: str):
    """Record in peaks[name] the largest resident memory (MiB) seen while the block runs (max over repeats), and
    release() what the block freed, so the next phase starts from what is really held."""
    _reset_hwm()
    try:
        yield
    finally:
        kib = _hwm_kib()
        global _run_peak_kib
        _run_peak_kib = max(_run_peak_kib, kib)
        peaks[name] = max(peaks.get(name, 0.0), kib / 1024)
        release()


# Trimming is worth it only for a large free heap: the next phase faults whatever was handed back in again (on the
# tiny synthetic models, trimming after every phase cost ~8% of the step; a real model frees GBs of activations)
RELEASE_MIN_BYTES = 256 << 20


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def release() -> None:
    """Hand the heap memory freed since the last call back to the OS (glibc) when it is at least
    RELEASE_MIN_BYTES. glibc keeps freed blocks of tensors below its adaptive mmap threshold in the heap: after a
    training step that is 2-4 GB of activations the process still holds while it generates and scores, and the
    next phase's peak stacks on top of it."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim
        except (OSError, AttributeError):  # not glibc
            _libc = False
        else:
            if hasattr(_libc, "mallinfo2"):
                _libc.mallinfo2.restype = _MallInfo2
    if not _libc:
        return
    if hasattr(_libc, "mallinfo2") and _libc.mallinfo2().fordblks < RELEASE_MIN_BYTES:
        return
    _libc.malloc_trim(0)


_libc = None
