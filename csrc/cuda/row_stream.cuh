// The two streaming kernels behind topk_logprobs, logprobs_at, stream_update/merge/finalize and the OPD loss
// forward.
//
// K1 row_stream_kernel: block (row, split) streams columns [c0, c1) of one row of logits once.
//   - 16-byte vector loads when the columns are unit-stride (a scalar head/tail reaches alignment; each row
//     peels its own head, so odd V and any row stride work); a scalar path for strided columns.
//   - Per thread an online (max, sum exp, entropy term) over its elements; a warp-shuffle, then a cross-warp,
//     merge at the end.
//   - Top-k: each warp keeps a candidate buffer in shared memory: its best k so far (sorted, the k-th best is
//     the warp's threshold) followed by pending candidates. A whole vector is skipped with one vote when its
//     max is below the threshold (the common case once a few hundred columns were seen); otherwise each element
//     better than the threshold is appended (ballot + prefix popcount). A full buffer is compacted by a warp
//     bitonic sort. Warps also publish their threshold value in shared memory (any warp's k-th best value bounds
//     the row's), which tightens every warp's filter. At the end the warps' lists are merged by one block
//     bitonic sort over the k-entry heads of the 8 buffers.
//   - Output: the final per-row results (one block per row), or a partial state per (row, split) in the
//     StreamState layout, for K2.
// K2 combine_kernel: one block per row merges states (the stored state and/or K1's partials): (max, sumexp,
//   ent) sequentially, heaps through a block bitonic sort, targets first-seen; then writes the state back
//   (stream_update, stream_merge) or the final results (stream_finalize, split full-row ops).
#pragma once
#include <cuda/atomic>

#include "device_common.cuh"

namespace opdcore {
namespace cuda {
namespace dev {

// What a finished row writes (topk_logprobs, logprobs_at, stream_finalize, the loss forward).
template <typename A>
struct FinalArgs {
  StreamResult<A> out;             // any pointer may be null
  bool check_heap_full = false;    // stream_finalize: kHeapNotFull when the heap has an empty slot
  bool check_targets_seen = false; // stream_finalize: kTargetUnseen when a target value is NaN
  const A* teacher_lp = nullptr;   // loss forward: rewards from out.target_logprobs (= student log-probs)
  const bool* valid = nullptr;
  WeightMode mode = WeightMode::kStudentP;
  A clip = 0;
  A* rewards = nullptr;
  A* loss = nullptr;
};

template <typename A>
struct RowArgs {
  int64_t n = 0;             // columns of the chunk (ids vocab_offset .. vocab_offset + n - 1)
  int64_t row_stride = 0, col_stride = 1, vocab_offset = 0;
  A inv_t = 1;
  int k = 0;                 // top-k size; > 0 exactly when the kernel's CAP > 0
  int64_t m = 0;             // target ids per row
  const int64_t* target_ids = nullptr;  // [rows, m], global vocabulary ids
  bool check_ids = false;    // full-row ops: target ids must lie in [0, n) (kBadId)
  int splits = 1;            // blocks per row (gridDim.y)
  int64_t cols_per_split = 0;
  bool partial = false;      // write part (row r, split s at index r * splits + s) instead of fin
  StreamState<A> part;
  FinalArgs<A> fin;
  unsigned long long* status = nullptr;
};

// Per-thread online state.
template <typename A, bool kEntropy>
struct ThreadStream {
  A m, s, t;
  bool bad;  // saw NaN or +inf
  __device__ ThreadStream() : m(neg_inf<A>()), s(0), t(0), bad(false) {}
  template <int W>
  __device__ __forceinline__ A feed(const A (&y)[W], bool valid) {  // returns the max of y (-inf if !valid)
    A vmax = neg_inf<A>();
    if (valid) {
      vmax = y[0];
#pragma unroll
      for (int i = 0; i < W; ++i) {
        vmax = amax(vmax, y[i]);
        bad |= !(y[i] < pos_inf<A>());  // NaN or +inf, like the CPU check
      }
      if (vmax > m) {
        rescale(m, vmax, s, t);
        m = vmax;
      }
      if (m != neg_inf<A>()) {
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const A d = y[i] - m, e = fast_exp(d);
          s += e;
          // e * d with d = -inf (y = -inf, e = 0) would be NaN; the CPU adds 0 there: clamp d (0 * lowest = 0)
          if (kEntropy) t += e * amax(d, lowest<A>());
        }
      }
    }
    return vmax;
  }
};

// One warp's top-k candidate buffer: keys[0, k) the best k so far (after a compaction, sorted), then pending.
template <typename A, int CAP>
struct WarpTopK {
  using C = Cand<A>;
  using Key = typename C::Key;
  Key* keys;  // this warp's CAP slots in shared memory
  typename C::Ord* hint;  // block-wide: ord of a value that at least k of the row's elements reach
  int k, lane, cnt;  // cnt: warp-uniform fill
  Key thr;           // warp-uniform: the k-th best kept key (empty while fewer than k were kept)
  A thr_v;

