// CUDA dense divergences (forward KL, reverse KL, generalised JSD) between student and teacher logits: the twin
// of csrc/cpu/dense_div.cpp. Forward: one 256-thread block per row, an online (max, sum exp, weighted sum) per
// side and thread, merged by warp shuffles and across warps; the JSD takes a second pass once both normalisers
// are known. Backward: (row, column block) tiles. Both read 16-byte vectors of the two rows where they share an
// alignment offset (for_each_pair), coalesced scalars otherwise.
#include "launch.cuh"
#include "opdcore/dense_div.h"

namespace opdcore {
namespace cuda {
namespace dev {

// Called by every thread of the block: true (the row's status recorded, student first like the CPU) when some
// thread saw a NaN / +inf student or teacher logit.
__device__ __forceinline__ bool reject_non_finite(bool bad_s, bool bad_t, unsigned long long* status, int64_t r) {
  if (__syncthreads_or(bad_s)) {
    if (threadIdx.x == 0) record_status(status, Status::kNonFinite, r);
    return true;
  }
  if (__syncthreads_or(bad_t)) {
    if (threadIdx.x == 0) record_status(status, Status::kTeacherNonFinite, r);
    return true;
  }
  return false;
}

__device__ __forceinline__ float acc_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double acc_log1p(double x) { return log1p(x); }

// (max, sum exp(y - max), sum exp(y - max) * w) of one side.
template <typename A>
struct Online {
  A m, s, w;
  __device__ Online() : m(neg_inf<A>()), s(0), w(0) {}
  __device__ void raise_max(A v) {
    if (v <= m) return;
    if (m == neg_inf<A>()) { s = 0; w = 0; }
    else { const A f = fast_exp(m - v); s *= f; w *= f; }
    m = v;
  }
  __device__ void add(A y, A other, bool with_w) {  // y = -inf adds nothing
    raise_max(y);
    if (m == neg_inf<A>()) return;
    const A e = fast_exp(y - m);
    s += e;
    if (with_w && e > 0) w += e * (y - other);
  }
  __device__ void merge(A m2, A s2, A w2) {
    const A mx = amax(m, m2);
    if (mx == neg_inf<A>()) return;
    const A f1 = m == neg_inf<A>() ? A(0) : fast_exp(m - mx), f2 = m2 == neg_inf<A>() ? A(0) : fast_exp(m2 - mx);
    s = s * f1 + s2 * f2;
    w = w * f1 + w2 * f2;
    m = mx;
  }
  __device__ void warp_merge() {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const A m2 = __shfl_xor_sync(kFullMask, m, o), s2 = __shfl_xor_sync(kFullMask, s, o),
              w2 = __shfl_xor_sync(kFullMask, w, o);
      merge(m2, s2, w2);
    }
  }
};

template <typename A>
__device__ __forceinline__ A log_mix(A lp, A lq, A log_a, A log_b) {
  const A a = lp + log_a, b = lq + log_b, hi = amax(a, b);
  if (hi == neg_inf<A>()) return hi;
  return hi + acc_log1p(acc_exp(amin(a - b, b - a)));  // log1p(exp(-|a - b|))
}

// f(s value, t value, column) for every column of [c0, c1) this thread owns: 16-byte vector loads of both rows
// when they share their offset from a 16-byte boundary (a scalar head reaches it, a scalar tail ends), else
// coalesced scalar loads.
template <typename T, typename A, typename F>
__device__ __forceinline__ void for_each_pair(const T* s, const T* t, int64_t c0, int64_t c1, F f) {
  constexpr int W = Vec<T>::W;
  using U = typename std::conditional<sizeof(T) == 2, float, A>::type;
  const int tid = threadIdx.x;
  const uintptr_t as = reinterpret_cast<uintptr_t>(s + c0), at = reinterpret_cast<uintptr_t>(t + c0);
  if ((as & 15) != (at & 15)) {
    for (int64_t j = c0 + tid; j < c1; j += kThreads) f(A(to_acc(s[j])), A(to_acc(t[j])), j);
    return;
  }
  const int64_t len = c1 - c0, head = min(len, int64_t(((16 - (as & 15)) & 15) / sizeof(T)));
  const int64_t nvec = (len - head) / W, vbase = c0 + head;
  const uint4* sv = reinterpret_cast<const uint4*>(s + vbase);
  const uint4* tv = reinterpret_cast<const uint4*>(t + vbase);
  for (int64_t vi = tid; vi < nvec; vi += kThreads) {
    U ys[W], yt[W];
    Vec<T>::unpack(sv[vi], ys);
    Vec<T>::unpack(tv[vi], yt);
#pragma unroll
    for (int i = 0; i < W; ++i) f(A(ys[i]), A(yt[i]), vbase + vi * W + i);
  }
  if (tid < head) f(A(to_acc(s[c0 + tid])), A(to_acc(t[c0 + tid])), c0 + tid);
  for (int64_t j = vbase + nvec * W + tid; j < c1; j += kThreads) f(A(to_acc(s[j])), A(to_acc(t[j])), j);
}

template <typename A>
struct DenseArgs {
  int64_t V, s_rs, t_rs;
  Divergence kind;
  A inv_t, beta, log_a, log_b;
};

// (loss, aux) from this row's columns once the normalisers ls, lt are known: the JSD's second pass, and the
// whole work of a shard given the global normalisers. Block-collective; thread 0 writes. Returns false (after
// recording the status) on a NaN / +inf logit, which only the given-normaliser case can still meet.
template <typename T, typename A>
__device__ void known_lse_sums(const T* sr, const T* tr, const DenseArgs<A>& a, int64_t r, A ls, A lt, A* loss,
                               A* lse_s, A* lse_t, A* aux, A (*red)[kWarps], unsigned long long* status) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const A pinf = pos_inf<A>();
  A kl_pm = 0, kl_qm = 0;  // KL(p||m), KL(q||m); for the KLs: KL(p||q) in kl_pm, KL(q||p) in kl_qm
  bool bad_s = false, bad_t = false;
  for_each_pair<T, A>(sr, tr, 0, a.V, [&](A xs, A xt, int64_t) {
    const A ys = scale(xs, a.inv_t), yt = scale(xt, a.inv_t);
    bad_s |= !(ys < pinf);
    bad_t |= !(yt < pinf);
    const A lp = ys - ls, lq = yt - lt;
    const A p = fast_exp(amin(lp, A(0))), q = fast_exp(amin(lq, A(0)));
    if (a.kind == Divergence::kJSD) {
      const A lm = log_mix(lp, lq, a.log_a, a.log_b);
      if (p > 0) kl_pm += p * (lp - lm);
      if (q > 0) kl_qm += q * (lq - lm);
    } else {
      if (p > 0) kl_pm += p * (lp - lq);
      if (q > 0) kl_qm += q * (lq - lp);
    }
  });
  if (reject_non_finite(bad_s, bad_t, status, r)) return;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    kl_pm += __shfl_xor_sync(kFullMask, kl_pm, o);
    kl_qm += __shfl_xor_sync(kFullMask, kl_qm, o);
  }
  if (lane == 0) { red[0][warp] = kl_pm; red[1][warp] = kl_qm; }
  __syncthreads();
  if (tid == 0) {
    A pm = 0, qm = 0;
    for (int w = 0; w < kWarps; ++w) { pm += red[0][w]; qm += red[1][w]; }
    lse_s[r] = ls;
    lse_t[r] = lt;
    if (a.kind == Divergence::kJSD) { loss[r] = a.beta * qm + (1 - a.beta) * pm; aux[r] = pm; }
    else if (a.kind == Divergence::kReverseKL) { loss[r] = aux[r] = pm; }
    else { loss[r] = qm; aux[r] = 0; }
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    dense_fwd_kernel(const T* __restrict__ s, const T* __restrict__ t, const DenseArgs<A> a, A* __restrict__ loss,
                     A* __restrict__ lse_s, A* __restrict__ lse_t, A* __restrict__ aux,
                     const A* __restrict__ given_ls, const A* __restrict__ given_lt, unsigned long long* status) {
  __shared__ A red[6][kWarps];
  __shared__ A row[6];
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* sr = s + r * a.s_rs;
  const T* tr = t + r * a.t_rs;
  if (given_ls) {  // the normalisers are known: one pass for this tensor's share of the sums
    known_lse_sums<T, A>(sr, tr, a, r, given_ls[r], given_lt[r], loss, lse_s, lse_t, aux, red, status);
    return;
  }
  const A pinf = pos_inf<A>();
  Online<A> ps, pt;
  bool bad_s = false, bad_t = false;
  for_each_pair<T, A>(sr, tr, 0, a.V, [&](A xs, A xt, int64_t) {
    const A ys = scale(xs, a.inv_t), yt = scale(xt, a.inv_t);
    bad_s |= !(ys < pinf);
    bad_t |= !(yt < pinf);
    ps.add(ys, yt, a.kind == Divergence::kReverseKL);
    pt.add(yt, ys, a.kind == Divergence::kForwardKL);
  });
  if (reject_non_finite(bad_s, bad_t, status, r)) return;
  ps.warp_merge();
  pt.warp_merge();
  if (lane == 0) {
    red[0][warp] = ps.m; red[1][warp] = ps.s; red[2][warp] = ps.w;
    red[3][warp] = pt.m; red[4][warp] = pt.s; red[5][warp] = pt.w;
  }
  __syncthreads();
  if (tid == 0) {
    Online<A> bs, bt;
    for (int w = 0; w < kWarps; ++w) {
      bs.merge(red[0][w], red[1][w], red[2][w]);
      bt.merge(red[3][w], red[4][w], red[5][w]);
    }
    row[0] = bs.m; row[1] = bs.s; row[2] = bs.w; row[3] = bt.m; row[4] = bt.s; row[5] = bt.w;
  }
  __syncthreads();
  if (row[0] == neg_inf<A>()) {
    if (tid == 0) record_status(status, Status::kAllNegInf, r);
    return;
  }
  if (row[3] == neg_inf<A>()) {
    if (tid == 0) record_status(status, Status::kTeacherAllNegInf, r);
    return;
  }
  const A ls = row[0] + acc_log(row[1]), lt = row[3] + acc_log(row[4]);
  if (a.kind != Divergence::kJSD) {
    if (tid == 0) {
      lse_s[r] = ls;
      lse_t[r] = lt;
      if (a.kind == Divergence::kForwardKL) {
        loss[r] = row[5] / row[4] - lt + ls;
        aux[r] = 0;
      } else {
        loss[r] = aux[r] = row[2] / row[1] - ls + lt;
      }
    }
    return;
  }
  __syncthreads();  // everyone has read row[] before known_lse_sums reuses red[]
  known_lse_sums<T, A>(sr, tr, a, r, ls, lt, loss, lse_s, lse_t, aux, red, status);  // the JSD's second pass
}

constexpr int64_t kDenseColsPerBlock = 4096;

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    dense_bwd_kernel(const T* __restrict__ s, const T* __restrict__ t, const DenseArgs<A> a, const A* __restrict__ lse_s,
                     const A* __restrict__ lse_t, const A* __restrict__ aux, const A* __restrict__ grad_loss,
                     T* __restrict__ grad, int64_t g_rs) {
  const int64_t r = blockIdx.x;
  const int64_t c0 = int64_t(blockIdx.y) * kDenseColsPerBlock, c1 = min(a.V, c0 + kDenseColsPerBlock);
  const A g = grad_loss[r] * a.inv_t, ls = lse_s[r], lt = lse_t[r], kl = aux[r];
  const T* sr = s + r * a.s_rs;
  const T* tr = t + r * a.t_rs;
  T* gr = grad + r * g_rs;
  for_each_pair<T, A>(sr, tr, c0, c1, [&](A xs, A xt, int64_t j) {
    const A lp = scale(xs, a.inv_t) - ls, lq = scale(xt, a.inv_t) - lt;
    const A p = fast_exp(amin(lp, A(0)));
    A v;
    if (a.kind == Divergence::kForwardKL) v = g * (p - fast_exp(amin(lq, A(0))));
    else if (a.kind == Divergence::kReverseKL) v = p > 0 ? g * p * (lp - lq - kl) : A(0);
    else v = p > 0 ? g * (1 - a.beta) * p * (lp - log_mix(lp, lq, a.log_a, a.log_b) - kl) : A(0);
    from_acc(v, gr + j);
  });
}

}  // namespace dev

namespace {
template <typename A>
dev::DenseArgs<A> dense_args(int64_t V, int64_t s_rs, int64_t t_rs, Divergence kind, double beta, double temperature) {
  dev::DenseArgs<A> a;
  a.V = V;
  a.s_rs = s_rs;
  a.t_rs = t_rs;
  a.kind = kind;
  a.inv_t = A(1.0 / temperature);
  a.beta = A(beta);
  a.log_a = kind == Divergence::kJSD ? A(std::log1p(-beta)) : A(0);
  a.log_b = kind == Divergence::kJSD ? A(std::log(beta)) : A(0);
  return a;
}
}  // namespace

template <typename T>
Status dense_divergence_forward(const T* s, int64_t s_rs, const T* t, int64_t t_rs, int64_t rows, int64_t V,
                                Divergence kind, double beta, double temperature, acc_t<T>* loss, acc_t<T>* lse_s,
                                acc_t<T>* lse_t, acc_t<T>* aux, const acc_t<T>* given_lse_s,
                                const acc_t<T>* given_lse_t, const Launch& L) {
  using A = acc_t<T>;
  if (rows <= 0 || V <= 0 || (given_lse_s == nullptr) != (given_lse_t == nullptr))
    return host::cuda_error(cudaErrorInvalidValue);
  cudaError_t e = host::begin(L);
  if (e != cudaSuccess) return host::cuda_error(e);
  OPDCORE_LAUNCH(static_cast<unsigned>(rows), dev::kThreads, 0, L.stream, dev::dense_fwd_kernel<T, A>)(
      s, t, dense_args<A>(V, s_rs, t_rs, kind, beta, temperature), loss, lse_s, lse_t, aux, given_lse_s, given_lse_t,
      L.status);
  return host::finish(L);
}

template <typename T>
Status dense_divergence_backward(const T* s, int64_t s_rs, const T* t, int64_t t_rs, int64_t rows, int64_t V,
                                 Divergence kind, double beta, double temperature, const acc_t<T>* lse_s,
                                 const acc_t<T>* lse_t, const acc_t<T>* aux, const acc_t<T>* grad_loss, T* grad,
                                 int64_t g_rs, const Launch& L) {
  using A = acc_t<T>;
  if (rows <= 0 || V <= 0) return Status{};
  const int64_t col_blocks = (V + dev::kDenseColsPerBlock - 1) / dev::kDenseColsPerBlock;
  if (col_blocks > 65535) return host::cuda_error(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(col_blocks));
  OPDCORE_LAUNCH(grid, dev::kThreads, 0, L.stream, dev::dense_bwd_kernel<T, A>)(
      s, t, dense_args<A>(V, s_rs, t_rs, kind, beta, temperature), lse_s, lse_t, aux, grad_loss, grad, g_rs);
  return host::finish(L, /*read_status=*/false);
}

#define OPDCORE_CUDA_DENSE(T)                                                                                    \
  template Status dense_divergence_forward<T>(const T*, int64_t, const T*, int64_t, int64_t, int64_t, Divergence,  \
                                              double, double, acc_t<T>*, acc_t<T>*, acc_t<T>*, acc_t<T>*,         \
                                              const acc_t<T>*, const acc_t<T>*, const Launch&);                   \
  template Status dense_divergence_backward<T>(const T*, int64_t, const T*, int64_t, int64_t, int64_t, Divergence, \
                                               double, double, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*,  \
                                               const acc_t<T>*, T*, int64_t, const Launch&);
OPDCORE_CUDA_DENSE(float)
OPDCORE_CUDA_DENSE(double)
OPDCORE_CUDA_DENSE(bfloat16)
OPDCORE_CUDA_DENSE(float16)

}  // namespace cuda
}  // namespace opdcore
