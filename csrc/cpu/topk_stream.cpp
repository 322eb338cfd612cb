// CPU (OpenMP) implementation of the streaming top-k / log-sum-exp / entropy kernels.
#include "opdcore/topk_stream.h"

#include <algorithm>
#include <vector>

#include "row_stream.h"

namespace opdcore {

using cpu::neg_inf;

template <typename T>
Status stream_update(const StreamState<acc_t<T>>& st, const T* logits, int64_t n, int64_t row_stride,
                     int64_t col_stride, int64_t vocab_offset, double temperature) {
  using A = acc_t<T>;
  Status status;
  const A inv_t = A(1.0 / temperature);
#pragma omp parallel
  {
    A buf[cpu::kBlock];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < st.rows; ++r) {
      if (!cpu::row_update<T, A>(cpu::row_ref(st, r), logits + r * row_stride, n, col_stride, vocab_offset, inv_t, buf))
        cpu::record_failure(&status, Status::kNonFinite, r);
    }
  }
  return status;
}

template <typename A>
void stream_merge(const StreamState<A>& a, const StreamState<A>& b) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < a.rows; ++r) {
    const auto ra = cpu::row_ref(a, r), rb = cpu::row_ref(b, r);
    const A mx = std::max(*ra.max, *rb.max);
    if (mx != neg_inf<A>()) {
      A sb = *rb.s, tb = *rb.t;
      cpu::rescale(*ra.max, mx, ra.s, ra.t);
      cpu::rescale(*rb.max, mx, &sb, &tb);
      *ra.s += sb;
      *ra.t += tb;
      *ra.max = mx;
    }
    for (int64_t j = 0; j < a.k; ++j)
      if (rb.hi[j] != kEmptyId) cpu::heap_offer(ra.hv, ra.hi, a.k, rb.hv[j], rb.hi[j]);
    for (int64_t q = 0; q < a.m; ++q)
      if (ra.tv[q] != ra.tv[q]) ra.tv[q] = rb.tv[q];
  }
}

template <typename A>
Status stream_finalize(const StreamState<A>& st, const StreamResult<A>& out) {
  Status status;
#pragma omp parallel
  {
    std::vector<std::pair<A, int64_t>> items(st.k);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < st.rows; ++r) {
      const auto rr = cpu::row_ref(st, r);
      const A mx = *rr.max;
      if (mx == neg_inf<A>()) { cpu::record_failure(&status, Status::kAllNegInf, r); continue; }
      // log-probs as (v - max) - log s, not v - (max + log s): at large common offsets of the logits the sum
      // max + log s rounds away what the difference keeps (torch.log_softmax keeps it too)
      const A log_s = std::log(*rr.s);
      const A lse = mx + log_s;
      if (out.lse) out.lse[r] = lse;
      if (out.entropy) out.entropy[r] = std::max(A(0), log_s - *rr.t / *rr.s);
      if (st.k) {
        for (int64_t j = 0; j < st.k; ++j) items[j] = {rr.hv[j], rr.hi[j]};
        std::sort(items.begin(), items.end(),
                  [](const auto& x, const auto& y) { return cpu::better(x.first, x.second, y.first, y.second); });
        if (items[st.k - 1].second == kEmptyId) { cpu::record_failure(&status, Status::kHeapNotFull, r); continue; }
        for (int64_t j = 0; j < st.k; ++j) {
          if (out.topk_ids) out.topk_ids[r * st.k + j] = items[j].second;
          if (out.topk_logprobs) out.topk_logprobs[r * st.k + j] = (items[j].first - mx) - log_s;
        }
      }
      for (int64_t q = 0; q < st.m; ++q) {
        const A v = rr.tv[q];
        if (v != v) { cpu::record_failure(&status, Status::kTargetUnseen, r); break; }
        if (out.target_logprobs) out.target_logprobs[r * st.m + q] = (v - mx) - log_s;
      }
    }
  }
  return status;
}

template <typename T>
Status topk_logprobs(const T* logits, int64_t rows, int64_t V, int64_t row_stride, int64_t col_stride,
                     double temperature, int64_t k, const int64_t* target_ids, int64_t m,
                     const StreamResult<acc_t<T>>& out) {
  using A = acc_t<T>;
  Status status;
  const A inv_t = A(1.0 / temperature);
#pragma omp parallel
  {
    A buf[cpu::kBlock];
    std::vector<A> hv(k), tv(m);
    std::vector<int64_t> hi(k);
    std::vector<std::pair<A, int64_t>> items(k);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      A mx, s, t;
      const int64_t* tid = target_ids ? target_ids + r * m : nullptr;
      const cpu::RowRef<A> rr{&mx, &s, &t, hv.data(), hi.data(), k, tid, tv.data(), tid ? m : 0};
      bool bad_id = false;
      for (int64_t q = 0; q < rr.m; ++q) bad_id |= tid[q] < 0 || tid[q] >= V;
      if (bad_id) { cpu::record_failure(&status, Status::kBadId, r); continue; }
      cpu::row_init(rr);
      if (!cpu::row_update<T, A>(rr, logits + r * row_stride, V, col_stride, 0, inv_t, buf)) {
        cpu::record_failure(&status, Status::kNonFinite, r);
        continue;
      }
      if (mx == neg_inf<A>()) { cpu::record_failure(&status, Status::kAllNegInf, r); continue; }
      const A log_s = std::log(s), lse = mx + log_s;
      if (out.lse) out.lse[r] = lse;
      if (out.entropy) out.entropy[r] = std::max(A(0), log_s - t / s);
      for (int64_t j = 0; j < k; ++j) items[j] = {hv[j], hi[j]};
      std::sort(items.begin(), items.end(),
                [](const auto& x, const auto& y) { return cpu::better(x.first, x.second, y.first, y.second); });
      for (int64_t j = 0; j < k; ++j) {
        if (out.topk_ids) out.topk_ids[r * k + j] = items[j].second;
        if (out.topk_logprobs) out.topk_logprobs[r * k + j] = (items[j].first - mx) - log_s;
      }
      for (int64_t q = 0; q < rr.m; ++q)
        if (out.target_logprobs) out.target_logprobs[r * m + q] = (tv[q] - mx) - log_s;
    }
  }
  return status;
}

#define OPDCORE_INSTANTIATE_ACC(A)                                               \
  template void stream_merge<A>(const StreamState<A>&, const StreamState<A>&);   \
  template Status stream_finalize<A>(const StreamState<A>&, const StreamResult<A>&);
OPDCORE_INSTANTIATE_ACC(float)
OPDCORE_INSTANTIATE_ACC(double)

#define OPDCORE_INSTANTIATE_T(T)                                                                         \
  template Status stream_update<T>(const StreamState<acc_t<T>>&, const T*, int64_t, int64_t, int64_t,    \
                                   int64_t, double);                                                     \
  template Status topk_logprobs<T>(const T*, int64_t, int64_t, int64_t, int64_t, double, int64_t,        \
                                   const int64_t*, int64_t, const StreamResult<acc_t<T>>&);
OPDCORE_INSTANTIATE_T(float)
OPDCORE_INSTANTIATE_T(double)
OPDCORE_INSTANTIATE_T(bfloat16)
OPDCORE_INSTANTIATE_T(float16)

}  // namespace opdcore