  __device__ void init(Key* buf, typename C::Ord* h, int k_, int lane_) {
    keys = buf;
    hint = h;
    k = k_;
    lane = lane_;
    for (int i = lane; i < k; i += 32) keys[i] = C::empty();
    cnt = k;
    thr = C::empty();
    thr_v = neg_inf<A>();
    __syncwarp();
  }

  // Relaxed atomics: other warps raise the hint concurrently; any value ever published is a valid bound.
  __device__ A hint_value() const {
    return C::from_ord(::cuda::atomic_ref<typename C::Ord, ::cuda::thread_scope_block>(*hint).load(
        ::cuda::memory_order_relaxed));
  }

  // Sort the buffer, keep the best k (empty keys pad it), refresh the thresholds. Warp-collective.
  __device__ void compact() {
    __syncwarp();
    for (int i = cnt + lane; i < CAP; i += 32) keys[i] = C::empty();
    warp_bitonic_sort(keys, CAP, lane, [](const Key& a, const Key& b) { return C::better(a, b); });
    thr = keys[k - 1];
    thr_v = C::value(thr);
    cnt = k;
    // k kept entries reach thr_v (or thr is empty and thr_v = -inf, which bounds nothing): publish it
    if (lane == 0)
      ::cuda::atomic_ref<typename C::Ord, ::cuda::thread_scope_block>(*hint).fetch_max(C::ord(thr_v),
                                                                                      ::cuda::memory_order_relaxed);
    __syncwarp();
  }

  // Offer one element per lane (id: chunk-local column). Warp-collective: every lane calls it.
  __device__ __forceinline__ void offer(A y, uint32_t id, bool valid, A hint_v) {
    const Key key = C::make(y, id);
    // NaN fails `y >= hint_v` and never enters; y < hint_v cannot be in the row's top k
    bool pred = valid && y >= hint_v && C::better(key, thr);
    unsigned mask = __ballot_sync(kFullMask, pred);
    if (mask == 0) return;
    if (cnt + __popc(mask) > CAP) {
      compact();  // leaves cnt = k <= CAP - 32: a full ballot fits
      pred = valid && y >= hint_v && C::better(key, thr);
      mask = __ballot_sync(kFullMask, pred);
    }
    if (pred) keys[cnt + __popc(mask & ((1u << lane) - 1u))] = key;
    cnt += __popc(mask);
  }

