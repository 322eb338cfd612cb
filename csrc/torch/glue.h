// Helpers shared by the ATen glue: argument checks with messages that name the argument, and the mapping
// from ATen scalar types to the kernel library's storage types.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <string>

#include "opdcore/common.h"
#include "opdcore/opd_loss.h"
#include "opdcore/topk_stream.h"

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
    case Status::kTeacherNonFinite:
      TORCH_CHECK(false, "teacher_logits contains NaN or +inf (row ", st.row, ")");
    case Status::kTeacherAllNegInf:
      TORCH_CHECK(false, "teacher_logits row ", st.row, " is entirely -inf: no token has probability");
    case Status::kCudaError:  // only the CUDA glue sees this; it names the error itself (csrc/torch/cuda/)
      TORCH_CHECK(false, "CUDA error ", st.row, " in an opdcore kernel");
  }
}

// ---- checks shared by the CPU and CUDA glue of the same op ----

// The state tensors are made by the Python layer (opdcore.ops.stream); check they fit together.
inline void check_state(const at::Tensor& max, const at::Tensor& sumexp, const at::Tensor& ent, const at::Tensor& hv,
                        const at::Tensor& hi, const at::Tensor& tv, const char* which) {
  const int64_t N = max.size(0);
  const auto dt = max.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, which, ".max must be float32 or float64");
  for (const at::Tensor* t : {&max, &sumexp, &ent, &hv, &hi, &tv})
    TORCH_CHECK(t->is_contiguous() && t->device() == max.device() && t->size(0) == N, which,
                ": state tensors must be contiguous, on one device, with the same number of rows");
  TORCH_CHECK(sumexp.scalar_type() == dt && ent.scalar_type() == dt && hv.scalar_type() == dt &&
                  tv.scalar_type() == dt && hi.scalar_type() == at::kLong,
              which, ": state tensors have mismatched dtypes");
  TORCH_CHECK(hv.dim() == 2 && hi.sizes() == hv.sizes() && tv.dim() == 2, which,
              ": heap_vals/heap_ids must be [rows, k] and target_vals [rows, m]");
}

template <typename A>
inline StreamState<A> state_view(at::Tensor& max, at::Tensor& sumexp, at::Tensor& ent, at::Tensor& hv, at::Tensor& hi,
                                 const at::Tensor* tid, at::Tensor& tv) {
  StreamState<A> st;
  st.rows = max.size(0);
  st.max = max.mutable_data_ptr<A>();
  st.sumexp = sumexp.mutable_data_ptr<A>();
  st.ent = ent.mutable_data_ptr<A>();
  st.k = hv.size(1);
  st.heap_vals = hv.mutable_data_ptr<A>();
  st.heap_ids = hi.mutable_data_ptr<int64_t>();
  st.m = tv.size(1);
  st.target_ids = tid ? tid->const_data_ptr<int64_t>() : nullptr;
  st.target_vals = tv.mutable_data_ptr<A>();
  return st;
}

inline WeightMode weight_mode_from(int64_t w) {
  TORCH_CHECK(w >= 0 && w <= 5, "weight_mode must be 0..5 (student_p, teacher_p, none, student_p_raw, "
              "teacher_p_raw, none_raw), got ", w);
  return static_cast<WeightMode>(w);
}

// ids [N, K] int64, teacher_logprobs [N, K] (any float; converted to the accumulator dtype), valid [N, K] bool.
inline void check_set(const at::Tensor& ids, const at::Tensor& tlp, const at::Tensor& valid, int64_t N,
                      const at::Tensor& ref) {
  glue::check_ids(ids, "ids", N, ref);
  TORCH_CHECK(tlp.sizes() == ids.sizes(), "teacher_logprobs must have the shape of ids ", ids.sizes(), ", got ",
              tlp.sizes());
  TORCH_CHECK(at::isFloatingType(tlp.scalar_type()), "teacher_logprobs must be floating, got ", tlp.scalar_type());
  TORCH_CHECK(valid.sizes() == ids.sizes(), "valid must have the shape of ids ", ids.sizes(), ", got ",
              valid.sizes());
  TORCH_CHECK(valid.scalar_type() == at::kBool, "valid must be bool, got ", valid.scalar_type());
  glue::check_same_device(tlp, "teacher_logprobs", ref, "logits");
  glue::check_same_device(valid, "valid", ref, "logits");
}

inline void check_clip(double clip) {
  TORCH_CHECK(clip >= 0 && !std::isnan(clip), "log_ratio_clip must be >= 0 (0: off), got ", clip);
}

