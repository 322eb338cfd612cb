// ATen glue (CUDA) for streaming top-k extraction, log-probs at ids, and the chunked streaming state. The same
// argument checks and errors as the CPU glue (csrc/torch/topk_ops.cpp); kernels in csrc/cuda/.
#include <torch/library.h>

#include <tuple>

#include "cuda/cuda_glue.h"
#include "glue.h"
#include "opdcore/cuda_kernels.h"

namespace opdcore {
namespace {

using at::Tensor;

// y = logits.to(acc) * acc(1/T), the kernels' scaled values (for the large-k path).
Tensor scaled(const Tensor& logits, double temperature) {
  const auto acc = glue::acc_dtype(logits.scalar_type());
  const double inv_t = acc == at::kDouble ? 1.0 / temperature : double(float(1.0 / temperature));
  return logits.to(acc) * at::scalar_tensor(inv_t, logits.options().dtype(acc));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> topk_logprobs_cuda(const Tensor& logits, int64_t k, double temperature) {
  glue::check_logits(logits, "logits");
  glue::check_temperature(temperature);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "k must be in [1, vocab=", V, "], got ", k);
  glue::check_cuda_columns(V, 0, "logits");
  const bool big_k = k > cuda::kMaxTopK;  // streamed for lse/entropy, top-k by a stable sort
  const int64_t k_kernel = big_k ? 0 : k;
  const auto acc = glue::acc_dtype(logits.scalar_type());
  glue::CudaCall call(logits);
  const auto opts = logits.options().dtype(acc);
  Tensor ids = call.output({N, k}, logits.options().dtype(at::kLong));
  Tensor lp = call.output({N, k}, opts), lse = call.output({N}, opts), ent = call.output({N}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_logprobs_cuda", [&] {
    using KT = typename glue::kernel_type<scalar_t>::type;
    using A = acc_t<KT>;
    call.set_workspace(logits, cuda::topk_workspace_bytes<A>(N, V, k_kernel, 0, call.launch.num_sms));
    StreamResult<A> out{big_k ? nullptr : ids.mutable_data_ptr<int64_t>(), big_k ? nullptr : lp.mutable_data_ptr<A>(),
                        lse.mutable_data_ptr<A>(), ent.mutable_data_ptr<A>(), nullptr};
    glue::raise_cuda_status(cuda::topk_logprobs(glue::kptr<scalar_t>(logits), N, V, logits.stride(0),
                                                logits.stride(1), temperature, k_kernel, nullptr, 0, out, call.launch),
                            "logits", "ids");
  });
  if (big_k) {
    const Tensor y = scaled(logits, temperature);
    auto [vals, top] = glue::topk_pairs(y, at::arange(V, logits.options().dtype(at::kLong)).expand({N, V}), k, true);
    ids.copy_(top);
    lp.copy_(vals - lse.unsqueeze(1));
  }
  return {ids, lp, lse, ent};
}

std::tuple<Tensor, Tensor> logprobs_at_cuda(const Tensor& logits, const Tensor& ids, double temperature) {
  glue::check_logits(logits, "logits");
  glue::check_temperature(temperature);
  const int64_t N = logits.size(0), V = logits.size(1);
  glue::check_ids(ids, "ids", N, logits);
  glue::check_cuda_columns(V, 0, "logits");
  glue::CudaCall call(logits);
  const Tensor idc = ids.contiguous();
  const int64_t m = idc.size(1);
  const auto opts = logits.options().dtype(glue::acc_dtype(logits.scalar_type()));
  Tensor lp = call.output({N, m}, opts), lse = call.output({N}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_at_cuda", [&] {
    using A = acc_t<typename glue::kernel_type<scalar_t>::type>;
    call.set_workspace(logits, cuda::topk_workspace_bytes<A>(N, V, 0, m, call.launch.num_sms));
    StreamResult<A> out{nullptr, nullptr, lse.mutable_data_ptr<A>(), nullptr, lp.mutable_data_ptr<A>()};
    glue::raise_cuda_status(cuda::topk_logprobs(glue::kptr<scalar_t>(logits), N, V, logits.stride(0),
                                                logits.stride(1), temperature, 0, idc.const_data_ptr<int64_t>(), m,
                                                out, call.launch),
                            "logits", "ids");
  });
  return {lp, lse};
}

// Large-k heap merge: the best k of the state's heap and extra (value, id) pairs, written back worst-first.
void merge_heap_big_k(Tensor& hv, Tensor& hi, const Tensor& vals, const Tensor& ids) {
  const int64_t k = hv.size(1);
  auto [v, i] = glue::topk_pairs(at::cat({hv, vals}, 1), at::cat({hi, ids}, 1), k, false);
  hv.copy_(v.flip({1}));
  hi.copy_(i.flip({1}));
}

