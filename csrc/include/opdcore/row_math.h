// Per-row math of the top-k losses, written once for the CPU kernels (csrc/cpu/opd_loss.cpp), the CUDA kernels
// (csrc/cuda/device_common.cuh, opd_loss.cu) and the CUDA emulator: the set weights and rewards of the OPD loss
// (METHOD.md 2.3) and the renormalised top-k KL (2.4). `M` supplies exp/log/max/min and the float tests in the
// accumulator type A, so each side keeps its own math (std:: on the CPU; expf/logf on the GPU, not the fast SFU
// versions) and both give the same results.
#pragma once
#include <cstdint>

#include "opdcore/common.h"
#include "opdcore/opd_loss.h"

#if defined(__CUDACC__)
#define OPDCORE_HD __host__ __device__
#else
#define OPDCORE_HD
#endif

namespace opdcore {
namespace row_math {

// Weights over the valid set. Renormalised modes work in log space so tiny probabilities do not underflow to 0/0.
template <typename M, typename A>
OPDCORE_HD void weights(int64_t K, const A* slp, const A* tlp, const bool* valid, WeightMode mode, A* w) {
  const bool use_teacher = mode == WeightMode::kTeacherP || mode == WeightMode::kTeacherPRaw;
  const A* src = use_teacher ? tlp : slp;
  int64_t count = 0;
  A mx = M::template neg_inf<A>();
  for (int64_t v = 0; v < K; ++v)
    if (valid[v]) { ++count; mx = M::max(mx, src[v]); }
  switch (mode) {
    case WeightMode::kUniform:
      for (int64_t v = 0; v < K; ++v) w[v] = valid[v] ? A(1) / A(count) : A(0);
      return;
    case WeightMode::kNoneRaw:
      for (int64_t v = 0; v < K; ++v) w[v] = valid[v] ? A(1) : A(0);
      return;
    case WeightMode::kStudentPRaw:
    case WeightMode::kTeacherPRaw:
      for (int64_t v = 0; v < K; ++v) w[v] = valid[v] ? M::exp(src[v]) : A(0);
      return;
    default: {
      A z = 0;
      for (int64_t v = 0; v < K; ++v)
        if (valid[v]) z += M::exp(src[v] - mx);
      const A log_z = mx + M::log(z);
      for (int64_t v = 0; v < K; ++v) w[v] = valid[v] ? M::exp(src[v] - log_z) : A(0);
    }
  }
}

// r(v) = -w(v) clip(log p - log q) and loss = -sum_v r(v) log p(v). `w` is scratch and may alias `rew` (w[v] is
// read only to form rew[v]). A row fails at its first bad set entry, in this order.
template <typename M, typename A>
OPDCORE_HD Status::Code rewards(int64_t K, const A* slp, const A* tlp, const bool* valid, WeightMode mode, A clip,
                                A* w, A* rew, A* loss) {
  for (int64_t v = 0; v < K; ++v) {
    if (!valid[v]) continue;
    if (!(slp[v] > M::template neg_inf<A>()) || M::is_inf(slp[v])) return Status::kBadStudentLogprob;
    const bool teacher_ok = M::is_finite(tlp[v]) || (clip > 0 && tlp[v] == M::template neg_inf<A>());
    if (!teacher_ok) return Status::kBadTeacherLogprob;
  }
  weights<M>(K, slp, tlp, valid, mode, w);
  A total = 0;
  for (int64_t v = 0; v < K; ++v) {
    if (!valid[v]) { rew[v] = 0; continue; }
    A l = slp[v] - tlp[v];
    if (clip > 0) l = M::min(M::max(l, -clip), clip);
    rew[v] = -w[v] * l;
    total -= rew[v] * slp[v];
  }
  *loss = total;
  return Status::kOk;
}

// KL(pbar || qbar) of one row from its K set logits z (scaled by inv_t) and the teacher's log-probs, both
// renormalised over the valid entries; writes pbar and log(pbar / qbar) for the backward (0 outside the set).
template <typename M, typename A>
OPDCORE_HD Status::Code renorm_kl(int64_t K, const A* z, const A* tq, const bool* ok, A inv_t, A* pb, A* lr, A* loss) {
  A zmax = M::template neg_inf<A>(), qmax = M::template neg_inf<A>();
  bool bad_t = false, bad_s = false;
  for (int64_t v = 0; v < K; ++v) {
    if (!ok[v]) continue;
    bad_t |= !M::is_finite(tq[v]);
    bad_s |= M::is_nan(z[v]) || z[v] == -M::template neg_inf<A>();
    zmax = M::max(zmax, z[v] * inv_t);
    qmax = M::max(qmax, tq[v]);
  }
  if (bad_t) return Status::kBadTeacherLogprob;
  if (bad_s) return Status::kNonFinite;
  A zs = 0, qs = 0;
  for (int64_t v = 0; v < K; ++v)
    if (ok[v]) { zs += M::exp(z[v] * inv_t - zmax); qs += M::exp(tq[v] - qmax); }
  const A zl = zmax + M::log(zs), ql = qmax + M::log(qs);
  A kl = 0;
  for (int64_t v = 0; v < K; ++v) {
    if (!ok[v] || zmax == M::template neg_inf<A>()) { pb[v] = 0; lr[v] = 0; continue; }
    const A lp = z[v] * inv_t - zl;
    pb[v] = M::exp(lp);
    lr[v] = pb[v] > 0 ? lp - (tq[v] - ql) : A(0);  // a zero-probability entry contributes nothing
    kl += pb[v] * lr[v];
  }
  *loss = kl;
  return Status::kOk;
}

// d KL / d z(v) of renorm_kl, given g = d loss / d KL already divided by the temperature.
template <typename A>
OPDCORE_HD A renorm_kl_grad(A g, A pbar, A log_ratio, A kl) {
  return g * pbar * (log_ratio - kl);
}

}  // namespace row_math
}  // namespace opdcore
