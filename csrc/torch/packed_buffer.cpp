// PackedBuffer: storage of variable-length sequences and their packing into the flat varlen layout.
#include "packed_buffer.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <numeric>

#include "opdcore/packing.h"

namespace opdcore {
namespace {

using at::Tensor;

std::string names_of(const std::vector<std::string>& names) {
  std::vector<std::string> s = names;
  std::sort(s.begin(), s.end());
  std::string out = "{";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + s[i];
  return out + "}";
}

// Token ids: 1-D int64/int32, at least one, none negative; returned as contiguous int64 on the CPU.
Tensor checked_tokens(const Tensor& ids, const char* name, const char* why_nonempty) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, name,
                   " must be an int64 (or int32) tensor of token ids, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1, name, " must be 1-D [length], got shape ", ids.sizes());
  TORCH_CHECK_VALUE(ids.numel() > 0, name, " is empty (length 0): ", why_nonempty);
  Tensor t = ids.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = t.const_data_ptr<int64_t>();
  const int64_t* neg = std::find_if(p, p + t.numel(), [](int64_t v) { return v < 0; });
  TORCH_CHECK_VALUE(neg == p + t.numel(), name, " holds a negative token id (", *neg, " at position ", neg - p, ")");
  return t;
}

}  // namespace

int64_t PackedBuffer::add(const Tensor& prompt_ids, const Tensor& response_ids, const NamedTensors& payloads) {
  const Tensor prompt = checked_tokens(prompt_ids, "prompt_ids",
                                       "every sequence needs a prompt token, whose logits predict the first response token");
  const Tensor response = checked_tokens(response_ids, "response_ids", "a sequence without a response has nothing to train on");
  const int64_t P = prompt.numel(), R = response.numel();

  // Validate every payload before touching the buffer, so a failed add leaves it unchanged.
  const bool first = size() == 0;
  std::vector<std::string> given, stored;
  for (const auto& kv : payloads) given.push_back(kv.first);
  for (const auto& p : payloads_) stored.push_back(p.name);
  TORCH_CHECK_VALUE(first || names_of(given) == names_of(stored), "payloads has keys ", names_of(given),
                    " but the buffer's sequences carry ", names_of(stored), ": every sequence needs the same payloads");
  std::vector<Tensor> rows(payloads.size());
  std::vector<size_t> slot(payloads.size());
  for (size_t i = 0; i < payloads.size(); ++i) {
    const std::string& name = payloads[i].first;
    const Tensor& t = payloads[i].second;
    TORCH_CHECK_VALUE(t.defined(), "payloads['", name, "'] is not a tensor");
    TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) == R, "payloads['", name,
                      "'] must have a leading dim equal to the response length (", R, "), got shape ", t.sizes());
    const std::vector<int64_t> trailing(t.sizes().begin() + 1, t.sizes().end());
    if (first) {
      for (size_t j = 0; j < i; ++j)
        TORCH_CHECK_VALUE(payloads[j].first != name, "payloads names '", name, "' twice");
    } else {
      slot[i] = size_t(std::find(stored.begin(), stored.end(), name) - stored.begin());
      const Payload& p = payloads_[slot[i]];
      TORCH_CHECK_TYPE(t.scalar_type() == p.dtype, "payloads['", name, "'] is ", t.scalar_type(),
                       " but earlier sequences stored ", p.dtype);
      TORCH_CHECK_VALUE(trailing == p.trailing, "payloads['", name, "'] has trailing shape ", at::IntArrayRef(trailing),
                        " (after the response dim) but earlier sequences stored ", at::IntArrayRef(p.trailing));
    }
    rows[i] = t.to(at::kCPU).contiguous();
  }

  if (first) {
    payloads_.clear();
    for (size_t i = 0; i < payloads.size(); ++i) {
      const Tensor& t = rows[i];
      payloads_.push_back({payloads[i].first, t.scalar_type(),
                           std::vector<int64_t>(t.sizes().begin() + 1, t.sizes().end()),
                           R ? int64_t(t.nbytes()) / R : 0, {}});
      slot[i] = i;
    }
  }
  for (size_t i = 0; i < payloads.size(); ++i) {
    auto& dst = payloads_[slot[i]].rows;
    const auto* src = static_cast<const unsigned char*>(rows[i].const_data_ptr());
    dst.insert(dst.end(), src, src + rows[i].nbytes());
  }
  start_.push_back(num_tokens());
  const int64_t* pp = prompt.const_data_ptr<int64_t>();
  const int64_t* rp = response.const_data_ptr<int64_t>();
  tokens_.insert(tokens_.end(), pp, pp + P);
  tokens_.insert(tokens_.end(), rp, rp + R);
  prompt_len_.push_back(P);
  response_len_.push_back(R);
  response_row_.push_back(response_rows_);
  response_rows_ += R;
  return size() - 1;
}

