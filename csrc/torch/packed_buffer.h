// A buffer of variable-length sequences (prompt + response token ids, optional per-response-token payloads)
// that packs any selection into the flat varlen layout and splits itself into balanced micro-batches.
// ATen types only; csrc/bind.cpp exposes it to Python as opdcore._C.PackedBuffer.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace opdcore {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// The packed form of B sequences (N tokens in all), every tensor on the CPU.
struct PackedSequences {
  at::Tensor input_ids;     // [N] int64: prompt then response of each sequence, back to back
  at::Tensor position_ids;  // [N] int64, restarting at 0 in every sequence
  at::Tensor cu_seqlens;    // [B+1] int32
  int64_t max_seqlen = 0;
  at::Tensor loss_mask;     // [N] bool: true on response tokens
  at::Tensor seq_ids;       // [B] int64: buffer index of each packed sequence
  NamedTensors payloads;    // name -> [N, ...]: the response rows hold the payload, prompt rows are zero
};

class PackedBuffer {
 public:
  // Appends one sequence and returns its index. prompt_ids and response_ids: 1-D int64 (or int32) token
  // ids, each non-empty. Each payload has a leading dim equal to the response length; the first sequence
  // added fixes the payload names, dtypes and trailing shapes every later sequence must match.
  int64_t add(const at::Tensor& prompt_ids, const at::Tensor& response_ids, const NamedTensors& payloads);

  // Packs the sequences at indices, in that order (all sequences when nullopt).
  PackedSequences pack(const std::optional<std::vector<int64_t>>& indices) const;

  // Micro-batches as lists of sequence indices (ascending within a micro-batch); see split_micro_batches.
  std::vector<std::vector<int64_t>> split(std::optional<int64_t> max_tokens,
                                          std::optional<int64_t> num_micro_batches) const;

  int64_t size() const { return int64_t(prompt_len_.size()); }
  int64_t num_tokens() const { return int64_t(tokens_.size()); }
  std::vector<int64_t> lengths() const;
  const std::vector<int64_t>& prompt_lengths() const { return prompt_len_; }
  const std::vector<int64_t>& response_lengths() const { return response_len_; }
  std::vector<std::string> payload_names() const;
  void clear();

 private:
  struct Payload {
    std::string name;
    at::ScalarType dtype;
    std::vector<int64_t> trailing;  // shape after the leading (token) dim
    int64_t row_bytes;
    std::vector<unsigned char> rows;  // the response rows of every sequence, back to back
  };
  std::vector<int64_t> tokens_;  // prompt then response of every sequence, back to back
  std::vector<int64_t> start_, prompt_len_, response_len_;
  std::vector<int64_t> response_row_;  // first payload row of each sequence
  int64_t response_rows_ = 0;
  std::vector<Payload> payloads_;
};

// Balanced micro-batches over sequence lengths (longest first, each to the least-loaded micro-batch):
//   max_tokens only:       the fewest micro-batches the greedy fits under the token budget;
//   num_micro_batches only: exactly that many;
//   both:                  exactly num_micro_batches, each within max_tokens (else an error). This is the
//                          data-parallel pattern: every rank computes len(split(max_tokens)), all-reduce the
//                          max, then splits into that count so all ranks run the same number of steps.
// Lists hold indices ascending; micro-batch 0 holds the longest sequence. what names the lengths in errors.
std::vector<std::vector<int64_t>> split_micro_batches(const std::vector<int64_t>& lengths,
                                                      std::optional<int64_t> max_tokens,
                                                      std::optional<int64_t> num_micro_batches,
                                                      const char* what = "lengths");

}  // namespace opdcore