  // W consecutive elements per lane starting at column j0. vmax: their max (-inf when !valid).
  template <int W>
  __device__ __forceinline__ void offer_vec(const A (&y)[W], uint32_t j0, bool valid, A vmax) {
    const A hv = hint_value();
    const A bound = amax(thr_v, hv);
    if (!__any_sync(kFullMask, valid && vmax >= bound)) return;
#pragma unroll
    for (int i = 0; i < W; ++i) offer(y[i], j0 + uint32_t(i), valid, hv);
  }
};

// Final results of one row. All threads call it with block-uniform arguments. top(j): the j-th best (value,
// global id) for j < k_out; target(q): the value y at the q-th target id, NaN if unseen. heap_not_full is
// already block-uniform. Returns with the row's outputs written or its status recorded.
template <typename A, typename TopFn, typename TargetFn>
__device__ void finalize_row(const FinalArgs<A>& f, int64_t r, int k_out, int64_t m, A mx, A s, A t,
                             bool heap_not_full, TopFn top, TargetFn target, unsigned long long* status) {
  const int tid = threadIdx.x;
  if (mx == neg_inf<A>()) {
    if (tid == 0) record_status(status, Status::kAllNegInf, r);
    return;
  }
  const A log_s = acc_log(s), lse = mx + log_s;  // log-probs as (v - max) - log s: exact at large offsets
  if (tid == 0) {
    if (f.out.lse) f.out.lse[r] = lse;
    if (f.out.entropy) f.out.entropy[r] = amax(A(0), log_s - t / s);
  }
  if (heap_not_full) {
    if (tid == 0) record_status(status, Status::kHeapNotFull, r);
    return;
  }
  for (int j = tid; j < k_out; j += blockDim.x) {
    const GKey<A> e = top(j);
    if (f.out.topk_ids) f.out.topk_ids[r * k_out + j] = e.id;
    if (f.out.topk_logprobs) f.out.topk_logprobs[r * k_out + j] = (e.v - mx) - log_s;
  }
  bool unseen = false;
  for (int64_t q = tid; q < m; q += blockDim.x) {
    const A y = target(q);
    unseen |= y != y;
    if (f.out.target_logprobs) f.out.target_logprobs[r * m + q] = (y - mx) - log_s;
  }
  if (f.check_targets_seen && __syncthreads_or(unseen)) {
    if (tid == 0) record_status(status, Status::kTargetUnseen, r);
    return;
  }
  if (f.teacher_lp) {
    __syncthreads();  // the student log-probs of the row (target_logprobs) are written
    if (tid == 0) {
      const Status::Code code = row_rewards<A>(m, f.out.target_logprobs + r * m, f.teacher_lp + r * m,
                                               f.valid + r * m, f.mode, f.clip, f.rewards + r * m, f.loss + r);
      if (code != Status::kOk) record_status(status, code, r);
    }
  }
}

// Occupancy floor for ptxas: 4 blocks/SM (64 registers) with top-k keeps its buffers' bookkeeping in registers
// (with no floor ptxas picked 48 and spilled on sm_80); 6 blocks/SM for the plain 16/32-bit streaming variants.
template <typename T, typename A, int CAP, bool kEntropy>
__global__ void __launch_bounds__(kThreads, (CAP > 0 || sizeof(T) == 8) ? 4 : 6)
    row_stream_kernel(const T* __restrict__ logits, const RowArgs<A> a) {
  using C = Cand<A>;
  using Key = typename C::Key;
  constexpr bool kTopK = CAP > 0;
  constexpr int W = Vec<T>::W;
  constexpr int U = 2;  // vectors in flight per thread
  __shared__ Key sbuf[kTopK ? kWarps * CAP : 1];
  __shared__ typename C::Ord hint;
  __shared__ A red[3][kWarps];
  __shared__ A row_mst[3];

  const int64_t r = blockIdx.x;
  const int sp = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t c0 = min(a.n, sp * a.cols_per_split), c1 = min(a.n, c0 + a.cols_per_split);
  const T* x = logits + r * a.row_stride;
  const int64_t* tids = a.m ? a.target_ids + r * a.m : nullptr;
  const int64_t pr = r * a.splits + sp;

  if (a.check_ids) {
    bool bad = false;
    for (int64_t q = tid; q < a.m; q += kThreads) bad |= tids[q] < 0 || tids[q] >= a.n;
    if (__syncthreads_or(bad)) {
      if (tid == 0) {
        record_status(a.status, Status::kBadId, r);
        if (a.partial) a.part.max[pr] = qnan<A>();  // poison: K2 skips the row
      }
      return;
    }
  }

  ThreadStream<A, kEntropy> ts;
  WarpTopK<A, kTopK ? CAP : 64> wt;
  if constexpr (kTopK) {
    if (tid == 0) hint = C::ord(neg_inf<A>());
    wt.init(sbuf + warp * CAP, &hint, a.k, lane);
    __syncthreads();  // hint initialised before any warp reads it
  }

  // One element per lane at chunk-local column j (warp-collective when kTopK).
  auto feed1 = [&](bool valid, int64_t j) {
    A y[1];
    y[0] = valid ? scale(A(to_acc(x[j * a.col_stride])), a.inv_t) : neg_inf<A>();
    const A vmax = ts.template feed<1>(y, valid);
    if constexpr (kTopK) wt.template offer_vec<1>(y, uint32_t(j), valid, vmax);
  };

  const int64_t len = c1 - c0;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(x + c0);
  if (a.col_stride == 1 && addr % sizeof(T) == 0) {
    const int64_t head = min(len, int64_t(((16 - (addr & 15)) & 15) / sizeof(T)));  // scalars up to 16B alignment
    const int64_t nvec = (len - head) / W, vbase = c0 + head;
    const uint4* xv = reinterpret_cast<const uint4*>(x + vbase);
    for (int64_t it = 0; it < nvec; it += int64_t(kThreads) * U) {  // block-uniform trip count
      uint4 raw[U];
      bool ok[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t vi = it + u * kThreads + tid;
        ok[u] = vi < nvec;
        raw[u] = ok[u] ? __ldcs(xv + vi) : make_uint4(0, 0, 0, 0);  // read once: streaming load
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        A y[W];
        {
          typename std::conditional<sizeof(T) == 2, float, A>::type yt[W];
          Vec<T>::unpack(raw[u], yt);
#pragma unroll
          for (int i = 0; i < W; ++i) y[i] = scale(A(yt[i]), a.inv_t);
        }
        const A vmax = ts.template feed<W>(y, ok[u]);
        if constexpr (kTopK) wt.template offer_vec<W>(y, uint32_t(vbase + (it + u * kThreads + tid) * W), ok[u], vmax);
      }
    }
    const int64_t tail0 = vbase + nvec * W, tail = c1 - tail0;  // head, tail < W <= 8 < 32
    if (warp == 0) feed1(lane < head, c0 + lane);
    if (warp == kWarps - 1) feed1(lane < tail, tail0 + lane);
  } else {
    for (int64_t base = 0; base < len; base += kThreads) feed1(base + tid < len, c0 + base + tid);
  }

  if (__syncthreads_or(ts.bad)) {
    if (tid == 0) {
      record_status(a.status, Status::kNonFinite, r);
      if (a.partial) a.part.max[pr] = qnan<A>();
    }
    return;
  }

  // Block merge of (m, s, t).
  A m = ts.m, s = ts.s, t = ts.t;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A m2 = __shfl_xor_sync(kFullMask, m, o), s2 = __shfl_xor_sync(kFullMask, s, o),
            t2 = __shfl_xor_sync(kFullMask, t, o);
    merge_mst(m, s, t, m2, s2, t2);
  }
  if (lane == 0) { red[0][warp] = m; red[1][warp] = s; red[2][warp] = t; }