// Shared checks of the backward's saved tensors against a logits (or logits-chunk) tensor.
inline void check_backward(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& lse,
                           const at::Tensor& ids, const at::Tensor& rewards) {
  const int64_t N = x.size(0);
  const auto acc = glue::acc_dtype(x.scalar_type());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == N, "grad_loss must be [", N, "]");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == N && lse.scalar_type() == acc, "lse must be [", N, "] ", acc);
  glue::check_ids(ids, "ids", N, x);
  TORCH_CHECK(rewards.sizes() == ids.sizes() && rewards.scalar_type() == acc, "rewards must be ", acc,
              " with the shape of ids");
  glue::check_same_device(grad_loss, "grad_loss", x, "logits");
  glue::check_same_device(lse, "lse", x, "logits");
  glue::check_same_device(rewards, "rewards", x, "logits");
}

// stream_update: a state (see check_state), a logits chunk for it, and the chunk's vocabulary offset.
inline void check_stream_update(const at::Tensor& max, const at::Tensor& sumexp, const at::Tensor& ent,
                                const at::Tensor& hv, const at::Tensor& hi, const at::Tensor& target_ids,
                                const at::Tensor& tv, const at::Tensor& logits, int64_t vocab_offset,
                                double temperature) {
  check_state(max, sumexp, ent, hv, hi, tv, "state");
  glue::check_logits(logits, "logits chunk");
  glue::check_temperature(temperature);
  TORCH_CHECK(logits.size(0) == max.size(0), "logits chunk has ", logits.size(0), " rows but the state has ",
              max.size(0));
  TORCH_CHECK(vocab_offset >= 0, "vocab_offset must be >= 0, got ", vocab_offset);
  TORCH_CHECK(glue::acc_dtype(logits.scalar_type()) == max.scalar_type(), "logits chunk dtype ",
              logits.scalar_type(), " does not match the state's accumulator dtype ", max.scalar_type());
  TORCH_CHECK(target_ids.scalar_type() == at::kLong && target_ids.is_contiguous() &&
                  target_ids.sizes() == tv.sizes(),
              "target_ids must be contiguous int64 with the shape of target_vals");
  glue::check_same_device(logits, "logits chunk", max, "state");
  glue::check_same_device(target_ids, "target_ids", max, "state");
}

// opd_rewards: student / teacher log-probs [N, K] (float32 or float64) and a bool valid mask of that shape.
inline void check_rewards_args(const at::Tensor& slp, const at::Tensor& tlp, const at::Tensor& valid, double clip) {
  TORCH_CHECK(slp.dim() == 2, "student_logprobs must be [tokens, K], got ", slp.sizes());
  TORCH_CHECK(slp.scalar_type() == at::kFloat || slp.scalar_type() == at::kDouble,
              "student_logprobs must be float32 or float64, got ", slp.scalar_type());
  TORCH_CHECK(slp.size(0) > 0, "student_logprobs has no rows (empty batch)");
  TORCH_CHECK(tlp.sizes() == slp.sizes(), "teacher_logprobs must have the shape of student_logprobs");
  TORCH_CHECK(valid.sizes() == slp.sizes() && valid.scalar_type() == at::kBool,
              "valid must be bool with the shape of student_logprobs");
  glue::check_clip(clip);
  glue::check_same_device(tlp, "teacher_logprobs", slp, "student_logprobs");
  glue::check_same_device(valid, "valid", slp, "student_logprobs");
}

// renorm_kl_fwd: the set logits [N, K] with teacher log-probs and a valid mask of that shape.
inline void check_renorm_args(const at::Tensor& z, const at::Tensor& tlp, const at::Tensor& valid,
                              double temperature) {
  TORCH_CHECK(z.dim() == 2 && z.size(0) > 0, "set_logits must be [tokens, K] with tokens > 0, got ", z.sizes());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), "set_logits must be floating, got ", z.scalar_type());
  glue::check_temperature(temperature);
  TORCH_CHECK(tlp.sizes() == z.sizes(), "teacher_logprobs must have the shape of the set ", z.sizes());
  TORCH_CHECK(valid.sizes() == z.sizes() && valid.scalar_type() == at::kBool, "valid must be bool with shape ",
              z.sizes());
  glue::check_same_device(tlp, "teacher_logprobs", z, "set_logits");
  glue::check_same_device(valid, "valid", z, "set_logits");
}

}  // namespace glue
}  // namespace opdcore
