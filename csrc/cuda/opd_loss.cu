// CUDA sparse top-k OPD loss: rewards, forward (streaming log-sum-exp + set log-probs), backward (one pass over
// the vocabulary writing d loss / d logits), and renorm_kl.
#include "launch.cuh"

namespace opdcore {
namespace cuda {
namespace dev {

// One thread per row: the reward math is O(K) and K is small.
template <typename A>
__global__ void __launch_bounds__(kThreads) rewards_kernel(int64_t rows, int64_t K, const A* __restrict__ slp,
                                                            const A* __restrict__ tlp, const bool* __restrict__ valid,
                                                            WeightMode mode, A clip, A* __restrict__ rewards,
                                                            A* __restrict__ loss, unsigned long long* status) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    const Status::Code code =
        row_rewards<A>(K, slp + r * K, tlp + r * K, valid + r * K, mode, clip, rewards + r * K, loss + r);
    if (code != Status::kOk) record_status(status, code, r);
  }
}

template <typename A>
struct BwdArgs {
  int64_t n, row_stride, col_stride, vocab_offset;
  A inv_t;
  const A* lse;
  const int64_t* ids;
  const A* rewards;
  int64_t K;
  const A* grad_loss;
  int64_t grad_row_stride;
  int64_t cols_per_block;  // <= kBwdMaxCols
};

constexpr int64_t kBwdMaxCols = 65536;
constexpr int kBwdBitWords = int(kBwdMaxCols / 8 / 32);  // one bit per 8 columns

// grad[r, j] = dense_r * exp(y - lse_r) - sum_{q: ids[r,q] = vocab_offset + j} g_r * rew[r,q] for the block's
// columns, rounded once to T, in the CPU's order (dense term first, then the set terms in q order).
// Elements are read and written by the same thread, so grad may alias logits (no restrict, no read-only loads).
// A shared bitmap (one bit per 8 columns) marks where set ids fall; only marked vectors search the K ids.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) loss_backward_kernel(const T* logits, T* grad, const BwdArgs<A> b) {
  constexpr int W = Vec<T>::W;
  constexpr int U = 2;
  __shared__ uint32_t bits[kBwdBitWords];
  __shared__ A sh[3];
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t c0 = min(b.n, int64_t(blockIdx.y) * b.cols_per_block), c1 = min(b.n, c0 + b.cols_per_block);
  const int64_t* rid = b.ids + r * b.K;
  const A* rew = b.rewards + r * b.K;
  for (int i = tid; i < kBwdBitWords; i += kThreads) bits[i] = 0;
  if (tid == 0) {
    A total = 0;
    for (int64_t q = 0; q < b.K; ++q) total += rew[q];
    const A g = b.grad_loss[r] * b.inv_t;
    sh[0] = g;
    sh[1] = g * total;
    sh[2] = b.lse[r];
  }
  __syncthreads();
  for (int64_t q = tid; q < b.K; q += kThreads) {
    const int64_t j = rid[q] - b.vocab_offset;
    if (j >= c0 && j < c1) {
      const int64_t bit = (j - c0) >> 3;
      atomicOr(&bits[bit >> 5], 1u << (bit & 31));
    }
  }
  __syncthreads();
  const A g = sh[0], dense = sh[1], l = sh[2];
  auto marked = [&](int64_t j) {  // j in [c0, c1)
    const int64_t bit = (j - c0) >> 3;
    return (bits[bit >> 5] >> (bit & 31)) & 1u;
  };
  auto value = [&](A x, int64_t j, bool check) -> A {
    A v = dense * fast_exp(scale(x, b.inv_t) - l);
    if (check) {
      const int64_t id = b.vocab_offset + j;
      for (int64_t q = 0; q < b.K; ++q)
        if (rid[q] == id) v -= g * rew[q];
    }
    return v;
  };
  const T* x = logits + r * b.row_stride;
  T* gr = grad + r * b.grad_row_stride;
  const int64_t len = c1 - c0;
  const uintptr_t ax = reinterpret_cast<uintptr_t>(x + c0), ag = reinterpret_cast<uintptr_t>(gr + c0);
  if (b.col_stride == 1 && ax % sizeof(T) == 0 && (ax & 15) == (ag & 15)) {
    const int64_t head = min(len, int64_t(((16 - (ax & 15)) & 15) / sizeof(T)));
    const int64_t nvec = (len - head) / W, vbase = c0 + head;
    const uint4* xv = reinterpret_cast<const uint4*>(x + vbase);
    uint4* gv = reinterpret_cast<uint4*>(gr + vbase);
    for (int64_t it = 0; it < nvec; it += int64_t(kThreads) * U) {
      uint4 raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t vi = it + u * kThreads + tid;
        raw[u] = vi < nvec ? xv[vi] : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t vi = it + u * kThreads + tid;
        if (vi >= nvec) continue;
        const int64_t j0 = vbase + vi * W;
        const bool check = marked(j0) || marked(j0 + W - 1);  // W <= 8: the vector touches at most 2 bits
        typename std::conditional<sizeof(T) == 2, float, A>::type v[W];
        Vec<T>::unpack(raw[u], v);
#pragma unroll
        for (int i = 0; i < W; ++i) v[i] = value(A(v[i]), j0 + i, check);
        gv[vi] = Vec<T>::pack(v);
      }
    }
    if (tid < head) from_acc(value(A(to_acc(x[c0 + tid])), c0 + tid, marked(c0 + tid)), gr + c0 + tid);
    for (int64_t j = vbase + nvec * W + tid; j < c1; j += kThreads) from_acc(value(A(to_acc(x[j])), j, marked(j)), gr + j);
  } else {
    for (int64_t j = c0 + tid; j < c1; j += kThreads)
      from_acc(value(A(to_acc(x[j * b.col_stride])), j, marked(j)), gr + j);
  }
}

