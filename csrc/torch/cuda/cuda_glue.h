// Helpers of the CUDA ATen glue: device guard + current stream + status word + workspace for one op call, and
// the error text for a CUDA runtime failure. Uses c10/cuda headers only (ATen/cuda/CUDAContext.h would pull in
// the cuBLAS/cuSPARSE headers, which a plain CUDA toolkit or a CPU build of torch may lack).
//
// Under OPDCORE_CUDA_EMU (scripts/build_cuda_emu.sh) the same glue runs the kernels in the CPU emulator of
// csrc/cuda_emu: host tensors stand in for device memory and the ops register as torch.ops.opdcore_emu.* on
// the CPU key, so tests/test_cuda.py can check glue + kernels against the CPU ops without a GPU.
#pragma once
#include <ATen/ATen.h>
#ifndef OPDCORE_CUDA_EMU
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdlib>

#include "glue.h"
#include "opdcore/cuda_kernels.h"

// Where the CUDA glue registers its kernels.
#ifdef OPDCORE_CUDA_EMU
#define OPDCORE_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(opdcore_emu, CPU, m)
#else
#define OPDCORE_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(opdcore, CUDA, m)
#endif

namespace opdcore {
namespace glue {

// Everything one kernel call needs. Construct it after the argument checks, before allocating outputs (the
// guard makes ref's device current, so outputs allocated after it land there too).
struct CudaCall {
#ifndef OPDCORE_CUDA_EMU
  c10::cuda::CUDAGuard guard;
#endif
  at::Tensor status, workspace;
  cuda::Launch launch;

#ifdef OPDCORE_CUDA_EMU
  CudaCall(const at::Tensor& ref, size_t workspace_bytes = 0) {
    // The tests stand in for graph capture with this variable (the unchecked path below).
    const char* unchecked = std::getenv("OPDCORE_EMU_UNCHECKED");
    const bool capturing = unchecked && unchecked[0] == '1';
#else
  CudaCall(const at::Tensor& ref, size_t workspace_bytes = 0) : guard(ref.device()) {
    TORCH_CHECK(ref.is_cuda(), "expected a CUDA tensor");
    launch.stream = c10::cuda::getCurrentCUDAStream(ref.device().index()).stream();
    // While a CUDA graph is captured no host sync is allowed: skip the status check (and its sync) then.
    const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
#endif
    launch.num_sms = cuda::device_sm_count();
    if (!capturing) {
      status = at::empty({1}, ref.options().dtype(at::kLong));
      launch.status = reinterpret_cast<unsigned long long*>(status.mutable_data_ptr<int64_t>());
    }
    set_workspace(ref, workspace_bytes);
  }

  // An output of a fallible op. Unchecked (graph capture) it starts as NaN (ids: -1): the kernels skip a bad
  // row's outputs, which then read as NaN instead of stale memory.
  at::Tensor output(at::IntArrayRef sizes, const at::TensorOptions& opts) const {
    if (launch.status) return at::empty(sizes, opts);
    return at::full(sizes, at::isFloatingType(opts.dtype().toScalarType()) ? at::Scalar(NAN) : at::Scalar(-1), opts);
  }

  void set_workspace(const at::Tensor& ref, size_t bytes) {
    if (bytes == 0) return;
    workspace = at::empty({static_cast<int64_t>(bytes)}, ref.options().dtype(at::kByte));
    launch.workspace = workspace.mutable_data_ptr();
    launch.workspace_bytes = bytes;
  }
};

inline void raise_cuda_status(const Status& st, const char* logits_name, const char* ids_name) {
  if (st.code == Status::kCudaError)
    TORCH_CHECK(false, "CUDA error in an opdcore kernel: ", cudaGetErrorString(static_cast<cudaError_t>(st.row)));
  raise_status(st, logits_name, ids_name);
}

// The chunk's columns are 32-bit inside the kernels.
inline void check_cuda_columns(int64_t n, int64_t vocab_offset, const char* name) {
  TORCH_CHECK(vocab_offset + n <= cuda::kMaxColumns, name, ": vocabulary ids up to ", cuda::kMaxColumns,
              " are supported on CUDA, got ", vocab_offset + n, " columns");
}

// Top k of (value, id) pairs per row, best first in the CPU order (value descending, ties to the lower id):
// a stable sort by id, then a stable sort by value. -0 is folded into +0 first (the CPU compares values).
// The large-k path (k > cuda::kMaxTopK) of the streaming ops; vals must hold no NaN.
inline std::tuple<at::Tensor, at::Tensor> topk_pairs(at::Tensor vals, at::Tensor ids, int64_t k, bool ids_sorted) {
  vals = at::where(vals == 0, at::zeros_like(vals), vals);
  if (!ids_sorted) {
    const at::Tensor by_id = std::get<1>(ids.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false));
    vals = vals.gather(1, by_id);
    ids = ids.gather(1, by_id);
  }
  const at::Tensor top = std::get<1>(vals.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true)).narrow(1, 0, k);
  return {vals.gather(1, top), ids.gather(1, top)};
}

}  // namespace glue
}  // namespace opdcore
