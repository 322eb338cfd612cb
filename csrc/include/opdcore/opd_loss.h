// The sparse top-k OPD loss (METHOD.md 2.2-2.4) and its gradient with respect to the student logits.
//
// For each row (token) t a token set is given as ids[t, :K] with a valid mask; teacher_lp holds
// log q_t on those ids. With p the student's full-vocabulary log-softmax at temperature tau:
//   l(v) = log p(v) - log q(v)  (optionally clipped to [-c, c]),  r(v) = -w(v) l(v),
//   loss_t = -sum_v sg(r(v)) log p(v),
//   dloss_t/dz = -(1/tau) (sum_v r(v) e_v - (sum_v r(v)) softmax(z/tau)).
// renorm_kl: loss_t = KL(pbar || qbar) with both renormalised over the valid set (exact gradient, touches
// only the K set logits).
#pragma once
#include <cstdint>

#include "opdcore/common.h"

namespace opdcore {

enum class WeightMode : int {
  kStudentP = 0,     // p(v) / sum_set p
  kTeacherP = 1,     // q(v) / sum_set q
  kUniform = 2,      // 1 / |set|
  kStudentPRaw = 3,  // p(v), not renormalised (symmetric_difference default in the reference)
  kTeacherPRaw = 4,  // q(v), not renormalised
  kNoneRaw = 5,      // 1 per id (the reference fork's "none" for union-intersection, where it never renormalises)
};

// Rewards and per-row loss from log-probs on the set (no vocabulary pass). Shared by the unfused kernel and
// the LM-head-fused path, which gets the student log-probs from the streaming state.
// clip <= 0 disables log-ratio clipping; teacher_lp may be -inf at a valid id only when clipping.
template <typename A>
Status opd_rewards(int64_t rows, int64_t K, const A* student_lp, const A* teacher_lp, const bool* valid,
                   WeightMode mode, double clip, A* rewards, A* loss);

// Forward over full rows: one streaming pass per row for the log-sum-exp and the set logits, then
// opd_rewards. Outputs loss [rows], rewards [rows, K], student_lp [rows, K], lse [rows].
// ids must lie in [0, V) (checked: kBadId).
template <typename T>
Status opd_topk_loss_forward(const T* logits, int64_t rows, int64_t V, int64_t row_stride, int64_t col_stride,
                             double temperature, const int64_t* ids, const acc_t<T>* teacher_lp,
                             const bool* valid, int64_t K, WeightMode mode, double clip, acc_t<T>* loss,
                             acc_t<T>* rewards, acc_t<T>* student_lp, acc_t<T>* lse);

// Gradient for a vocabulary chunk [vocab_offset, vocab_offset + n) of the logits (whole rows: offset 0,
// n = V). grad may alias logits (same strides), which the LM-head-fused backward uses to turn its logits
// workspace into the gradient in place. grad_loss: d(total)/d(loss_t), [rows].
template <typename T>
void opd_topk_loss_backward(const T* logits, int64_t rows, int64_t n, int64_t row_stride, int64_t col_stride,
                            int64_t vocab_offset, double temperature, const acc_t<T>* lse, const int64_t* ids,
                            const acc_t<T>* rewards, int64_t K, const acc_t<T>* grad_loss, T* grad,
                            int64_t grad_row_stride);

// renorm_kl from the set logits z[rows, K] (gathered already: from full logits or K head rows).
// Saves pbar [rows, K] and log_ratio = log pbar - log qbar [rows, K] for the backward.
template <typename A>
Status renorm_kl_forward(int64_t rows, int64_t K, const A* set_logits, const A* teacher_lp, const bool* valid,
                         double temperature, A* loss, A* pbar, A* log_ratio);

// d loss / d set_logits [rows, K] = grad_loss/tau * pbar * (log_ratio - loss).
template <typename A>
void renorm_kl_backward(int64_t rows, int64_t K, const A* pbar, const A* log_ratio, const A* loss,
                        const A* grad_loss, double temperature, A* grad_set_logits);

}  // namespace opdcore