// One thread per row (opdcore/row_math.h, as the CPU renorm_kl_forward).
template <typename A>
__global__ void __launch_bounds__(kThreads) renorm_kl_fwd_kernel(int64_t rows, int64_t K, const A* __restrict__ set_logits,
                                                                  const A* __restrict__ teacher_lp,
                                                                  const bool* __restrict__ valid, A inv_t,
                                                                  A* __restrict__ loss, A* __restrict__ pbar,
                                                                  A* __restrict__ log_ratio, unsigned long long* status) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    const Status::Code code = row_math::renorm_kl<DevMath>(K, set_logits + r * K, teacher_lp + r * K, valid + r * K,
                                                           inv_t, pbar + r * K, log_ratio + r * K, loss + r);
    if (code != Status::kOk) record_status(status, code, r);
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads) renorm_kl_bwd_kernel(int64_t rows, int64_t K, const A* __restrict__ pbar,
                                                                  const A* __restrict__ log_ratio,
                                                                  const A* __restrict__ loss,
                                                                  const A* __restrict__ grad_loss, A inv_t,
                                                                  A* __restrict__ grad) {
  const int64_t total = rows * K;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / K;
    const A g = grad_loss[r] * inv_t;
    grad[i] = row_math::renorm_kl_grad(g, pbar[i], log_ratio[i], loss[r]);
  }
}

}  // namespace dev

namespace {
// Grid for a grid-stride loop over `work` items.
unsigned grid_for(int64_t work, const Launch& L) {
  const int64_t blocks = (work + dev::kThreads - 1) / dev::kThreads, cap = int64_t(host::sms(L)) * 32;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}
}  // namespace

template <typename A>
Status opd_rewards(int64_t rows, int64_t K, const A* student_lp, const A* teacher_lp, const bool* valid,
                   WeightMode mode, double clip, A* rewards, A* loss, const Launch& L) {
  if (rows <= 0) return Status{};
  cudaError_t e = host::begin(L);
  if (e != cudaSuccess) return host::cuda_error(e);
  OPDCORE_LAUNCH(grid_for(rows, L), dev::kThreads, 0, L.stream, dev::rewards_kernel<A>)(
      rows, K, student_lp, teacher_lp, valid, mode, A(clip), rewards, loss, L.status);
  return host::finish(L);
}

template <typename T>
Status opd_topk_loss_forward(const T* logits, int64_t rows, int64_t V, int64_t row_stride, int64_t col_stride,
                             double temperature, const int64_t* ids, const acc_t<T>* teacher_lp, const bool* valid,
                             int64_t K, WeightMode mode, double clip, acc_t<T>* loss, acc_t<T>* rewards,
                             acc_t<T>* student_lp, acc_t<T>* lse, const Launch& L) {
  using A = acc_t<T>;
  if (rows <= 0 || V > kMaxColumns) return host::cuda_error(cudaErrorInvalidValue);
  cudaError_t e = host::begin(L);
  if (e != cudaSuccess) return host::cuda_error(e);
  dev::FinalArgs<A> fin;
  fin.out.lse = lse;
  fin.out.target_logprobs = student_lp;
  fin.teacher_lp = teacher_lp;
  fin.valid = valid;
  fin.mode = mode;
  fin.clip = A(clip);
  fin.rewards = rewards;
  fin.loss = loss;
  dev::RowArgs<A> a;
  a.n = V;
  a.row_stride = row_stride;
  a.col_stride = col_stride;
  a.inv_t = A(1.0 / temperature);
  a.m = K;
  a.target_ids = ids;
  a.check_ids = true;
  a.splits = host::row_splits(rows, V, host::sms(L));
  a.cols_per_split = host::cols_per_split(V, a.splits);
  a.status = L.status;
  a.fin = fin;
  if (a.splits == 1) {
    host::launch_rows<T, false>(logits, rows, a, false, L.stream);
  } else {
    if (L.workspace_bytes < host::partial_bytes<A>(rows * a.splits, 0, K)) return host::cuda_error(cudaErrorInvalidValue);
    a.partial = true;
    a.part = host::carve_partial<A>(L.workspace, rows * a.splits, 0, K);
    host::launch_rows<T, false>(logits, rows, a, false, L.stream);
    host::combine_parts_final(rows, 0, K, a.splits, a.part, fin, L.status, L.stream);
  }
  return host::finish(L);
}

