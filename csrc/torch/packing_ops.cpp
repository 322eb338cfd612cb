// ATen glue (CPU) for the packed-sequence pad/unpad ops: packed [N, ...] <-> padded [B, T, ...].
#include <torch/library.h>

#include "packing_glue.h"

namespace opdcore {
namespace {

using at::Tensor;

Tensor pad_packed_cpu(const Tensor& packed, const Tensor& cu_seqlens, int64_t max_seqlen, double pad_value) {
  const glue::PadPlan p = glue::plan_pad(packed, cu_seqlens, max_seqlen, pad_value);
  Tensor out = at::empty(p.out_sizes, packed.options().memory_format(at::MemoryFormat::Contiguous));
  const Tensor src = packed.contiguous();
  const PackStatus st = opdcore::pad_packed(src.const_data_ptr(), p.cu_host.const_data_ptr<int32_t>(), p.B, p.T,
                                            p.width, p.elem_size, p.pad, out.mutable_data_ptr());
  TORCH_CHECK(st.ok(), "packed has an unsupported element size of ", p.elem_size, " bytes");
  return out;
}

Tensor unpad_packed_cpu(const Tensor& padded, const Tensor& cu_seqlens) {
  const glue::PadPlan p = glue::plan_unpad(padded, cu_seqlens);
  Tensor out = at::empty(p.out_sizes, padded.options().memory_format(at::MemoryFormat::Contiguous));
  const Tensor src = padded.contiguous();
  const PackStatus st = opdcore::unpad_packed(src.const_data_ptr(), p.cu_host.const_data_ptr<int32_t>(), p.B, p.T,
                                              p.width, p.elem_size, out.mutable_data_ptr());
  TORCH_CHECK(st.ok(), "padded has an unsupported element size of ", p.elem_size, " bytes");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(opdcore, CPU, m) {
  m.impl("pad_packed", &pad_packed_cpu);
  m.impl("unpad_packed", &unpad_packed_cpu);
}

}  // namespace opdcore
