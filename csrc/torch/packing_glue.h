// Argument checks and planning shared by the CPU and CUDA glue of pad_packed / unpad_packed: packed [N, ...]
// <-> padded [B, T, ...]. cu_seqlens is validated on the host (a CUDA tensor is copied there once).
#pragma once
#include <ATen/ATen.h>

#include <cstring>
#include <exception>
#include <vector>

#include "glue.h"
#include "opdcore/packing.h"

namespace opdcore {
namespace glue {

// cu_seqlens: int32 [B+1] (B >= 1), on ref's device, 0 = cu[0] <= cu[1] <= ... (<= cu[B] == N when N >= 0).
// Returns a contiguous host copy, with the longest sequence length.
inline at::Tensor checked_cu_seqlens(const at::Tensor& cu_seqlens, int64_t N, const at::Tensor& ref,
                                     const char* ref_name, int64_t* longest) {
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must be int32 (the flash-attn convention), got ",
              cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1, "cu_seqlens must be 1-D [B+1], got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.size(0) >= 2, "cu_seqlens must hold B+1 >= 2 entries, got ", cu_seqlens.size(0),
              " (an empty batch)");
  check_same_device(cu_seqlens, "cu_seqlens", ref, ref_name);
  const at::Tensor cu = cu_seqlens.to(at::kCPU).contiguous();
  const int32_t* c = cu.const_data_ptr<int32_t>();
  const int64_t B = cu.size(0) - 1;
  const PackStatus st = check_cu_seqlens(c, B, N >= 0 ? N : c[B], longest);
  switch (st.code) {
    case PackStatus::kOk: break;
    case PackStatus::kFirstNotZero: TORCH_CHECK(false, "cu_seqlens[0] must be 0, got ", c[0]);
    case PackStatus::kDecreasing:
      TORCH_CHECK(false, "cu_seqlens must be non-decreasing, but cu_seqlens[", st.index, "] = ", c[st.index],
                  " > cu_seqlens[", st.index + 1, "] = ", c[st.index + 1]);
    case PackStatus::kLastNotTotal:
      TORCH_CHECK(false, "cu_seqlens[-1] = ", c[B], " must equal the number of rows of ", ref_name, " (", N, ")");
    default: TORCH_CHECK(false, "cu_seqlens is invalid (code ", int(st.code), ")");
  }
  return cu;
}

// The bytes of pad_value stored in dtype dt. Integral and bool data need an exactly representable value:
// a silent truncation (-0.5 -> 0, 256 -> 0 in uint8) would plant a wrong token id or label in the padding.
inline void pad_bytes(double pad_value, at::ScalarType dt, unsigned char* out, int64_t elem_size) {
  at::Tensor s;
  try {
    s = at::full({}, pad_value, at::TensorOptions().dtype(dt));
  } catch (const std::exception&) {  // c10 reports the overflow as a plain std::runtime_error
    TORCH_CHECK(false, "pad_value = ", pad_value, " cannot be stored in the dtype of packed (", dt, ")");
  }
  if (at::isIntegralType(dt, /*includeBool=*/true))
    TORCH_CHECK(s.item<double>() == pad_value, "pad_value must be exactly representable in the dtype of packed (",
                dt, "), got ", pad_value);
  std::memcpy(out, s.const_data_ptr(), size_t(elem_size));
}

// Elements per row: the product of the trailing dims (well defined even when N == 0).
inline int64_t row_width(const at::Tensor& t, int64_t lead) {
  int64_t w = 1;
  for (int64_t d = lead; d < t.dim(); ++d) w *= t.size(d);
  return w;
}

// A checked pad/unpad call: the host copy of cu_seqlens, the geometry and the output shape.
struct PadPlan {
  at::Tensor cu_host;
  int64_t B = 0, T = 0, width = 0, elem_size = 0, N = 0;
  unsigned char pad[16] = {0};
  std::vector<int64_t> out_sizes;
};

inline PadPlan plan_pad(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t max_seqlen, double pad_value) {
  TORCH_CHECK(packed.dim() >= 1, "packed must be at least 1-D [N, ...], got a 0-d tensor");
  PadPlan p;
  int64_t longest = 0;
  p.cu_host = checked_cu_seqlens(cu_seqlens, packed.size(0), packed, "packed", &longest);
  TORCH_CHECK(max_seqlen >= longest, "max_seqlen = ", max_seqlen,
              " is shorter than the longest sequence in cu_seqlens (", longest, ")");
  p.B = p.cu_host.size(0) - 1;
  p.T = max_seqlen;
  p.N = packed.size(0);
  p.elem_size = packed.element_size();
  p.width = row_width(packed, 1);
  pad_bytes(pad_value, packed.scalar_type(), p.pad, p.elem_size);
  p.out_sizes = {p.B, max_seqlen};
  for (int64_t d = 1; d < packed.dim(); ++d) p.out_sizes.push_back(packed.size(d));
  return p;
}

inline PadPlan plan_unpad(const at::Tensor& padded, const at::Tensor& cu_seqlens) {
  TORCH_CHECK(padded.dim() >= 2, "padded must be at least 2-D [B, T, ...], got shape ", padded.sizes());
  PadPlan p;
  int64_t longest = 0;
  p.cu_host = checked_cu_seqlens(cu_seqlens, -1, padded, "padded", &longest);
  p.B = p.cu_host.size(0) - 1;
  p.T = padded.size(1);
  TORCH_CHECK(padded.size(0) == p.B, "padded has ", padded.size(0), " sequences (dim 0) but cu_seqlens describes ",
              p.B);
  TORCH_CHECK(p.T >= longest, "padded has room for ", p.T,
              " tokens per sequence (dim 1) but cu_seqlens has a sequence of ", longest);
  p.N = p.cu_host.const_data_ptr<int32_t>()[p.B];
  p.elem_size = padded.element_size();
  p.width = row_width(padded, 2);
  p.out_sizes = {p.N};
  for (int64_t d = 2; d < padded.dim(); ++d) p.out_sizes.push_back(padded.size(d));
  return p;
}

}  // namespace glue
}  // namespace opdcore
