// Streaming top-k, log-sum-exp and entropy over the vocabulary.
//
// Each row carries a small state while the vocabulary streams past in chunks:
//   m  running max of y = logit / temperature        s  sum exp(y - m)
//   t  sum exp(y - m) * (y - m)   (entropy: H = log s - t / s)
//   a top-k candidate heap (values y, vocabulary ids), ordered by value descending, ties to the lower id,
//   and optionally the values y at m_targets requested ids (NaN until the chunk holding the id is seen).
// Merging two states is associative, so vocabulary chunks (or tensor-parallel shards) may arrive in any order.
#pragma once
#include <cstdint>

#include "opdcore/common.h"

namespace opdcore {

// Views of the per-row state arrays (A = float for 16/32-bit logits, double for double logits).
template <typename A>
struct StreamState {
  int64_t rows = 0;
  A* max = nullptr;         // [rows]
  A* sumexp = nullptr;      // [rows]
  A* ent = nullptr;         // [rows]
  int64_t k = 0;            // heap capacity (0: no top-k)
  A* heap_vals = nullptr;   // [rows, k] min-heap of the best k seen; empty slots hold (-inf, INT64_MAX)
  int64_t* heap_ids = nullptr;
  int64_t m = 0;            // number of requested ids per row (0: none)
  const int64_t* target_ids = nullptr;  // [rows, m]
  A* target_vals = nullptr;             // [rows, m] y at target_ids, NaN where not yet seen
};

constexpr int64_t kEmptyId = INT64_MAX;

// A fresh state holds max -inf, sums 0, heap slots (-inf, kEmptyId) and targets NaN (the Python layer
// allocates it that way).

// Feed a chunk of logits (rows x n columns, element (r, j) at logits[r*row_stride + j*col_stride]) holding
// vocabulary ids [vocab_offset, vocab_offset + n). A NaN or +inf logit is reported as kNonFinite.
template <typename T>
Status stream_update(const StreamState<acc_t<T>>& st, const T* logits, int64_t n, int64_t row_stride,
                      int64_t col_stride, int64_t vocab_offset, double temperature);

// a <- merge(a, b). Both states must have the same rows, k and m (and the same target ids).
template <typename A>
void stream_merge(const StreamState<A>& a, const StreamState<A>& b);

// Outputs of finalize; any pointer may be null to skip that output.
template <typename A>
struct StreamResult {
  int64_t* topk_ids = nullptr;  // [rows, k] descending by log-prob, ties to the lower id
  A* topk_logprobs = nullptr;   // [rows, k]
  A* lse = nullptr;             // [rows]  logsumexp(logits / temperature)
  A* entropy = nullptr;         // [rows]
  A* target_logprobs = nullptr; // [rows, m]
};

// Sort the heaps and form log-probs.
template <typename A>
Status stream_finalize(const StreamState<A>& st, const StreamResult<A>& out);

// One-shot version over full rows ([rows, V] logits): init + update + finalize without stored state.
// target_ids (m per row, may be null) are checked to lie in [0, V).
template <typename T>
Status topk_logprobs(const T* logits, int64_t rows, int64_t V, int64_t row_stride, int64_t col_stride,
                     double temperature, int64_t k, const int64_t* target_ids, int64_t m,
                     const StreamResult<acc_t<T>>& out);

}  // namespace opdcore