template <typename T>
Status opd_topk_loss_backward(const T* logits, int64_t rows, int64_t n, int64_t row_stride, int64_t col_stride,
                              int64_t vocab_offset, double temperature, const acc_t<T>* lse, const int64_t* ids,
                              const acc_t<T>* rewards, int64_t K, const acc_t<T>* grad_loss, T* grad,
                              int64_t grad_row_stride, const Launch& L) {
  using A = acc_t<T>;
  if (rows <= 0 || n <= 0) return Status{};
  dev::BwdArgs<A> b;
  b.n = n;
  b.row_stride = row_stride;
  b.col_stride = col_stride;
  b.vocab_offset = vocab_offset;
  b.inv_t = A(1.0 / temperature);
  b.lse = lse;
  b.ids = ids;
  b.rewards = rewards;
  b.K = K;
  b.grad_loss = grad_loss;
  b.grad_row_stride = grad_row_stride;
  // Column blocks: at most kBwdMaxCols each (the bitmap), more when there are too few rows to fill the device.
  int64_t s = (n + dev::kBwdMaxCols - 1) / dev::kBwdMaxCols;
  const int64_t want = (8LL * host::sms(L) + rows - 1) / rows, most = (n + 2047) / 2048;
  const int64_t extra = want < most ? want : most;
  if (extra > s) s = extra;
  b.cols_per_block = ((n + s - 1) / s + 63) / 64 * 64;
  const int64_t blocks_y = (n + b.cols_per_block - 1) / b.cols_per_block;
  if (blocks_y > 65535) return host::cuda_error(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(blocks_y));
  OPDCORE_LAUNCH(grid, dev::kThreads, 0, L.stream, dev::loss_backward_kernel<T, A>)(logits, grad, b);
  return host::finish(L, /*read_status=*/false);
}

template <typename A>
Status renorm_kl_forward(int64_t rows, int64_t K, const A* set_logits, const A* teacher_lp, const bool* valid,
                         double temperature, A* loss, A* pbar, A* log_ratio, const Launch& L) {
  if (rows <= 0) return Status{};
  cudaError_t e = host::begin(L);
  if (e != cudaSuccess) return host::cuda_error(e);
  OPDCORE_LAUNCH(grid_for(rows, L), dev::kThreads, 0, L.stream, dev::renorm_kl_fwd_kernel<A>)(
      rows, K, set_logits, teacher_lp, valid, A(1.0 / temperature), loss, pbar, log_ratio, L.status);
  return host::finish(L);
}

template <typename A>
Status renorm_kl_backward(int64_t rows, int64_t K, const A* pbar, const A* log_ratio, const A* loss,
                          const A* grad_loss, double temperature, A* grad_set_logits, const Launch& L) {
  if (rows <= 0 || K <= 0) return Status{};
  OPDCORE_LAUNCH(grid_for(rows * K, L), dev::kThreads, 0, L.stream, dev::renorm_kl_bwd_kernel<A>)(
      rows, K, pbar, log_ratio, loss, grad_loss, A(1.0 / temperature), grad_set_logits);
  return host::finish(L, /*read_status=*/false);
}

#define OPDCORE_CUDA_LOSS_ACC(A)                                                                                 \
  template Status opd_rewards<A>(int64_t, int64_t, const A*, const A*, const bool*, WeightMode, double, A*, A*, \
                                 const Launch&);                                                                \
  template Status renorm_kl_forward<A>(int64_t, int64_t, const A*, const A*, const bool*, double, A*, A*, A*,   \
                                       const Launch&);                                                          \
  template Status renorm_kl_backward<A>(int64_t, int64_t, const A*, const A*, const A*, const A*, double, A*,  \
                                        const Launch&);
OPDCORE_CUDA_LOSS_ACC(float)
OPDCORE_CUDA_LOSS_ACC(double)

#define OPDCORE_CUDA_LOSS_T(T)                                                                                   \
  template Status opd_topk_loss_forward<T>(const T*, int64_t, int64_t, int64_t, int64_t, double, const int64_t*, \
                                           const acc_t<T>*, const bool*, int64_t, WeightMode, double, acc_t<T>*, \
                                           acc_t<T>*, acc_t<T>*, acc_t<T>*, const Launch&);                      \
  template Status opd_topk_loss_backward<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, double,       \
                                            const acc_t<T>*, const int64_t*, const acc_t<T>*, int64_t,           \
                                            const acc_t<T>*, T*, int64_t, const Launch&);
OPDCORE_CUDA_LOSS_T(float)
OPDCORE_CUDA_LOSS_T(double)
OPDCORE_CUDA_LOSS_T(bfloat16)
OPDCORE_CUDA_LOSS_T(float16)

}  // namespace cuda
}  // namespace opdcore
