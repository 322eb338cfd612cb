// CPU (OpenMP) dense divergences (forward KL, reverse KL, generalised JSD) between student and teacher logits,
// streamed over the vocabulary in L1-sized blocks; rows in parallel.
#include "opdcore/dense_div.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "row_stream.h"

namespace opdcore {

using cpu::neg_inf;

namespace {

// Scaled logits of one block, and whether any is NaN or +inf.
template <typename T, typename A>
bool load_block(const T* x, int64_t nb, A inv_t, A* buf, A* bmax) {
  const A pinf = std::numeric_limits<A>::infinity();
#pragma omp simd
  for (int64_t j = 0; j < nb; ++j) buf[j] = A(to_float(x[j])) * inv_t;
  A mx = neg_inf<A>();
  int bad = 0;
#pragma omp simd reduction(max : mx) reduction(| : bad)
  for (int64_t j = 0; j < nb; ++j) {
    mx = buf[j] > mx ? buf[j] : mx;
    bad |= int(!(buf[j] == buf[j])) | int(buf[j] == pinf);
  }
  *bmax = mx;
  return bad == 0;
}

// The running (max, sum exp, sum exp * other-term) of one side; `w` is rescaled with the sum.
template <typename A>
struct Side {
  A m = neg_inf<A>(), s = 0, w = 0;
  void raise_max(A bmax) {
    if (bmax <= m) return;
    if (m != neg_inf<A>()) {
      const A f = exp_nonpos(m - bmax);
      s *= f;
      w *= f;
    } else {
      s = 0;
      w = 0;
    }
    m = bmax;
  }
};

// sum_j e_j and sum_j e_j * (y_j - o_j) with e_j = exp(y_j - m); a zero e_j adds nothing (y_j = -inf).
template <typename A>
void accumulate(const A* y, const A* o, int64_t nb, Side<A>* side, bool with_w) {
  const A m = side->m;
  if (m == neg_inf<A>()) return;
  A s = 0, w = 0;
  if (with_w) {
#pragma omp simd reduction(+ : s, w)
    for (int64_t j = 0; j < nb; ++j) {
      const A e = exp_nonpos(y[j] - m);
      s += e;
      w += e > 0 ? e * (y[j] - o[j]) : A(0);
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < nb; ++j) s += exp_nonpos(y[j] - m);
  }
  side->s += s;
  side->w += w;
}

// Probability from a log-probability (<= 0 up to rounding).
template <typename A>
inline A prob(A lp) { return exp_nonpos(lp < A(0) ? lp : A(0)); }

// The sums over one row's columns with known normalisers ls, lt: (loss, aux) as the header defines them, or
// the code of a NaN / +inf logit. The JSD's only pass after the normalisers, and all of a shard's work when the
// normalisers are the global ones (vocabulary parallelism).
template <typename T, typename A>
Status::Code known_lse_sums(const T* sr, const T* tr, int64_t V, A inv_t, Divergence kind, A b, A ls, A lt, A* ys,
                            A* yt, A* loss, A* aux) {
  A kl_pm = 0, kl_qm = 0;  // KL(p||m), KL(q||m); for the KLs: KL(p||q) in kl_pm, KL(q||p) in kl_qm
  for (int64_t b0 = 0; b0 < V; b0 += cpu::kBlock) {
    const int64_t nb = std::min(cpu::kBlock, V - b0);
    A unused;
    if (!load_block(sr + b0, nb, inv_t, ys, &unused)) return Status::kNonFinite;
    if (!load_block(tr + b0, nb, inv_t, yt, &unused)) return Status::kTeacherNonFinite;
    if (kind == Divergence::kJSD) {
#pragma omp simd reduction(+ : kl_pm, kl_qm)
      for (int64_t j = 0; j < nb; ++j) {
        const A lp = ys[j] - ls, lq = yt[j] - lt, p = prob(lp), q = prob(lq);
        const A lm = log_prob((1 - b) * p + b * q);  // the mixture m = (1 - beta) p + beta q
        kl_pm += p > 0 ? p * (lp - lm) : A(0);
        kl_qm += q > 0 ? q * (lq - lm) : A(0);
      }
    } else {
#pragma omp simd reduction(+ : kl_pm, kl_qm)
      for (int64_t j = 0; j < nb; ++j) {
        const A lp = ys[j] - ls, lq = yt[j] - lt, p = prob(lp), q = prob(lq);
        kl_pm += p > 0 ? p * (lp - lq) : A(0);
        kl_qm += q > 0 ? q * (lq - lp) : A(0);
      }
    }
  }
  if (kind == Divergence::kJSD) {
    *loss = b * kl_qm + (1 - b) * kl_pm;
    *aux = kl_pm;
  } else if (kind == Divergence::kReverseKL) {
    *loss = *aux = kl_pm;
  } else {
    *loss = kl_qm;
    *aux = 0;
  }
  return Status::kOk;
}

}  // namespace

template <typename T>
Status dense_divergence_forward(const T* s, int64_t s_rs, const T* t, int64_t t_rs, int64_t rows, int64_t V,
                                Divergence kind, double beta, double temperature, acc_t<T>* loss, acc_t<T>* lse_s,
                                acc_t<T>* lse_t, acc_t<T>* aux, const acc_t<T>* given_lse_s,
                                const acc_t<T>* given_lse_t) {
  using A = acc_t<T>;
  Status status;
  const A inv_t = A(1.0 / temperature), b = A(beta);
  const bool given = given_lse_s != nullptr;
#pragma omp parallel
  {
    A ys[cpu::kBlock], yt[cpu::kBlock];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* sr = s + r * s_rs;
      const T* tr = t + r * t_rs;
      Status::Code code = Status::kOk;
      if (given) {
        lse_s[r] = given_lse_s[r];
        lse_t[r] = given_lse_t[r];
        code = known_lse_sums(sr, tr, V, inv_t, kind, b, lse_s[r], lse_t[r], ys, yt, loss + r, aux + r);
        if (code != Status::kOk) cpu::record_failure(&status, code, r);
        continue;
      }
      Side<A> ps, pt;  // w: reverse KL sum_j p_j (ys - yt) on the student side, forward KL on the teacher side
      for (int64_t b0 = 0; b0 < V && code == Status::kOk; b0 += cpu::kBlock) {
        const int64_t nb = std::min(cpu::kBlock, V - b0);
        A ms, mt;
        if (!load_block(sr + b0, nb, inv_t, ys, &ms)) { code = Status::kNonFinite; break; }
        if (!load_block(tr + b0, nb, inv_t, yt, &mt)) { code = Status::kTeacherNonFinite; break; }
        ps.raise_max(ms);
        pt.raise_max(mt);
        accumulate(ys, yt, nb, &ps, kind == Divergence::kReverseKL);
        accumulate(yt, ys, nb, &pt, kind == Divergence::kForwardKL);
      }
      if (code == Status::kOk && ps.m == neg_inf<A>()) code = Status::kAllNegInf;
      if (code == Status::kOk && pt.m == neg_inf<A>()) code = Status::kTeacherAllNegInf;
      if (code != Status::kOk) { cpu::record_failure(&status, code, r); continue; }
      const A ls = ps.m + std::log(ps.s), lt = pt.m + std::log(pt.s);
      lse_s[r] = ls;
      lse_t[r] = lt;
      if (kind == Divergence::kForwardKL) {
        loss[r] = pt.w / pt.s - lt + ls;
        aux[r] = 0;
      } else if (kind == Divergence::kReverseKL) {
        loss[r] = aux[r] = ps.w / ps.s - ls + lt;
      } else {  // the mixture needs both normalisers: a second pass
        known_lse_sums(sr, tr, V, inv_t, kind, b, ls, lt, ys, yt, loss + r, aux + r);
      }
    }
  }
  return status;
}

