// CPU (OpenMP) implementation of the sparse top-k OPD loss, its gradient, and renorm_kl.
#include "opdcore/opd_loss.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "opdcore/row_math.h"
#include "row_stream.h"

namespace opdcore {

using cpu::neg_inf;

namespace {

// The row math of opdcore/row_math.h on the CPU.
struct CpuMath {
  template <typename A> static A neg_inf() { return cpu::neg_inf<A>(); }
  template <typename A> static A exp(A x) { return std::exp(x); }
  template <typename A> static A log(A x) { return std::log(x); }
  template <typename A> static A max(A a, A b) { return std::max(a, b); }
  template <typename A> static A min(A a, A b) { return std::min(a, b); }
  template <typename A> static bool is_finite(A x) { return std::isfinite(x); }
  template <typename A> static bool is_inf(A x) { return std::isinf(x); }
  template <typename A> static bool is_nan(A x) { return std::isnan(x); }
};

}  // namespace

template <typename A>
Status opd_rewards(int64_t rows, int64_t K, const A* student_lp, const A* teacher_lp, const bool* valid,
                   WeightMode mode, double clip, A* rewards, A* loss) {
  Status status;
#pragma omp parallel
  {
    std::vector<A> w(K);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const auto code = row_math::rewards<CpuMath>(K, student_lp + r * K, teacher_lp + r * K, valid + r * K, mode, A(clip),
                                    w.data(), rewards + r * K, loss + r);
      if (code != Status::kOk) cpu::record_failure(&status, code, r);
    }
  }
  return status;
}

template <typename T>
Status opd_topk_loss_forward(const T* logits, int64_t rows, int64_t V, int64_t row_stride, int64_t col_stride,
                             double temperature, const int64_t* ids, const acc_t<T>* teacher_lp,
                             const bool* valid, int64_t K, WeightMode mode, double clip, acc_t<T>* loss,
                             acc_t<T>* rewards, acc_t<T>* student_lp, acc_t<T>* lse) {
  using A = acc_t<T>;
  Status status;
  const A inv_t = A(1.0 / temperature);
#pragma omp parallel
  {
    A buf[cpu::kBlock];
    std::vector<A> tv(K), w(K);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t* rid = ids + r * K;
      bool bad_id = false;
      for (int64_t q = 0; q < K; ++q) bad_id |= rid[q] < 0 || rid[q] >= V;
      if (bad_id) { cpu::record_failure(&status, Status::kBadId, r); continue; }
      A mx, s, t;
      const cpu::RowRef<A> rr{&mx, &s, &t, nullptr, nullptr, 0, rid, tv.data(), K};
      cpu::row_init(rr);
      if (!cpu::row_update<T, A, false>(rr, logits + r * row_stride, V, col_stride, 0, inv_t, buf)) {
        cpu::record_failure(&status, Status::kNonFinite, r);
        continue;
      }
      if (mx == neg_inf<A>()) { cpu::record_failure(&status, Status::kAllNegInf, r); continue; }
      const A log_s = std::log(s), l = mx + log_s;
      lse[r] = l;
      A* slp = student_lp + r * K;
      for (int64_t q = 0; q < K; ++q) slp[q] = (tv[q] - mx) - log_s;  // exact at large offsets
      const auto code = row_math::rewards<CpuMath>(K, slp, teacher_lp + r * K, valid + r * K, mode, A(clip), w.data(),
                                    rewards + r * K, loss + r);
      if (code != Status::kOk) cpu::record_failure(&status, code, r);
    }
  }
  return status;
}

