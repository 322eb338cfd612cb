// ATen glue (CPU) for streaming top-k extraction, log-probs at ids, and the chunked streaming state.
#include <torch/library.h>

#include <tuple>

#include "glue.h"
#include "opdcore/topk_stream.h"

namespace opdcore {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor> topk_logprobs_cpu(const Tensor& logits, int64_t k, double temperature) {
  glue::check_logits(logits, "logits");
  glue::check_temperature(temperature);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "k must be in [1, vocab=", V, "], got ", k);
  const auto opts = logits.options().dtype(glue::acc_dtype(logits.scalar_type()));
  Tensor ids = at::empty({N, k}, logits.options().dtype(at::kLong));
  Tensor lp = at::empty({N, k}, opts), lse = at::empty({N}, opts), ent = at::empty({N}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_logprobs", [&] {
    using A = acc_t<typename glue::kernel_type<scalar_t>::type>;
    StreamResult<A> out{ids.mutable_data_ptr<int64_t>(), lp.mutable_data_ptr<A>(), lse.mutable_data_ptr<A>(),
                        ent.mutable_data_ptr<A>(), nullptr};
    glue::raise_status(topk_logprobs(glue::kptr<scalar_t>(logits), N, V, logits.stride(0), logits.stride(1),
                                     temperature, k, nullptr, 0, out),
                       "logits", "ids");
  });
  return {ids, lp, lse, ent};
}

std::tuple<Tensor, Tensor> logprobs_at_cpu(const Tensor& logits, const Tensor& ids, double temperature) {
  glue::check_logits(logits, "logits");
  glue::check_temperature(temperature);
  const int64_t N = logits.size(0), V = logits.size(1);
  glue::check_ids(ids, "ids", N, logits);
  const Tensor idc = ids.contiguous();
  const int64_t m = idc.size(1);
  const auto opts = logits.options().dtype(glue::acc_dtype(logits.scalar_type()));
  Tensor lp = at::empty({N, m}, opts), lse = at::empty({N}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_at", [&] {
    using A = acc_t<typename glue::kernel_type<scalar_t>::type>;
    StreamResult<A> out{nullptr, nullptr, lse.mutable_data_ptr<A>(), nullptr, lp.mutable_data_ptr<A>()};
    glue::raise_status(topk_logprobs(glue::kptr<scalar_t>(logits), N, V, logits.stride(0), logits.stride(1),
                                     temperature, 0, idc.const_data_ptr<int64_t>(), m, out),
                       "logits", "ids");
  });
  return {lp, lse};
}

void stream_update_cpu(Tensor& max, Tensor& sumexp, Tensor& ent, Tensor& hv, Tensor& hi, const Tensor& target_ids,
                       Tensor& tv, const Tensor& logits, int64_t vocab_offset, double temperature) {
  glue::check_stream_update(max, sumexp, ent, hv, hi, target_ids, tv, logits, vocab_offset, temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "stream_update", [&] {
    using A = acc_t<typename glue::kernel_type<scalar_t>::type>;
    const auto st = glue::state_view<A>(max, sumexp, ent, hv, hi, &target_ids, tv);
    glue::raise_status(stream_update(st, glue::kptr<scalar_t>(logits), logits.size(1), logits.stride(0),
                                     logits.stride(1), vocab_offset, temperature),
                       "logits chunk", "ids");
  });
}

void stream_merge_cpu(Tensor& max, Tensor& sumexp, Tensor& ent, Tensor& hv, Tensor& hi, Tensor& tv,
                      const Tensor& max_b, const Tensor& sumexp_b, const Tensor& ent_b, const Tensor& hv_b,
                      const Tensor& hi_b, const Tensor& tv_b) {
  glue::check_state(max, sumexp, ent, hv, hi, tv, "state a");
  glue::check_state(max_b, sumexp_b, ent_b, hv_b, hi_b, tv_b, "state b");
  TORCH_CHECK(max.scalar_type() == max_b.scalar_type() && hv.sizes() == hv_b.sizes() && tv.sizes() == tv_b.sizes(),
              "stream_merge: the two states differ in dtype, rows, k or number of target ids");
  AT_DISPATCH_FLOATING_TYPES(max.scalar_type(), "stream_merge", [&] {
    using A = scalar_t;
    auto b0 = max_b, b1 = sumexp_b, b2 = ent_b, b3 = hv_b, b4 = hi_b, b5 = tv_b;  // views; b is only read
    stream_merge(glue::state_view<A>(max, sumexp, ent, hv, hi, nullptr, tv),
                 glue::state_view<A>(b0, b1, b2, b3, b4, nullptr, b5));
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> stream_finalize_cpu(const Tensor& max, const Tensor& sumexp,
                                                                       const Tensor& ent, const Tensor& hv,
                                                                       const Tensor& hi, const Tensor& tv) {
  glue::check_state(max, sumexp, ent, hv, hi, tv, "state");
  const int64_t N = max.size(0), k = hv.size(1), m = tv.size(1);
  const auto opts = max.options();
  Tensor ids = at::empty({N, k}, opts.dtype(at::kLong)), lp = at::empty({N, k}, opts);
  Tensor lse = at::empty({N}, opts), entropy = at::empty({N}, opts), tlp = at::empty({N, m}, opts);
  AT_DISPATCH_FLOATING_TYPES(max.scalar_type(), "stream_finalize", [&] {
    using A = scalar_t;
    auto a0 = max, a1 = sumexp, a2 = ent, a3 = hv, a4 = hi, a5 = tv;
    StreamResult<A> out{ids.mutable_data_ptr<int64_t>(), lp.mutable_data_ptr<A>(), lse.mutable_data_ptr<A>(),
                        entropy.mutable_data_ptr<A>(), tlp.mutable_data_ptr<A>()};
    glue::raise_status(stream_finalize(glue::state_view<A>(a0, a1, a2, a3, a4, nullptr, a5), out), "logits", "ids");
  });
  return {ids, lp, lse, entropy, tlp};
}

}  // namespace

TORCH_LIBRARY_IMPL(opdcore, CPU, m) {
  m.impl("topk_logprobs", &topk_logprobs_cpu);
  m.impl("logprobs_at", &logprobs_at_cpu);
  m.impl("stream_update", &stream_update_cpu);
  m.impl("stream_merge", &stream_merge_cpu);
  m.impl("stream_finalize", &stream_finalize_cpu);
}

}  // namespace opdcore
