// CPU implementation of the packed-sequence layout helpers and the micro-batch splitter.
#include "opdcore/packing.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <numeric>
#include <queue>
#include <utility>
#include <vector>

namespace opdcore {
namespace {

// Below this many bytes moved, the OpenMP fork/join costs more than the copy.
constexpr int64_t kParallelBytes = int64_t(1) << 18;

struct alignas(8) Bytes16 { uint64_t lo, hi; };

template <typename E>
void fill_elems(void* dst, int64_t n, const void* pad) {
  E v;
  std::memcpy(&v, pad, sizeof(E));
  std::fill_n(static_cast<E*>(dst), n, v);
}

void fill(void* dst, int64_t n, int64_t elem_size, const void* pad) {
  if (n <= 0) return;
  switch (elem_size) {
    case 1: std::memset(dst, *static_cast<const unsigned char*>(pad), size_t(n)); break;
    case 2: fill_elems<uint16_t>(dst, n, pad); break;
    case 4: fill_elems<uint32_t>(dst, n, pad); break;
    case 8: fill_elems<uint64_t>(dst, n, pad); break;
    default: fill_elems<Bytes16>(dst, n, pad); break;
  }
}

bool valid_elem_size(int64_t s) { return s == 1 || s == 2 || s == 4 || s == 8 || s == 16; }

inline char* bytes(void* p) { return static_cast<char*>(p); }
inline const char* bytes(const void* p) { return static_cast<const char*>(p); }

}  // namespace

PackStatus build_cu_seqlens(const int64_t* lengths, int64_t B, int32_t* cu_seqlens, int64_t* max_seqlen) {
  PackStatus st;
  if (B <= 0) { st.code = PackStatus::kEmpty; return st; }
  int64_t total = 0, longest = 0;
  cu_seqlens[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (lengths[b] <= 0) { st.code = PackStatus::kBadLength; st.index = b; return st; }
    total += lengths[b];
    if (total > INT32_MAX) { st.code = PackStatus::kOverflow; st.index = b; return st; }
    cu_seqlens[b + 1] = int32_t(total);
    longest = std::max(longest, lengths[b]);
  }
  if (max_seqlen) *max_seqlen = longest;
  return st;
}

PackStatus check_cu_seqlens(const int32_t* cu, int64_t B, int64_t N, int64_t* max_seqlen) {
  PackStatus st;
  if (B <= 0) { st.code = PackStatus::kEmpty; return st; }
  if (cu[0] != 0) { st.code = PackStatus::kFirstNotZero; st.index = 0; return st; }
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = int64_t(cu[b + 1]) - cu[b];
    if (len < 0) { st.code = PackStatus::kDecreasing; st.index = b; return st; }
    longest = std::max(longest, len);
  }
  if (cu[B] != N) { st.code = PackStatus::kLastNotTotal; st.index = B; return st; }
  if (max_seqlen) *max_seqlen = longest;
  return st;
}

void build_position_ids(const int32_t* cu, int64_t B, int64_t* pos) {
#pragma omp parallel for schedule(dynamic, 8) if (int64_t(cu[B]) * 8 > kParallelBytes)
  for (int64_t b = 0; b < B; ++b) {
    int64_t* p = pos + cu[b];
    const int64_t len = int64_t(cu[b + 1]) - cu[b];
    for (int64_t t = 0; t < len; ++t) p[t] = t;
  }
}

PackStatus pad_packed(const void* packed, const int32_t* cu, int64_t B, int64_t T, int64_t w, int64_t elem_size,
                      const void* pad, void* padded) {
  PackStatus st;
  if (!valid_elem_size(elem_size)) { st.code = PackStatus::kBadElemSize; return st; }
  const int64_t row = w * elem_size;
#pragma omp parallel for schedule(dynamic, 1) if (B * T * row > kParallelBytes)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = int64_t(cu[b + 1]) - cu[b];
    char* dst = bytes(padded) + b * T * row;
    if (len > 0) std::memcpy(dst, bytes(packed) + int64_t(cu[b]) * row, size_t(len * row));
    fill(dst + len * row, (T - len) * w, elem_size, pad);
  }
  return st;
}

