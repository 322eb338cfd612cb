// ATen glue (CUDA) of the fused LM-head top-k kernels (csrc/cuda/head_topk.cu, csrc/cutlass/head_topk_sm90.cu).
#include <torch/library.h>

#include <tuple>

#include "cuda/cuda_glue.h"
#include "glue.h"
#include "opdcore/cuda_kernels.h"

namespace opdcore {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_topk_tiled_cuda(const Tensor& hidden, const Tensor& weight,
                                                                  int64_t k, double temperature, int64_t kernel) {
  TORCH_CHECK(kernel == 0 || kernel == 1, "kernel must be 0 (simt) or 1 (sm90), got ", kernel);
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "hidden must be [N, H] and weight [V, H], got ",
              hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), "hidden size mismatch: hidden has H=", hidden.size(1),
              ", weight has H=", weight.size(1));
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "hidden (", hidden.scalar_type(), ") and weight (",
              weight.scalar_type(), ") must share a dtype");
  glue::check_same_device(hidden, "hidden", weight, "weight");
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || (kernel == 0 && dt == at::kFloat),
              "hidden and weight must be bfloat16 or float16", kernel == 0 ? " (or float32)" : "", ", got ", dt);
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  TORCH_CHECK(N > 0, "hidden has no rows (empty batch)");
  TORCH_CHECK(H > 0 && V > 0, "hidden size and vocabulary must be non-empty, got H=", H, ", V=", V);
  TORCH_CHECK(k >= 1 && k <= cuda::kHeadMaxTopK && k <= V, "k must be in [1, min(vocab=", V, ", ",
              cuda::kHeadMaxTopK, ")], got ", k);
  glue::check_temperature(temperature);
  glue::check_cuda_columns(V, 0, "weight");
  const Tensor h = hidden.contiguous(), w = weight.contiguous();
  if (kernel == 1) {
    TORCH_CHECK(cuda::head_topk_sm90_compiled(), "opdcore was built without the CUTLASS sm_90a kernel");
    TORCH_CHECK(H % 8 == 0, "the sm90 kernel needs the hidden size to be a multiple of 8 (16-byte rows), got ", H);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(h.const_data_ptr()) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(w.const_data_ptr()) % 16 == 0,
                "the sm90 kernel needs 16-byte aligned hidden and weight");
#ifndef OPDCORE_CUDA_EMU
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, h.device().index());
    TORCH_CHECK(major == 9, "the sm90 kernel runs on compute capability 9.x (Hopper), this device has ", major, ".x");
#endif
  }
  glue::CudaCall call(h, cuda::head_topk_workspace_bytes(N, V, k, cuda::device_sm_count()));
  const auto opts = h.options().dtype(at::kFloat);
  Tensor ids = call.output({N, k}, h.options().dtype(at::kLong));
  Tensor lp = call.output({N, k}, opts), lse = call.output({N}, opts), ent = call.output({N}, opts);
  StreamResult<float> out{ids.mutable_data_ptr<int64_t>(), lp.mutable_data_ptr<float>(),
                          lse.mutable_data_ptr<float>(), ent.mutable_data_ptr<float>(), nullptr};
  const auto which = kernel == 1 ? cuda::HeadKernel::kSm90 : cuda::HeadKernel::kSimt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "linear_topk_tiled_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      glue::raise_cuda_status(cuda::head_topk(glue::kptr<scalar_t>(h), glue::kptr<scalar_t>(w), N, V, H,
                                              temperature, k, which, out, call.launch),
                              "logits", "ids");
    }
  });
  return {ids, lp, lse, ent};
}

}  // namespace

OPDCORE_CUDA_LIBRARY_IMPL(m) { m.impl("linear_topk_tiled", &linear_topk_tiled_cuda); }

}  // namespace opdcore
