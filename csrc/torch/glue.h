// Helpers shared by the ATen glue: argument checks with messages that name the argument, and the mapping
// from ATen scalar types to the kernel library's storage types.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <string>

#include "opdcore/common.h"

namespace opdcore {
namespace glue {

template <typename S> struct kernel_type { using type = S; };
template <> struct kernel_type<at::BFloat16> { using type = bfloat16; };
template <> struct kernel_type<at::Half> { using type = float16; };

template <typename S>
inline const typename kernel_type<S>::type* kptr(const at::Tensor& t) {
  return reinterpret_cast<const typename kernel_type<S>::type*>(t.const_data_ptr<S>());
}
template <typename S>
inline typename kernel_type<S>::type* kptr_mut(at::Tensor& t) {
  return reinterpret_cast<typename kernel_type<S>::type*>(t.mutable_data_ptr<S>());
}

// float32 accumulators for 16/32-bit logits, float64 for float64 logits.
inline at::ScalarType acc_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// Logits: 2-D floating [rows, vocab] with at least one row and one column.
inline void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D [tokens, vocab], got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, " must be float32, float64, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(0) > 0, name, " has no rows (empty batch)");
  TORCH_CHECK(x.size(1) > 0, name, " has an empty vocabulary dimension");
}

inline void check_temperature(double t) {
  TORCH_CHECK(t > 0 && std::isfinite(t), "temperature must be a positive finite number, got ", t);
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " is on ", a.device(), " but ", bn, " is on ", b.device());
}

// [rows, m] int64 ids, same device as the logits.
inline void check_ids(const at::Tensor& ids, const char* name, int64_t rows, const at::Tensor& logits) {
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == rows, name, " must be [", rows, ", m], got shape ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong, name, " must be int64, got ", ids.scalar_type());
  check_same_device(ids, name, logits, "logits");
}

// Turn a kernel Status into an error that names the argument at fault.
inline void raise_status(const Status& st, const char* logits_name, const char* ids_name) {
  switch (st.code) {
    case Status::kOk: return;
    case Status::kNonFinite:
      TORCH_CHECK(false, logits_name, " contains NaN or +inf (row ", st.row, ")");
    case Status::kAllNegInf:
      TORCH_CHECK(false, logits_name, " row ", st.row, " is entirely -inf: no token has probability");
    case Status::kHeapNotFull:
      TORCH_CHECK(false, "k is larger than the number of vocabulary entries streamed for row ", st.row);
    case Status::kTargetUnseen:
      TORCH_CHECK(false, ids_name, " row ", st.row, " holds an id no streamed chunk covered (out of range)");
    case Status::kBadId:
      TORCH_CHECK(false, ids_name, " row ", st.row, " holds an id outside [0, vocab)");
    case Status::kBadStudentLogprob:
      TORCH_CHECK(false, "the student log-prob is -inf or NaN at a valid id (row ", st.row,
                  "): the student gives it zero probability; mark it invalid in `valid`");
    case Status::kBadTeacherLogprob:
      TORCH_CHECK(false, "teacher_logprobs is NaN, +inf or -inf at a valid id (row ", st.row,
                  "); -inf is accepted only with log_ratio_clip > 0");
  }
}

}  // namespace glue
}  // namespace opdcore
