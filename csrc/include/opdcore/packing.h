// Packed-sequence layout (flash-attn varlen convention) on raw pointers.
//
// B sequences of lengths len[b] are packed back to back into a flat stream of N = sum(len) rows;
// cu_seqlens [B+1] int32 holds the row offsets (cu[0] = 0, cu[B] = N) and position ids restart at 0 in
// every sequence. A "row" is one token's data: w elements of elem_size bytes (w = 1 for token ids,
// w = k for top-k payloads), so every routine below is a byte copy and works for any dtype.
// The padded layout is [B, T, w] with T >= max(len): sequence b occupies rows [0, len[b]) of slab b.
#pragma once
#include <cstdint>

namespace opdcore {

// Why a packing routine refused its input; index is the first offending sequence / entry (or -1).
struct PackStatus {
  enum Code : int {
    kOk = 0,
    kBadLength = 1,      // a length <= 0 (or < 0 where zero is allowed)
    kFirstNotZero = 2,   // cu_seqlens[0] != 0
    kDecreasing = 3,     // cu_seqlens[index + 1] < cu_seqlens[index]
    kLastNotTotal = 4,   // cu_seqlens[B] != N
    kTooLong = 5,        // a sequence longer than the room given (max_seqlen, T, or the token budget)
    kOverflow = 6,       // the total length does not fit int32 (cu_seqlens)
    kEmpty = 7,          // no sequences
    kBadElemSize = 8,    // element size not in {1, 2, 4, 8, 16}
    kTooManyBins = 9,    // more micro-batches requested than sequences
    kDoesNotFit = 10,    // the sequences do not fit num_bins micro-batches under the budget
  };
  Code code = kOk;
  int64_t index = -1;
  bool ok() const { return code == kOk; }
};

// cu_seqlens [B+1] from lengths [B] (each >= 1); *max_seqlen gets the longest (may be null).
PackStatus build_cu_seqlens(const int64_t* lengths, int64_t B, int32_t* cu_seqlens, int64_t* max_seqlen);

// Validate cu_seqlens [B+1] against N packed rows: starts at 0, non-decreasing (empty sequences are
// allowed here: the ops are general), ends at N. *max_seqlen gets the longest (may be null).
PackStatus check_cu_seqlens(const int32_t* cu_seqlens, int64_t B, int64_t N, int64_t* max_seqlen);

// position_ids[cu[b] + t] = t.
void build_position_ids(const int32_t* cu_seqlens, int64_t B, int64_t* position_ids);

// Packed [N, w] -> padded [B, T, w]; rows past a sequence's end are filled with *pad (elem_size bytes).
// cu_seqlens must have passed check_cu_seqlens with max_seqlen <= T. elem_size in {1, 2, 4, 8, 16}.
PackStatus pad_packed(const void* packed, const int32_t* cu_seqlens, int64_t B, int64_t T, int64_t w,
                      int64_t elem_size, const void* pad, void* padded);

// Padded [B, T, w] -> packed [N, w] (the inverse gather; padding is ignored).
PackStatus unpad_packed(const void* padded, const int32_t* cu_seqlens, int64_t B, int64_t T, int64_t w,
                        int64_t elem_size, void* packed);

// Gather B segments of rows (row_bytes each) into one packed stream, zero-filling a head of each:
//   dst[cu[b], cu[b] + skip[b])          = 0          (skip may be null: no head)
//   dst[cu[b] + skip[b], cu[b + 1])      = src[src_row[b], ...)   (cu[b + 1] - cu[b] - skip[b] rows)
// This is how a buffer of stored sequences packs a selection: tokens with skip = null, per-response-token
// payloads with skip = the prompt lengths (zeros where no payload exists).
void gather_segments(const void* src, int64_t row_bytes, const int64_t* src_row, const int32_t* cu_seqlens,
                     const int64_t* skip, int64_t B, void* dst);

// mask[cu[b] + t] = (t >= skip[b]): true on the response part of each sequence.
void build_tail_mask(const int32_t* cu_seqlens, const int64_t* skip, int64_t B, bool* mask);

// Split B sequences into micro-batches with balanced token counts: sequences are taken longest first
// (ties: lower index first) and each goes to the least-loaded micro-batch (ties: lower micro-batch).
//   num_bins > 0:  exactly num_bins micro-batches (num_bins <= B); with max_tokens > 0 every micro-batch
//                  must also fit the budget, else kDoesNotFit.
//   num_bins <= 0: the fewest micro-batches for which the greedy assignment fits the budget (max_tokens > 0
//                  required), scanning up from max(ceil(total / max_tokens), #sequences > max_tokens / 2).
//                  The greedy balances; it is not an optimal bin packer, so it may use one more than needed.
// A sequence longer than max_tokens is kTooLong. On success bin_of[b] is sequence b's micro-batch,
// numbered so that micro-batch 0 holds the longest sequence, and *num_bins_out the count. Deterministic.
PackStatus balance_micro_batches(const int64_t* lengths, int64_t B, int64_t max_tokens, int64_t num_bins,
                                 int64_t* bin_of, int64_t* num_bins_out);

}  // namespace opdcore
