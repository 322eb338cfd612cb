// ATen glue (CPU) for the packed-sequence pad/unpad ops: packed [N, ...] <-> padded [B, T, ...].
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <exception>
#include <vector>

#include "glue.h"
#include "opdcore/packing.h"

namespace opdcore {
namespace {

using at::Tensor;

// cu_seqlens: int32 [B+1] (B >= 1), on ref's device, 0 = cu[0] <= cu[1] <= ... (<= cu[B] == N when N >= 0).
// Returns it contiguous, with the longest sequence length.
Tensor checked_cu_seqlens(const Tensor& cu_seqlens, int64_t N, const Tensor& ref, const char* ref_name,
                          int64_t* longest) {
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must be int32 (the flash-attn convention), got ",
              cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1, "cu_seqlens must be 1-D [B+1], got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.size(0) >= 2, "cu_seqlens must hold B+1 >= 2 entries, got ", cu_seqlens.size(0),
              " (an empty batch)");
  glue::check_same_device(cu_seqlens, "cu_seqlens", ref, ref_name);
  Tensor cu = cu_seqlens.contiguous();
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
void pad_bytes(double pad_value, at::ScalarType dt, unsigned char* out, int64_t elem_size) {
  Tensor s;
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
int64_t row_width(const Tensor& t, int64_t lead) {
  int64_t w = 1;
  for (int64_t d = lead; d < t.dim(); ++d) w *= t.size(d);
  return w;
}

Tensor pad_packed_cpu(const Tensor& packed, const Tensor& cu_seqlens, int64_t max_seqlen, double pad_value) {
  TORCH_CHECK(packed.dim() >= 1, "packed must be at least 1-D [N, ...], got a 0-d tensor");
  int64_t longest = 0;
  const Tensor cu = checked_cu_seqlens(cu_seqlens, packed.size(0), packed, "packed", &longest);
  TORCH_CHECK(max_seqlen >= longest, "max_seqlen = ", max_seqlen, " is shorter than the longest sequence in cu_seqlens (",
              longest, ")");
  const int64_t B = cu.size(0) - 1, es = packed.element_size();
  unsigned char pad[16] = {0};
  pad_bytes(pad_value, packed.scalar_type(), pad, es);
  std::vector<int64_t> sizes{B, max_seqlen};
  for (int64_t d = 1; d < packed.dim(); ++d) sizes.push_back(packed.size(d));
  Tensor out = at::empty(sizes, packed.options().memory_format(at::MemoryFormat::Contiguous));
  const Tensor src = packed.contiguous();
  const PackStatus st = opdcore::pad_packed(src.const_data_ptr(), cu.const_data_ptr<int32_t>(), B, max_seqlen,
                                            row_width(src, 1), es, pad, out.mutable_data_ptr());
  TORCH_CHECK(st.ok(), "packed has an unsupported element size of ", es, " bytes");
  return out;
}

Tensor unpad_packed_cpu(const Tensor& padded, const Tensor& cu_seqlens) {
  TORCH_CHECK(padded.dim() >= 2, "padded must be at least 2-D [B, T, ...], got shape ", padded.sizes());
  int64_t longest = 0;
  const Tensor cu = checked_cu_seqlens(cu_seqlens, -1, padded, "padded", &longest);
  const int64_t B = cu.size(0) - 1, T = padded.size(1), es = padded.element_size();
  TORCH_CHECK(padded.size(0) == B, "padded has ", padded.size(0), " sequences (dim 0) but cu_seqlens describes ", B);
  TORCH_CHECK(T >= longest, "padded has room for ", T, " tokens per sequence (dim 1) but cu_seqlens has a sequence of ",
              longest);
  const int64_t N = cu.const_data_ptr<int32_t>()[B];
  std::vector<int64_t> sizes{N};
  for (int64_t d = 2; d < padded.dim(); ++d) sizes.push_back(padded.size(d));
  Tensor out = at::empty(sizes, padded.options().memory_format(at::MemoryFormat::Contiguous));
  const Tensor src = padded.contiguous();
  const PackStatus st = opdcore::unpad_packed(src.const_data_ptr(), cu.const_data_ptr<int32_t>(), B, T,
                                              row_width(src, 2), es, out.mutable_data_ptr());
  TORCH_CHECK(st.ok(), "padded has an unsupported element size of ", es, " bytes");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(opdcore, CPU, m) {
  m.impl("pad_packed", &pad_packed_cpu);
  m.impl("unpad_packed", &unpad_packed_cpu);
}

}  // namespace opdcore
