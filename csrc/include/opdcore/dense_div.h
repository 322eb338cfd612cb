// Dense (full-vocabulary) divergences between the student's and the teacher's next-token distributions
// (METHOD.md 2.5, GKD-style), streamed over the vocabulary: no [N, V] probabilities are ever formed.
//
// p = softmax(s / T), q = softmax(t / T) per row (s: student logits, t: teacher logits, both [rows, V]):
//   kForwardKL  KL(q || p)
//   kReverseKL  KL(p || q)
//   kJSD        beta * KL(q || m) + (1 - beta) * KL(p || m),  m = (1 - beta) p + beta q,  0 < beta < 1
//               (the generalised JSD of GKD, with TRL's convention for beta)
// -inf logits are masked entries (probability 0). KL is +inf where one side has mass the other cannot reach
// (forward: q > 0 where p = 0; reverse: the opposite); JSD is always finite.
#pragma once
#include <cstdint>

#include "opdcore/common.h"

namespace opdcore {

enum class Divergence : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

// loss[r]: the divergence; lse_s[r], lse_t[r]: log-sum-exp of s/T and t/T; aux[r]: what the backward needs
// (KL(p||q) for kReverseKL, KL(p||m) for kJSD, 0 for kForwardKL). Element (r, j) of s is s[r*s_rs + j] (unit
// column stride; the same for t). NaN or +inf in s is kNonFinite, in t kTeacherNonFinite; an all -inf row is
// kAllNegInf / kTeacherAllNegInf (first bad row, student checked first).
// given_lse_s / given_lse_t (both or neither): the normalisers are known (vocabulary parallelism: the global
// ones, while s and t hold one shard's columns); then loss and aux are this tensor's share of the sums, which add
// up over shards, lse_s / lse_t are copied from them, and the all -inf checks are skipped.
template <typename T>
Status dense_divergence_forward(const T* s, int64_t s_rs, const T* t, int64_t t_rs, int64_t rows, int64_t V,
                                Divergence kind, double beta, double temperature, acc_t<T>* loss, acc_t<T>* lse_s,
                                acc_t<T>* lse_t, acc_t<T>* aux, const acc_t<T>* given_lse_s = nullptr,
                                const acc_t<T>* given_lse_t = nullptr);

// grad[r*g_rs + j] = d (sum_r grad_loss[r] * loss[r]) / d s[r, j], rounded once to T:
//   kForwardKL  (g/T) (p - q)
//   kReverseKL  (g/T) p (log p - log q - KL(p||q))
//   kJSD        (g/T) (1 - beta) p (log p - log m - KL(p||m))
template <typename T>
void dense_divergence_backward(const T* s, int64_t s_rs, const T* t, int64_t t_rs, int64_t rows, int64_t V,
                               Divergence kind, double beta, double temperature, const acc_t<T>* lse_s,
                               const acc_t<T>* lse_t, const acc_t<T>* aux, const acc_t<T>* grad_loss, T* grad,
                               int64_t g_rs);

}  // namespace opdcore
