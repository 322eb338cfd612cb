// ATen glue (CUDA) for the packed-sequence pad/unpad ops: the CPU glue's checks (cu_seqlens is validated on a
// host copy: one small device-to-host copy), then the byte-copy kernels of csrc/cuda/packing.cu.
#include <torch/library.h>

#include "cuda/cuda_glue.h"
#include "opdcore/cuda_kernels.h"
#include "packing_glue.h"

namespace opdcore {
namespace {

using at::Tensor;

Tensor pad_packed_cuda(const Tensor& packed, const Tensor& cu_seqlens, int64_t max_seqlen, double pad_value) {
  const glue::PadPlan p = glue::plan_pad(packed, cu_seqlens, max_seqlen, pad_value);
  glue::CudaCall call(packed);
  Tensor out = at::empty(p.out_sizes, packed.options().memory_format(at::MemoryFormat::Contiguous));
  const Tensor src = packed.contiguous(), cu = cu_seqlens.contiguous();
  glue::raise_cuda_status(cuda::pad_packed(src.const_data_ptr(), cu.const_data_ptr<int32_t>(), p.B, p.T, p.width,
                                           p.elem_size, p.pad, out.mutable_data_ptr(), call.launch),
                          "packed", "cu_seqlens");
  return out;
}

Tensor unpad_packed_cuda(const Tensor& padded, const Tensor& cu_seqlens) {
  const glue::PadPlan p = glue::plan_unpad(padded, cu_seqlens);
  glue::CudaCall call(padded);
  Tensor out = at::empty(p.out_sizes, padded.options().memory_format(at::MemoryFormat::Contiguous));
  const Tensor src = padded.contiguous(), cu = cu_seqlens.contiguous();
  glue::raise_cuda_status(cuda::unpad_packed(src.const_data_ptr(), cu.const_data_ptr<int32_t>(), p.B, p.T, p.width,
                                             p.elem_size, p.N, out.mutable_data_ptr(), call.launch),
                          "padded", "cu_seqlens");
  return out;
}

}  // namespace

OPDCORE_CUDA_LIBRARY_IMPL(m) {
  m.impl("pad_packed", &pad_packed_cuda);
  m.impl("unpad_packed", &unpad_packed_cuda);
}

}  // namespace opdcore
