// Argument checks of the dense divergence ops, shared by the CPU and CUDA glue.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <utility>

#include "glue.h"
#include "opdcore/dense_div.h"

namespace opdcore {
namespace glue {

inline Divergence divergence_from(int64_t kind, double beta) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "divergence kind must be 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got ",
              kind);
  if (kind == 2)
    TORCH_CHECK(beta > 0 && beta < 1, "beta must lie in (0, 1) for the JSD (0 and 1 are forward_kl and "
                "reverse_kl), got ", beta);
  return static_cast<Divergence>(kind);
}

// Student and teacher logits over the same vocabulary; returns views with unit column stride.
inline std::pair<at::Tensor, at::Tensor> dense_inputs(const at::Tensor& s, const at::Tensor& t, double temperature) {
  check_logits(s, "student_logits");
  check_logits(t, "teacher_logits");
  check_temperature(temperature);
  TORCH_CHECK(s.size(0) == t.size(0), "student_logits has ", s.size(0), " rows but teacher_logits has ", t.size(0));
  TORCH_CHECK(s.size(1) == t.size(1), "vocabulary mismatch: student_logits has ", s.size(1),
              " columns but teacher_logits has ", t.size(1), " (pad or slice the LM heads to one vocabulary)");
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), "student_logits (", s.scalar_type(), ") and teacher_logits (",
              t.scalar_type(), ") must share a dtype");
  check_same_device(t, "teacher_logits", s, "student_logits");
  auto unit = [](const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); };
  return {unit(s), unit(t)};
}

// Known normalisers (vocabulary parallelism): both or neither, [N] accumulator-typed, contiguous on return.
inline std::pair<at::Tensor, at::Tensor> given_lse(const std::optional<at::Tensor>& ls,
                                                   const std::optional<at::Tensor>& lt, const at::Tensor& s) {
  TORCH_CHECK(ls.has_value() == lt.has_value(), "lse_s and lse_t must be given together");
  if (!ls.has_value()) return {};
  const auto acc = acc_dtype(s.scalar_type());
  for (const at::Tensor* x : {&*ls, &*lt}) {
    TORCH_CHECK(x->dim() == 1 && x->size(0) == s.size(0) && x->scalar_type() == acc, "lse_s and lse_t must be [",
                s.size(0), "] ", acc);
    check_same_device(*x, "lse_s/lse_t", s, "student_logits");
  }
  return {ls->contiguous(), lt->contiguous()};
}

inline void check_dense_backward(const at::Tensor& grad_loss, const at::Tensor& s, const at::Tensor& lse_s,
                                 const at::Tensor& lse_t, const at::Tensor& aux) {
  const int64_t N = s.size(0);
  const auto acc = acc_dtype(s.scalar_type());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == N, "grad_loss must be [", N, "]");
  for (const at::Tensor* x : {&lse_s, &lse_t, &aux}) {
    TORCH_CHECK(x->dim() == 1 && x->size(0) == N && x->scalar_type() == acc, "lse_s, lse_t and aux must be [", N,
                "] ", acc);
    check_same_device(*x, "the saved statistics", s, "student_logits");
  }
  check_same_device(grad_loss, "grad_loss", s, "student_logits");
}

}  // namespace glue
}  // namespace opdcore