void stream_update_cuda(Tensor& max, Tensor& sumexp, Tensor& ent, Tensor& hv, Tensor& hi, const Tensor& target_ids,
                        Tensor& tv, const Tensor& logits, int64_t vocab_offset, double temperature) {
  glue::check_stream_update(max, sumexp, ent, hv, hi, target_ids, tv, logits, vocab_offset, temperature);
  glue::check_cuda_columns(logits.size(1), vocab_offset, "logits chunk");
  glue::CudaCall call(logits);
  const int64_t k = hv.size(1), n = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "stream_update_cuda", [&] {
    using A = acc_t<typename glue::kernel_type<scalar_t>::type>;
    const auto st = glue::state_view<A>(max, sumexp, ent, hv, hi, &target_ids, tv);
    call.set_workspace(logits, cuda::stream_update_workspace_bytes<A>(st.rows, n, k, st.m, call.launch.num_sms));
    glue::raise_cuda_status(cuda::stream_update(st, glue::kptr<scalar_t>(logits), n, logits.stride(0),
                                                logits.stride(1), vocab_offset, temperature, call.launch),
                            "logits chunk", "ids");
  });
  if (k > cuda::kMaxTopK) {
    const int64_t N = logits.size(0);
    const Tensor ids = at::arange(vocab_offset, vocab_offset + n, hi.options()).expand({N, n});
    merge_heap_big_k(hv, hi, scaled(logits, temperature), ids);
  }
}

void stream_merge_cuda(Tensor& max, Tensor& sumexp, Tensor& ent, Tensor& hv, Tensor& hi, Tensor& tv,
                       const Tensor& max_b, const Tensor& sumexp_b, const Tensor& ent_b, const Tensor& hv_b,
                       const Tensor& hi_b, const Tensor& tv_b) {
  glue::check_state(max, sumexp, ent, hv, hi, tv, "state a");
  glue::check_state(max_b, sumexp_b, ent_b, hv_b, hi_b, tv_b, "state b");
  TORCH_CHECK(max.scalar_type() == max_b.scalar_type() && hv.sizes() == hv_b.sizes() && tv.sizes() == tv_b.sizes(),
              "stream_merge: the two states differ in dtype, rows, k or number of target ids");
  glue::check_same_device(max_b, "state b", max, "state a");
  glue::CudaCall call(max);
  AT_DISPATCH_FLOATING_TYPES(max.scalar_type(), "stream_merge_cuda", [&] {
    using A = scalar_t;
    auto b0 = max_b, b1 = sumexp_b, b2 = ent_b, b3 = hv_b, b4 = hi_b, b5 = tv_b;  // views; b is only read
    glue::raise_cuda_status(cuda::stream_merge(glue::state_view<A>(max, sumexp, ent, hv, hi, nullptr, tv),
                                               glue::state_view<A>(b0, b1, b2, b3, b4, nullptr, b5), call.launch),
                            "logits", "ids");
  });
  if (hv.size(1) > cuda::kMaxTopK) merge_heap_big_k(hv, hi, hv_b.clone(), hi_b.clone());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> stream_finalize_cuda(const Tensor& max, const Tensor& sumexp,
                                                                        const Tensor& ent, const Tensor& hv,
                                                                        const Tensor& hi, const Tensor& tv) {
  glue::check_state(max, sumexp, ent, hv, hi, tv, "state");
  glue::CudaCall call(max);
  const int64_t N = max.size(0), k = hv.size(1), m = tv.size(1);
  const bool big_k = k > cuda::kMaxTopK;
  const auto opts = max.options();
  Tensor ids = call.output({N, k}, opts.dtype(at::kLong)), lp = call.output({N, k}, opts);
  Tensor lse = call.output({N}, opts), entropy = call.output({N}, opts), tlp = call.output({N, m}, opts);
  AT_DISPATCH_FLOATING_TYPES(max.scalar_type(), "stream_finalize_cuda", [&] {
    using A = scalar_t;
    auto a0 = max, a1 = sumexp, a2 = ent, a3 = hv, a4 = hi, a5 = tv;
    StreamResult<A> out{big_k ? nullptr : ids.mutable_data_ptr<int64_t>(), big_k ? nullptr : lp.mutable_data_ptr<A>(),
                        lse.mutable_data_ptr<A>(), entropy.mutable_data_ptr<A>(), tlp.mutable_data_ptr<A>()};
    glue::raise_cuda_status(cuda::stream_finalize(glue::state_view<A>(a0, a1, a2, a3, a4, nullptr, a5), out,
                                                  call.launch),
                            "logits", "ids");
  });
  if (big_k) {  // the kernel checked the heap is full; sort it here
    auto [vals, top] = glue::topk_pairs(hv, hi, k, false);
    ids.copy_(top);
    lp.copy_(vals - lse.unsqueeze(1));
  }
  return {ids, lp, lse, entropy, tlp};
}

}  // namespace

OPDCORE_CUDA_LIBRARY_IMPL(m) {
  m.impl("topk_logprobs", &topk_logprobs_cuda);
  m.impl("logprobs_at", &logprobs_at_cuda);
  m.impl("stream_update", &stream_update_cuda);
  m.impl("stream_merge", &stream_merge_cuda);
  m.impl("stream_finalize", &stream_finalize_cuda);
}

}  // namespace opdcore