PackStatus unpad_packed(const void* padded, const int32_t* cu, int64_t B, int64_t T, int64_t w, int64_t elem_size,
                        void* packed) {
  PackStatus st;
  if (!valid_elem_size(elem_size)) { st.code = PackStatus::kBadElemSize; return st; }
  const int64_t row = w * elem_size;
#pragma omp parallel for schedule(dynamic, 1) if (int64_t(cu[B]) * row > kParallelBytes)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = int64_t(cu[b + 1]) - cu[b];
    if (len > 0) std::memcpy(bytes(packed) + int64_t(cu[b]) * row, bytes(padded) + b * T * row, size_t(len * row));
  }
  return st;
}

void gather_segments(const void* src, int64_t row_bytes, const int64_t* src_row, const int32_t* cu,
                     const int64_t* skip, int64_t B, void* dst) {
#pragma omp parallel for schedule(dynamic, 1) if (int64_t(cu[B]) * row_bytes > kParallelBytes)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = int64_t(cu[b + 1]) - cu[b];
    const int64_t head = skip ? std::min(skip[b], len) : 0;
    char* d = bytes(dst) + int64_t(cu[b]) * row_bytes;
    if (head > 0) std::memset(d, 0, size_t(head * row_bytes));
    if (len > head)
      std::memcpy(d + head * row_bytes, bytes(src) + src_row[b] * row_bytes, size_t((len - head) * row_bytes));
  }
}

void build_tail_mask(const int32_t* cu, const int64_t* skip, int64_t B, bool* mask) {
#pragma omp parallel for schedule(dynamic, 8) if (int64_t(cu[B]) > kParallelBytes)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = int64_t(cu[b + 1]) - cu[b];
    const int64_t head = std::min(std::max(skip[b], int64_t(0)), len);
    std::fill_n(mask + cu[b], head, false);
    std::fill_n(mask + cu[b] + head, len - head, true);
  }
}

namespace {

// Longest-first greedy into k micro-batches; false when some sequence does not fit the least-loaded one
// under the budget (then no micro-batch could take it).
bool assign_greedy(const int64_t* lengths, const std::vector<int64_t>& order, int64_t k, int64_t max_tokens,
                   int64_t* bin_of) {
  using Slot = std::pair<int64_t, int64_t>;  // (load, micro-batch): ties go to the lower micro-batch
  std::priority_queue<Slot, std::vector<Slot>, std::greater<Slot>> heap;
  for (int64_t j = 0; j < k; ++j) heap.push({0, j});
  for (const int64_t b : order) {
    Slot s = heap.top();
    heap.pop();
    s.first += lengths[b];
    if (max_tokens > 0 && s.first > max_tokens) return false;
    bin_of[b] = s.second;
    heap.push(s);
  }
  return true;
}

}  // namespace

PackStatus balance_micro_batches(const int64_t* lengths, int64_t B, int64_t max_tokens, int64_t num_bins,
                                 int64_t* bin_of, int64_t* num_bins_out) {
  PackStatus st;
  if (B <= 0) { st.code = PackStatus::kEmpty; return st; }
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (lengths[b] <= 0) { st.code = PackStatus::kBadLength; st.index = b; return st; }
    if (max_tokens > 0 && lengths[b] > max_tokens) { st.code = PackStatus::kTooLong; st.index = b; return st; }
    total += lengths[b];
  }
  if (num_bins > B) { st.code = PackStatus::kTooManyBins; return st; }
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  if (num_bins > 0) {
    if (!assign_greedy(lengths, order, num_bins, max_tokens, bin_of)) { st.code = PackStatus::kDoesNotFit; return st; }
    *num_bins_out = num_bins;
    return st;
  }
  if (max_tokens <= 0) { st.code = PackStatus::kDoesNotFit; return st; }
  // Lower bound on the count: the total over the budget, and one micro-batch per sequence longer than half the
  // budget (no two fit together). The greedy may need more; with k = B every sequence gets its own
  // micro-batch and fits, so the scan terminates.
  int64_t over_half = 0;
  for (int64_t b = 0; b < B; ++b) over_half += 2 * lengths[b] > max_tokens;
  for (int64_t k = std::max({int64_t(1), (total + max_tokens - 1) / max_tokens, over_half}); k <= B; ++k) {
    if (assign_greedy(lengths, order, k, max_tokens, bin_of)) {
      *num_bins_out = k;
      return st;
    }
  }
  st.code = PackStatus::kDoesNotFit;  // unreachable: k = B always fits
  return st;
}

}  // namespace opdcore