template <typename T>
void opd_topk_loss_backward(const T* logits, int64_t rows, int64_t n, int64_t row_stride, int64_t col_stride,
                            int64_t vocab_offset, double temperature, const acc_t<T>* lse, const int64_t* ids,
                            const acc_t<T>* rewards, int64_t K, const acc_t<T>* grad_loss, T* grad,
                            int64_t grad_row_stride) {
  using A = acc_t<T>;
  const A inv_t = A(1.0 / temperature);
#pragma omp parallel
  {
    A buf[cpu::kBlock];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const A* rew = rewards + r * K;
      A total = 0;
      for (int64_t q = 0; q < K; ++q) total += rew[q];
      const A g = grad_loss[r] * inv_t, dense = g * total, l = lse[r];
      const T* x = logits + r * row_stride;
      T* gr = grad + r * grad_row_stride;
      for (int64_t b0 = 0; b0 < n; b0 += cpu::kBlock) {
        const int64_t nb = std::min(cpu::kBlock, n - b0);
        if (col_stride == 1) {
#if OPDCORE_ROW_SIMD
          if constexpr (std::is_same_v<A, float>) {
            cpu::simd::dense_grad(x + b0, nb, inv_t, l, dense, buf);
          } else
#endif
          {
#pragma omp simd
            for (int64_t j = 0; j < nb; ++j) buf[j] = dense * exp_nonpos(A(to_float(x[b0 + j])) * inv_t - l);
          }
        } else {
          for (int64_t j = 0; j < nb; ++j) buf[j] = dense * exp_nonpos(A(to_float(x[(b0 + j) * col_stride])) * inv_t - l);
        }
        const int64_t lo = vocab_offset + b0;
        for (int64_t q = 0; q < K; ++q) {
          const int64_t j = ids[r * K + q] - lo;
          if (j >= 0 && j < nb) buf[j] -= g * rew[q];
        }
        for (int64_t j = 0; j < nb; ++j) from_float(buf[j], gr + b0 + j);
      }
    }
  }
}

template <typename A>
Status renorm_kl_forward(int64_t rows, int64_t K, const A* set_logits, const A* teacher_lp, const bool* valid,
                         double temperature, A* loss, A* pbar, A* log_ratio) {
  Status status;
  const A inv_t = A(1.0 / temperature);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const auto code = row_math::renorm_kl<CpuMath>(K, set_logits + r * K, teacher_lp + r * K, valid + r * K, inv_t,
                                                   pbar + r * K, log_ratio + r * K, loss + r);
    if (code != Status::kOk) cpu::record_failure(&status, code, r);
  }
  return status;
}

template <typename A>
void renorm_kl_backward(int64_t rows, int64_t K, const A* pbar, const A* log_ratio, const A* loss,
                        const A* grad_loss, double temperature, A* grad_set_logits) {
  const A inv_t = A(1.0 / temperature);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const A g = grad_loss[r] * inv_t;
    for (int64_t v = 0; v < K; ++v) {
      const int64_t i = r * K + v;
      grad_set_logits[i] = row_math::renorm_kl_grad(g, pbar[i], log_ratio[i], loss[r]);
    }
  }
}

#define OPDCORE_LOSS_ACC(A)                                                                                 \
  template Status opd_rewards<A>(int64_t, int64_t, const A*, const A*, const bool*, WeightMode, double, A*, \
                                 A*);                                                                       \
  template Status renorm_kl_forward<A>(int64_t, int64_t, const A*, const A*, const bool*, double, A*, A*,   \
                                       A*);                                                                 \
  template void renorm_kl_backward<A>(int64_t, int64_t, const A*, const A*, const A*, const A*, double, A*);
OPDCORE_LOSS_ACC(float)
OPDCORE_LOSS_ACC(double)

#define OPDCORE_LOSS_T(T)                                                                                    \
  template Status opd_topk_loss_forward<T>(const T*, int64_t, int64_t, int64_t, int64_t, double,             \
                                           const int64_t*, const acc_t<T>*, const bool*, int64_t, WeightMode, \
                                           double, acc_t<T>*, acc_t<T>*, acc_t<T>*, acc_t<T>*);              \
  template void opd_topk_loss_backward<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, double,     \
                                          const acc_t<T>*, const int64_t*, const acc_t<T>*, int64_t,         \
                                          const acc_t<T>*, T*, int64_t);
OPDCORE_LOSS_T(float)
OPDCORE_LOSS_T(double)
OPDCORE_LOSS_T(bfloat16)
OPDCORE_LOSS_T(float16)

}  // namespace opdcore