template <typename T>
void dense_divergence_backward(const T* s, int64_t s_rs, const T* t, int64_t t_rs, int64_t rows, int64_t V,
                               Divergence kind, double beta, double temperature, const acc_t<T>* lse_s,
                               const acc_t<T>* lse_t, const acc_t<T>* aux, const acc_t<T>* grad_loss, T* grad,
                               int64_t g_rs) {
  using A = acc_t<T>;
  const A inv_t = A(1.0 / temperature), b = A(beta);
#pragma omp parallel
  {
    A ys[cpu::kBlock], yt[cpu::kBlock], out[cpu::kBlock];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const A g = grad_loss[r] * inv_t, ls = lse_s[r], lt = lse_t[r], kl = aux[r];
      for (int64_t b0 = 0; b0 < V; b0 += cpu::kBlock) {
        const int64_t nb = std::min(cpu::kBlock, V - b0);
        A unused;
        load_block(s + r * s_rs + b0, nb, inv_t, ys, &unused);
        load_block(t + r * t_rs + b0, nb, inv_t, yt, &unused);
        if (kind == Divergence::kForwardKL) {
#pragma omp simd
          for (int64_t j = 0; j < nb; ++j)
            out[j] = g * (exp_nonpos(std::min(ys[j] - ls, A(0))) - exp_nonpos(std::min(yt[j] - lt, A(0))));
        } else if (kind == Divergence::kReverseKL) {
#pragma omp simd
          for (int64_t j = 0; j < nb; ++j) {
            const A lp = ys[j] - ls, p = exp_nonpos(std::min(lp, A(0)));
            out[j] = p > 0 ? g * p * (lp - (yt[j] - lt) - kl) : A(0);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < nb; ++j) {
            const A lp = ys[j] - ls, p = prob(lp), lm = log_prob((1 - b) * p + b * prob(yt[j] - lt));
            // No select (it would stop the loop vectorising): masked entries have p = 0 and, once the logs are
            // clamped to the lowest finite value, a finite factor, so they contribute 0.
            const A low = std::numeric_limits<A>::lowest();
            out[j] = g * (1 - b) * p * ((lp > low ? lp : low) - (lm > low ? lm : low) - kl);
          }
        }
        T* gr = grad + r * g_rs + b0;
        for (int64_t j = 0; j < nb; ++j) from_float(out[j], gr + j);
      }
    }
  }
}

#define OPDCORE_DENSE_DIV(T)                                                                                   \
  template Status dense_divergence_forward<T>(const T*, int64_t, const T*, int64_t, int64_t, int64_t, Divergence, \
                                              double, double, acc_t<T>*, acc_t<T>*, acc_t<T>*, acc_t<T>*,         \
                                              const acc_t<T>*, const acc_t<T>*);                                  \
  template void dense_divergence_backward<T>(const T*, int64_t, const T*, int64_t, int64_t, int64_t, Divergence, \
                                             double, double, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*,  \
                                             const acc_t<T>*, T*, int64_t);
OPDCORE_DENSE_DIV(float)
OPDCORE_DENSE_DIV(double)
OPDCORE_DENSE_DIV(bfloat16)
OPDCORE_DENSE_DIV(float16)

}  // namespace opdcore
