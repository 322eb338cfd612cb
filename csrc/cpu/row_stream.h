// Per-row streaming primitives shared by the CPU kernels (top-k extraction and the OPD loss).
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>

#include "opdcore/common.h"
#include "opdcore/topk_stream.h"

namespace opdcore {
namespace cpu {

constexpr int64_t kBlock = 1024;  // columns converted to the accumulator type at a time (stays in L1)

template <typename A> inline A neg_inf() { return -std::numeric_limits<A>::infinity(); }

// Heap order: a is better than b when its value is larger, or equal with a lower id.
template <typename A>
inline bool better(A va, int64_t ia, A vb, int64_t ib) { return va > vb || (va == vb && ia < ib); }

// Min-heap on `better` (root = worst kept candidate): replace the root and restore the heap.
template <typename A>
inline void heap_replace_root(A* hv, int64_t* hi, int64_t k, A v, int64_t id) {
  int64_t i = 0;
  for (;;) {
    int64_t c = 2 * i + 1;
    if (c >= k) break;
    if (c + 1 < k && better(hv[c], hi[c], hv[c + 1], hi[c + 1])) ++c;  // the worse child
    if (!better(v, id, hv[c], hi[c])) break;
    hv[i] = hv[c];
    hi[i] = hi[c];
    i = c;
  }
  hv[i] = v;
  hi[i] = id;
}

template <typename A>
inline void heap_offer(A* hv, int64_t* hi, int64_t k, A v, int64_t id) {
  if (better(v, id, hv[0], hi[0])) heap_replace_root(hv, hi, k, v, id);
}

// Mutable view of one row's state.
template <typename A>
struct RowRef {
  A* max; A* s; A* t;
  A* hv; int64_t* hi; int64_t k;
  const int64_t* tid; A* tv; int64_t m;
};

template <typename A>
inline RowRef<A> row_ref(const StreamState<A>& st, int64_t r) {
  return {st.max + r, st.sumexp + r, st.ent + r,
          st.k ? st.heap_vals + r * st.k : nullptr, st.k ? st.heap_ids + r * st.k : nullptr, st.k,
          st.m ? st.target_ids + r * st.m : nullptr, st.m ? st.target_vals + r * st.m : nullptr, st.m};
}

template <typename A>
inline void row_init(const RowRef<A>& r) {
  *r.max = neg_inf<A>();
  *r.s = 0;
  *r.t = 0;
  for (int64_t j = 0; j < r.k; ++j) { r.hv[j] = neg_inf<A>(); r.hi[j] = kEmptyId; }
  for (int64_t j = 0; j < r.m; ++j) r.tv[j] = std::numeric_limits<A>::quiet_NaN();
}

// Rescale (s, t) from reference max m_old to m_new >= m_old.
template <typename A>
inline void rescale(A m_old, A m_new, A* s, A* t) {
  if (m_old == neg_inf<A>()) { *s = 0; *t = 0; return; }
  const A d = m_old - m_new, f = exp_nonpos(d);
  *t = f * (*t + d * *s);
  *s = f * *s;
}

// Feed one row segment of n logits (stride cs) holding ids [off, off+n). Returns false on NaN/+inf.
// buf: kBlock scratch values. track_entropy=false skips the entropy sum (loss kernels).
template <typename T, typename A, bool kEntropy = true>
inline bool row_update(const RowRef<A>& r, const T* x, int64_t n, int64_t cs, int64_t off, A inv_t, A* buf) {
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t nb = std::min(kBlock, n - b0);
    const T* xb = x + b0 * cs;
    if (cs == 1) {
#pragma omp simd
      for (int64_t j = 0; j < nb; ++j) buf[j] = A(to_float(xb[j])) * inv_t;
    } else {
      for (int64_t j = 0; j < nb; ++j) buf[j] = A(to_float(xb[j * cs])) * inv_t;
    }
    A bmax = neg_inf<A>();
    int bad = 0, candidates = 0;
    const A pinf = std::numeric_limits<A>::infinity();
    const A thr0 = r.k > 0 ? r.hv[0] : pinf;  // heap threshold before this block
#pragma omp simd reduction(max : bmax) reduction(| : bad) reduction(+ : candidates)
    for (int64_t j = 0; j < nb; ++j) {
      const A y = buf[j];
      bmax = y > bmax ? y : bmax;
      bad |= int(!(y == y)) | int(y == pinf);
      candidates += int(y >= thr0);
    }
    if (bad) return false;
    if (bmax > *r.max) {
      rescale(*r.max, bmax, r.s, r.t);
      *r.max = bmax;
    }
    const A mx = *r.max;
    if (mx != neg_inf<A>()) {
      A s = 0, t = 0;
      if (kEntropy) {
#pragma omp simd reduction(+ : s, t)
        for (int64_t j = 0; j < nb; ++j) {
          const A d = buf[j] - mx;
          const A e = exp_nonpos(d);
          s += e;
          t += e * (d > neg_inf<A>() ? d : A(0));
        }
      } else {
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < nb; ++j) s += exp_nonpos(buf[j] - mx);
      }
      *r.s += s;
      *r.t += t;
    }
    const int64_t base = off + b0;
    if (candidates > 0) {  // most blocks of a long row hold nothing that can enter the heap
      // Threshold rejection: a group of 16 values is looked at one by one only if one may enter the heap.
      int64_t j = 0;
      for (; j + 16 <= nb; j += 16) {
        const A thr = r.hv[0];
        int any = 0;
#pragma omp simd reduction(| : any)
        for (int64_t q = 0; q < 16; ++q) any |= int(buf[j + q] >= thr);
        if (!any) continue;
        for (int64_t q = j; q < j + 16; ++q) heap_offer(r.hv, r.hi, r.k, buf[q], base + q);
      }
      for (; j < nb; ++j) heap_offer(r.hv, r.hi, r.k, buf[j], base + j);
    }
    for (int64_t q = 0; q < r.m; ++q) {
      const int64_t id = r.tid[q] - base;
      if (id >= 0 && id < nb) r.tv[q] = buf[id];
    }
  }
  return true;
}

// Record the first failing row across OpenMP threads.
inline void record_failure(Status* st, Status::Code code, int64_t row) {
#pragma omp critical(opdcore_status)
  {
    if (st->code == Status::kOk || row < st->row) { st->code = code; st->row = row; }
  }
}

}  // namespace cpu
}  // namespace opdcore
