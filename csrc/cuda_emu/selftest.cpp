// Self-test kernels of the CUDA emulator: correct ones whose results are known (the collectives' semantics) and
// broken ones it must reject. torch.ops.opdcore_emu.emu_selftest(case) runs one: it returns the kernel's output
// (a tensor) or raises with the emulator's diagnosis; tests/test_cuda_emulator.py checks both.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>

#include "emu.h"

namespace {

constexpr unsigned kFull = 0xffffffffu;

// out[t] = sum over the warp of (t + 1) via xor shuffles; out[256 + w] = ballot of odd lanes of warp w;
// out[264] = __syncthreads_or(thread 77 only).
__global__ void collectives_kernel(int64_t* out) {
  const int t = threadIdx.x, lane = t & 31, w = t >> 5;
  int64_t v = t + 1;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  out[t] = v;
  const unsigned b = __ballot_sync(kFull, lane & 1);
  if (lane == 0) out[256 + w] = b;
  const int any = __syncthreads_or(t == 77);
  if (t == 0) out[264] = any;
  __shared__ int64_t s[256];
  s[t] = t;
  __syncthreads();
  out[265 + t] = s[255 - t];  // needs the barrier: other threads wrote it
}

__global__ void divergent_syncthreads_kernel(int64_t*) {
  if (threadIdx.x < 128) __syncthreads();
}

__global__ void early_exit_then_barrier_kernel(int64_t*) {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

__global__ void divergent_warp_collectives_kernel(int64_t*) {
  if (threadIdx.x & 1) __ballot_sync(kFull, 1);
  else __syncwarp();
}

__global__ void exited_lane_shuffle_kernel(int64_t*) {
  if ((threadIdx.x & 31) == 3) return;
  __shfl_xor_sync(kFull, 1, 1);
}

// Lane 0 of warp 0 waits for the block, its other lanes for lane 0: nobody can move, nobody exits.
__global__ void warp_vs_block_deadlock_kernel(int64_t*) {
  if (threadIdx.x > 0 && threadIdx.x < 32) __syncwarp();
  else __syncthreads();
}

__global__ void throwing_kernel(int64_t*) { throw std::runtime_error("a kernel-side failure"); }

at::Tensor emu_selftest(const std::string& which) {
  at::Tensor out = at::zeros({265 + 256}, at::kLong);
  int64_t* p = out.mutable_data_ptr<int64_t>();
  dim3 block(256);
  size_t smem = 0;
  void (*k)(int64_t*) = nullptr;
  if (which == "collectives") k = collectives_kernel;
  else if (which == "divergent_syncthreads") k = divergent_syncthreads_kernel;
  else if (which == "early_exit_then_barrier") k = early_exit_then_barrier_kernel;
  else if (which == "divergent_warp_collectives") k = divergent_warp_collectives_kernel;
  else if (which == "exited_lane_shuffle") k = exited_lane_shuffle_kernel;
  else if (which == "warp_vs_block_deadlock") k = warp_vs_block_deadlock_kernel;
  else if (which == "throwing") k = throwing_kernel;
  else if (which == "too_much_smem") { k = collectives_kernel; smem = 64 * 1024; }
  else if (which == "too_many_threads") { k = collectives_kernel; block = dim3(2048); }
  TORCH_CHECK(k, "emu_selftest: unknown case '", which, "'");
  cudaGetLastError();
  opdcore_emu::launch(k, dim3(3), block, smem, nullptr)(p);
  const cudaError_t e = cudaGetLastError();
  TORCH_CHECK(e == cudaSuccess, cudaGetErrorString(e));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(opdcore_emu, m) { m.def("emu_selftest(str case) -> Tensor", &emu_selftest); }
