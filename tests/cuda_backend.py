"""The device under test of tests/test_cuda.py.

OPDCORE_CUDA_TEST_DEVICE picks it (default: `cuda` when a GPU is visible, else `emu`):
  cuda  the CUDA kernels on the GPU (opdcore built with CUDA).
  emu   the same kernels and ATen glue compiled for the CPU emulator of csrc/cuda_emu (scripts/build_cuda_emu.sh
        builds it; the ops register as torch.ops.opdcore_emu.*). Inside `device_ops()` the opdcore Python layer
        calls those instead of torch.ops.opdcore.*, on CPU tensors. It tests the kernels' logic and the glue on any
        machine; a GPU run is still what proves them (timing, memory model, the real __expf). The kernels run
        under UBSan (misaligned vector access, array bounds, ...): a report aborts the process, and pytest's
        output capture hides it, so rerun the failing test with `-s` to read it. OPDCORE_EMU_ASAN=1 adds
        AddressSanitizer: the emulator's memcheck, run through scripts/cuda_emu_memcheck.sh.
  cpu   CPU against CPU: a self-check of the test file's mechanics only.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys

import torch

import opdcore
import opdcore.packing
from opdcore.ops import dense as _dense
from opdcore.ops import loss as _loss
from opdcore.ops import policy as _policy
from opdcore.ops import topk as _topk

MODE = os.environ.get("OPDCORE_CUDA_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "emu")
if MODE not in ("cuda", "emu", "cpu"):
    raise ValueError(f"OPDCORE_CUDA_TEST_DEVICE must be cuda, emu or cpu, got {MODE!r}")
DEV = "cuda" if MODE == "cuda" else "cpu"  # where the device side's tensors live
AVAILABLE = MODE != "cuda" or (torch.cuda.is_available() and bool(opdcore.build_info()["cuda_compiled"]))

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_MODULES = (_topk, _loss, _policy, _dense, opdcore.packing)  # each holds `_ops = torch.ops.opdcore`
_active = False


def _load_emulator() -> None:
    """Build (when stale) and load the emulator library; register the Python autograd of its ops."""
    if os.environ.get("OPDCORE_EMU_ASAN") == "1" and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        raise RuntimeError("OPDCORE_EMU_ASAN=1 needs the ASan runtime preloaded: run scripts/cuda_emu_memcheck.sh")
    proc = subprocess.run(["bash", str(_ROOT / "scripts" / "build_cuda_emu.sh")], cwd=_ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable})
    if proc.returncode != 0:
        raise RuntimeError(f"building the CUDA emulator failed:\n{proc.stdout}\n{proc.stderr}")
    torch.ops.load_library(str(_ROOT / proc.stdout.strip().splitlines()[-1]))
    reg = torch.library.register_autograd
    reg("opdcore_emu::opd_topk_loss_fwd", _loss._loss_backward, setup_context=_loss._loss_setup)
    reg("opdcore_emu::renorm_kl_fwd", _loss._rkl_backward, setup_context=_loss._rkl_setup)
    reg("opdcore_emu::dense_divergence_fwd", _dense._backward, setup_context=_dense._setup)
    pk = opdcore.packing
    reg("opdcore_emu::pad_packed", pk._pad_backward, setup_context=pk._pad_setup)
    reg("opdcore_emu::unpad_packed", pk._unpad_backward, setup_context=pk._unpad_setup)


if MODE == "emu":
    _load_emulator()


def ops():
    """The operator namespace the device side uses right now."""
    return torch.ops.opdcore_emu if _active else torch.ops.opdcore


@contextlib.contextmanager
def device_ops():
    """Run the enclosed calls (forward and backward) on the device under test."""
    global _active
    if MODE != "emu" or _active:
        yield
        return
    _active = True
    for m in _MODULES:
        m._ops = torch.ops.opdcore_emu
    try:
        yield
    finally:
        _active = False
        for m in _MODULES:
            m._ops = torch.ops.opdcore


def on_dev(fn, *args, **kwargs):
    with device_ops():
        return fn(*args, **kwargs)


def to_dev(t: torch.Tensor) -> torch.Tensor:
    """A copy on the device side (a copy even when that is the CPU: the two sides must not share tensors)."""
    return t.to(DEV, copy=True)