PackedSequences PackedBuffer::pack(const std::optional<std::vector<int64_t>>& indices) const {
  std::vector<int64_t> idx;
  if (indices) {
    idx = *indices;
    TORCH_CHECK_VALUE(!idx.empty(), "indices is empty (an empty batch): pick at least one sequence");
  } else {
    TORCH_CHECK_VALUE(size() > 0, "the buffer is empty (an empty batch): add sequences before pack()");
    idx.resize(size());
    std::iota(idx.begin(), idx.end(), int64_t(0));
  }
  const int64_t B = int64_t(idx.size());
  std::vector<char> seen(size(), 0);
  std::vector<int64_t> len(B), src(B), skip(B), resp(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t i = idx[b];
    TORCH_CHECK_INDEX(i >= 0 && i < size(), "indices[", b, "] = ", i, " is out of range for a buffer of ", size(),
                      " sequences");
    TORCH_CHECK_VALUE(!seen[i], "indices holds sequence ", i, " twice");
    seen[i] = 1;
    len[b] = prompt_len_[i] + response_len_[i];
    src[b] = start_[i];
    skip[b] = prompt_len_[i];
    resp[b] = response_row_[i];
  }

  PackedSequences out;
  out.cu_seqlens = at::empty({B + 1}, at::kInt);
  int32_t* cu = out.cu_seqlens.mutable_data_ptr<int32_t>();
  const PackStatus st = build_cu_seqlens(len.data(), B, cu, &out.max_seqlen);
  TORCH_CHECK_VALUE(st.ok(), "the selected sequences hold more tokens than cu_seqlens (int32) can index; pack fewer "
                    "at a time (the total passes 2^31 - 1 at indices[", st.index, "])");
  const int64_t N = cu[B];
  out.input_ids = at::empty({N}, at::kLong);
  gather_segments(tokens_.data(), sizeof(int64_t), src.data(), cu, nullptr, B, out.input_ids.mutable_data_ptr());
  out.position_ids = at::empty({N}, at::kLong);
  build_position_ids(cu, B, out.position_ids.mutable_data_ptr<int64_t>());
  out.loss_mask = at::empty({N}, at::kBool);
  build_tail_mask(cu, skip.data(), B, out.loss_mask.mutable_data_ptr<bool>());
  out.seq_ids = at::tensor(idx, at::kLong);
  for (const Payload& p : payloads_) {
    std::vector<int64_t> shape{N};
    shape.insert(shape.end(), p.trailing.begin(), p.trailing.end());
    Tensor t = at::empty(shape, at::TensorOptions().dtype(p.dtype));
    if (p.row_bytes > 0)  // the prompt rows become zeros, the response rows the stored payload
      gather_segments(p.rows.data(), p.row_bytes, resp.data(), cu, skip.data(), B, t.mutable_data_ptr());
    out.payloads.emplace_back(p.name, std::move(t));
  }
  return out;
}

std::vector<std::vector<int64_t>> PackedBuffer::split(std::optional<int64_t> max_tokens,
                                                      std::optional<int64_t> num_micro_batches) const {
  TORCH_CHECK_VALUE(size() > 0, "the buffer is empty (an empty batch): nothing to split");
  return split_micro_batches(lengths(), max_tokens, num_micro_batches, "lengths");
}

std::vector<int64_t> PackedBuffer::lengths() const {
  std::vector<int64_t> out(prompt_len_.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = prompt_len_[i] + response_len_[i];
  return out;
}

std::vector<std::string> PackedBuffer::payload_names() const {
  std::vector<std::string> out;
  for (const auto& p : payloads_) out.push_back(p.name);
  return out;
}

void PackedBuffer::clear() {
  tokens_.clear();
  start_.clear();
  prompt_len_.clear();
  response_len_.clear();
  response_row_.clear();
  response_rows_ = 0;
  payloads_.clear();
}

std::vector<std::vector<int64_t>> split_micro_batches(const std::vector<int64_t>& lengths,
                                                      std::optional<int64_t> max_tokens,
                                                      std::optional<int64_t> num_micro_batches, const char* what) {
  TORCH_CHECK_VALUE(max_tokens || num_micro_batches, "split needs max_tokens, num_micro_batches or both");
  TORCH_CHECK_VALUE(!max_tokens || *max_tokens >= 1, "max_tokens must be >= 1, got ", *max_tokens);
  TORCH_CHECK_VALUE(!num_micro_batches || *num_micro_batches >= 1, "num_micro_batches must be >= 1, got ",
                    *num_micro_batches);
  const int64_t B = int64_t(lengths.size());
  TORCH_CHECK_VALUE(B > 0, what, " is empty (an empty batch): nothing to split");
  const int64_t budget = max_tokens.value_or(0), want = num_micro_batches.value_or(0);
  std::vector<int64_t> bin_of(B);
  int64_t k = 0;
  const PackStatus st = balance_micro_batches(lengths.data(), B, budget, want, bin_of.data(), &k);
  switch (st.code) {
    case PackStatus::kOk: break;
    case PackStatus::kBadLength:
      TORCH_CHECK_VALUE(false, what, "[", st.index, "] = ", lengths[st.index], ": lengths must be >= 1");
    case PackStatus::kTooLong:
      TORCH_CHECK_VALUE(false, what, "[", st.index, "] = ", lengths[st.index], " tokens: a single sequence longer "
                        "than max_tokens = ", budget, " cannot fit any micro-batch");
    case PackStatus::kTooManyBins:
      TORCH_CHECK_VALUE(false, "num_micro_batches = ", want, " exceeds the number of sequences (", B,
                        "): a micro-batch would be empty");
    case PackStatus::kDoesNotFit:
      TORCH_CHECK_VALUE(false, "the sequences do not fit num_micro_batches = ", want, " micro-batches of max_tokens = ",
                        budget, " tokens; raise num_micro_batches (split(max_tokens) alone finds the count)");
    default: TORCH_CHECK(false, "split_micro_batches failed (code ", int(st.code), ")");
  }
  std::vector<std::vector<int64_t>> out(k);
  for (int64_t b = 0; b < B; ++b) out[bin_of[b]].push_back(b);
  return out;
}

}  // namespace opdcore