  int kp = 0;
  if constexpr (kTopK) {
    wt.compact();  // each warp's best k, sorted, at keys[0, k)
    kp = next_pow2(a.k);  // <= CAP
    for (int i = a.k + lane; i < kp; i += 32) sbuf[warp * CAP + i] = C::empty();
  }
  __syncthreads();
  if (tid == 0) {
    A bm = red[0][0], bs = red[1][0], bt = red[2][0];
    for (int w = 1; w < kWarps; ++w) merge_mst(bm, bs, bt, red[0][w], red[1][w], red[2][w]);
    row_mst[0] = bm; row_mst[1] = bs; row_mst[2] = bt;
  }
  if constexpr (kTopK) {
    // Merge the warps' lists: virtual index i -> warp i / kp, slot i % kp; afterwards the row's best k are at
    // virtual 0..k-1, which are slots 0..k-1 of warp 0's buffer.
    const int shift = __ffs(kp) - 1;
    auto at = [&](int i) -> Key& { return sbuf[(i >> shift) * CAP + (i & (kp - 1))]; };
    block_bitonic_sort<Key>(at, kWarps * kp, [](const Key& p, const Key& q) { return C::better(p, q); });
  } else {
    __syncthreads();
  }
  const A row_m = row_mst[0], row_s = row_mst[1], row_t = row_mst[2];

