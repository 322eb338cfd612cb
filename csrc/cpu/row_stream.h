// Per-row streaming primitives shared by the CPU kernels (top-k extraction and the OPD loss).
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "opdcore/common.h"
#include "opdcore/topk_stream.h"
#include "row_simd.h"

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

// Raise the row's running max to bmax if it is larger (the sums are rescaled to it).
template <typename A>
inline void raise_max(const RowRef<A>& r, A bmax) {
  if (bmax > *r.max) {
    rescale(*r.max, bmax, r.s, r.t);
    *r.max = bmax;
  }
}

// Offer the values of buf[0, n) that reach the heap's threshold (ids base + j), after filling the heap's empty
// slots. Values are looked at 16 at a time: a group is scanned only if one of its values may enter, and then its
// candidates are collected without branches before the (rare) heap insertions.
template <typename A>
inline void offer_block(const RowRef<A>& r, const A* buf, int64_t n, int64_t base) {
  int64_t j = 0;
  while (j < n && r.hi[0] == kEmptyId) { heap_offer(r.hv, r.hi, r.k, buf[j], base + j); ++j; }  // fill the heap
  int32_t cand[16];
  for (; j < n; j += 16) {
    const int64_t g = std::min<int64_t>(16, n - j);
    const A thr = r.hv[0];
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t q = 0; q < g; ++q) any |= int(buf[j + q] >= thr);
    if (!any) continue;
    int nc = 0;
    for (int64_t q = 0; q < g; ++q) { cand[nc] = int32_t(q); nc += int(buf[j + q] >= thr); }
    for (int c = 0; c < nc; ++c) heap_offer(r.hv, r.hi, r.k, buf[j + cand[c]], base + j + cand[c]);
  }
}

// Record the requested ids' values found in buf (ids base + j).
template <typename A>
inline void lookup_targets(const RowRef<A>& r, const A* buf, int64_t nb, int64_t base) {
  for (int64_t q = 0; q < r.m; ++q) {
    const int64_t id = r.tid[q] - base;
    if (id >= 0 && id < nb) r.tv[q] = buf[id];
  }
}

#ifdef OPDCORE_ROW_SIMD
// One block of row_update through row_simd.h's passes; `left` values of the row follow this block.
template <typename T, bool kEntropy>
inline bool simd_block(const RowRef<float>& r, const T* xb, int64_t nb, int64_t left, int64_t base, float inv_t,
                       float* buf) {
  float bmax, bound;
  if (!simd::convert_max(xb, nb, inv_t, buf, &bmax, &bound)) return false;
  raise_max(r, bmax);
  if (*r.max != neg_inf<float>()) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    float s, t;
    simd::sums_offer<kEntropy>(buf, nb, *r.max, r.k > 0 ? r.hv : &nan, r.k <= 16 ? bound : neg_inf<float>(),
                               reinterpret_cast<const char*>(xb + nb), std::min(kBlock, left) * int64_t(sizeof(T)),
                               &s, &t, [&](int64_t j) { heap_offer(r.hv, r.hi, r.k, buf[j], base + j); });
    *r.s += s;
    *r.t += t;
  } else if (r.k > 0) {
    offer_block(r, buf, nb, base);  // every value is -inf so far: they still fill the heap
  }
  lookup_targets(r, buf, nb, base);
  return true;
}
#endif

// Feed one row segment of n logits (stride cs) holding ids [off, off+n). Returns false on NaN/+inf.
// buf: kBlock scratch values. kEntropy=false skips the entropy sum (loss kernels).
template <typename T, typename A, bool kEntropy = true>
inline bool row_update(const RowRef<A>& r, const T* x, int64_t n, int64_t cs, int64_t off, A inv_t, A* buf) {
  const A pinf = std::numeric_limits<A>::infinity();
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t nb = std::min(kBlock, n - b0);
    const T* xb = x + b0 * cs;
    const int64_t base = off + b0;
#ifdef OPDCORE_ROW_SIMD
    if constexpr (std::is_same<A, float>::value && !std::is_same<T, double>::value) {
      if (cs == 1) {  // the AVX-512 passes
        if (!simd_block<T, kEntropy>(r, xb, nb, n - b0 - nb, base, inv_t, buf)) return false;
        continue;
      }
    }
#endif
    // Pass 1: convert to the accumulator type (scaled by 1/temperature), block max, NaN/+inf, candidates.
    A bmax = neg_inf<A>();
    int bad = 0, candidates = 0;
    const A thr0 = r.k > 0 ? r.hv[0] : pinf;  // heap threshold before this block
    if (cs == 1) {
#pragma omp simd reduction(max : bmax) reduction(| : bad) reduction(+ : candidates)
      for (int64_t j = 0; j < nb; ++j) {
        const A y = A(to_float(xb[j])) * inv_t;
        buf[j] = y;
        bmax = y > bmax ? y : bmax;
        bad |= int(!(y == y)) | int(y == pinf);
        candidates += int(y >= thr0);
      }
    } else {
      for (int64_t j = 0; j < nb; ++j) {
        const A y = A(to_float(xb[j * cs])) * inv_t;
        buf[j] = y;
        bmax = y > bmax ? y : bmax;
        bad |= int(!(y == y)) | int(y == pinf);
        candidates += int(y >= thr0);
      }
    }
    if (bad) return false;
    raise_max(r, bmax);
    // Pass 2: the softmax sums against the running max.
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
    if (candidates > 0) offer_block(r, buf, nb, base);  // most blocks of a long row hold nothing for the heap
    lookup_targets(r, buf, nb, base);
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
