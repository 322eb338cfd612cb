"""The CUDA emulator itself (csrc/cuda_emu): its collectives compute what CUDA's do, and it rejects the kernel
bugs a GPU would leave undefined, naming them. Runs wherever tests/test_cuda.py runs in emulated mode."""
import pytest
import torch

import cuda_backend

pytestmark = pytest.mark.skipif(cuda_backend.MODE != "emu", reason="the emulator is loaded only in emulated mode")


def run(case):
    return torch.ops.opdcore_emu.emu_selftest(case)


def test_collectives_semantics():
    out = run("collectives")
    t = torch.arange(256)
    warp_sums = ((t // 32) * 32 * 32 + 32 * 33 // 2)  # sum of t + 1 over each warp
    assert torch.equal(out[:256], warp_sums)
    assert torch.equal(out[256:264], torch.full((8,), 0xAAAAAAAA))  # odd lanes
    assert out[264] == 1
    assert torch.equal(out[265:], torch.arange(255, -1, -1))


@pytest.mark.parametrize("case,message", [
    # which thread notices first depends on the schedule (OPDCORE_EMU_SEED), so some cases accept either report
    ("divergent_syncthreads", "exited while other threads wait in __syncthreads|__syncthreads reached after"),
    ("early_exit_then_barrier", "exited while other threads wait in __syncthreads|__syncthreads reached after 1 "),
    ("divergent_warp_collectives", "different collectives"),
    ("exited_lane_shuffle", "after 1 of its lanes exited|exited while lanes of its warp wait in __shfl_xor_sync"),
    ("warp_vs_block_deadlock", "deadlock: warp 0: 1 lanes in __syncthreads, 31 in __syncwarp; warp 1: 32 lanes"),
    ("throwing", "a kernel-side failure"),
    ("too_much_smem", "dynamic shared memory of 65536 bytes"),
    ("too_many_threads", "invalid launch configuration"),
])
def test_rejects_broken_kernels(case, message):
    with pytest.raises(RuntimeError, match=message):
        run(case)
    assert torch.equal(run("collectives")[:1], torch.tensor([32 * 33 // 2]))  # the emulator is still usable


def test_unknown_case():
    with pytest.raises(RuntimeError, match="unknown case"):
        run("nope")