  // Global id of the j-th best candidate (empty slots keep kEmptyId).
  auto top = [&](int j) -> GKey<A> {
    const Key key = sbuf[j];
    const uint32_t id = C::id(key);
    return GKey<A>{C::value(key), id == kEmptyLocal ? kEmptyId : a.vocab_offset + int64_t(id)};
  };
  if (a.partial) {
    if (tid == 0) { a.part.max[pr] = row_m; a.part.sumexp[pr] = row_s; a.part.ent[pr] = row_t; }
    for (int j = tid; j < a.k; j += kThreads) {
      const GKey<A> e = top(j);
      a.part.heap_vals[pr * a.k + j] = e.v;
      a.part.heap_ids[pr * a.k + j] = e.id;
    }
    for (int64_t q = tid; q < a.m; q += kThreads) {  // targets in this block's columns, else NaN (unseen)
      const int64_t j = tids[q] - a.vocab_offset;
      a.part.target_vals[pr * a.m + q] =
          (j >= c0 && j < c1) ? scale(A(to_acc(x[j * a.col_stride])), a.inv_t) : qnan<A>();
    }
  } else {  // one block per row: ids were checked to lie in [0, n)
    auto target = [&](int64_t q) -> A { return scale(A(to_acc(x[tids[q] * a.col_stride])), a.inv_t); };
    finalize_row<A>(a.fin, r, a.k, a.m, row_m, row_s, row_t, false, top, target, a.status);
  }
}

template <typename A>
struct CombineArgs {
  int k = 0;
  int64_t m = 0;
  bool has_a = false;
  StreamState<A> a;            // [rows] the stored state (read; written back unless final)
  int parts = 0;
  StreamState<A> part;         // [rows * parts] more states, same k and m
  bool poison_check = false;   // parts with a NaN max are rows K1 already rejected: skip them
  bool sort_topk = true;       // false (k > kMaxTopK): leave heaps alone, the glue merges them
  bool parts_targets_first = false;  // stream_update: the new chunk's target values override a's
  bool final = false;
  FinalArgs<A> fin;
  unsigned long long* status = nullptr;
};

template <typename A>
__global__ void __launch_bounds__(kThreads) combine_kernel(const CombineArgs<A> c) {
  OPDCORE_DYNAMIC_SMEM(smem);
  GKey<A>* pool = reinterpret_cast<GKey<A>*>(smem);
  __shared__ A mst[3];
  __shared__ int skip;
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const int nsrc = int(c.has_a) + c.parts;

  if (tid == 0) {
    A m = neg_inf<A>(), s = 0, t = 0;
    bool poisoned = false;
    if (c.has_a) {
      m = c.a.max[r]; s = c.a.sumexp[r]; t = c.a.ent[r];
      poisoned = c.poison_check && m != m;  // an unchecked earlier update rejected the row
    }
    for (int p = 0; p < c.parts; ++p) {
      const int64_t i = r * c.parts + p;
      const A pm = c.part.max[i];
      if (c.poison_check && pm != pm) poisoned = true;
      merge_mst(m, s, t, pm, c.part.sumexp[i], c.part.ent[i]);
    }
    mst[0] = m; mst[1] = s; mst[2] = t;
    skip = poisoned;
  }
  __syncthreads();
  if (skip) {
    // Unchecked (graph capture: no status word) the row's state turns NaN, so its final results read as NaN
    // instead of silently leaving the rejected chunk out.
    if (tid == 0 && !c.status && c.has_a && !c.final) c.a.max[r] = qnan<A>();
    return;
  }

  // Source p's slot j (p = 0 is `a` when present).
  auto src_vals = [&](int p) -> const A* {
    return (c.has_a && p == 0) ? c.a.heap_vals + r * c.k : c.part.heap_vals + (r * c.parts + p - int(c.has_a)) * c.k;
  };
  auto src_ids = [&](int p) -> const int64_t* {
    return (c.has_a && p == 0) ? c.a.heap_ids + r * c.k : c.part.heap_ids + (r * c.parts + p - int(c.has_a)) * c.k;
  };
  const bool do_topk = c.k > 0 && c.sort_topk;
  if (do_topk) {
    const int kp = next_pow2(c.k), shift = __ffs(kp) - 1, n = next_pow2(nsrc) * kp;
    for (int i = tid; i < n; i += kThreads) {
      const int p = i >> shift, j = i & (kp - 1);
      GKey<A> e{neg_inf<A>(), kEmptyId};  // pads sort last, like empty heap slots
      if (p < nsrc && j < c.k) e = GKey<A>{src_vals(p)[j], src_ids(p)[j]};
      pool[i] = e;
    }
    __syncthreads();
    auto at = [&](int i) -> GKey<A>& { return pool[i]; };
    block_bitonic_sort<GKey<A>>(at, n, [](const GKey<A>& p, const GKey<A>& q) { return GKey<A>::better(p, q); });
  }

  // First non-NaN target value in source order (a first, or the parts first for stream_update).
  auto target = [&](int64_t q) -> A {
    for (int o = 0; o < nsrc; ++o) {
      int p = o;
      if (c.parts_targets_first && c.has_a) p = (o + 1) % nsrc;  // parts 1..P, then a (index 0)
      const A* tv = (c.has_a && p == 0) ? c.a.target_vals + r * c.m
                                        : c.part.target_vals + (r * c.parts + p - int(c.has_a)) * c.m;
      const A v = tv[q];
      if (v == v) return v;
    }
    return qnan<A>();
  };

  if (!c.final) {
    if (tid == 0) { c.a.max[r] = mst[0]; c.a.sumexp[r] = mst[1]; c.a.ent[r] = mst[2]; }
    if (do_topk)
      for (int j = tid; j < c.k; j += kThreads) {  // worst first: a sorted array is a valid min-heap for the CPU
        const GKey<A> e = pool[c.k - 1 - j];
        c.a.heap_vals[r * c.k + j] = e.v;
        c.a.heap_ids[r * c.k + j] = e.id;
      }
    for (int64_t q = tid; q < c.m; q += kThreads) {
      const A v = target(q);  // reads a's slot q before this thread overwrites it
      c.a.target_vals[r * c.m + q] = v;
    }
    return;
  }

  bool not_full = false;
  if (c.fin.check_heap_full && c.k > 0) {
    if (do_topk) {
      not_full = pool[c.k - 1].id == kEmptyId;  // sorted: an empty slot sorts last
    } else {
      bool any = false;
      for (int j = tid; j < c.k; j += kThreads) any |= src_ids(0)[j] == kEmptyId;
      not_full = __syncthreads_or(any);
    }
  }
  auto top = [&](int j) -> GKey<A> { return pool[j]; };
  finalize_row<A>(c.fin, r, do_topk ? c.k : 0, c.m, mst[0], mst[1], mst[2], not_full, top, target, c.status);
}

}  // namespace dev
}  // namespace cuda
}  // namespace opdcore
