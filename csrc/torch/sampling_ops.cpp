// ATen glue (CPU) for the fused next-token draw (opdcore/sampling.h).
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "glue.h"
#include "opdcore/sampling.h"

namespace opdcore {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> sample_tokens_cpu(const Tensor& scores, const Tensor& uniform, double temperature) {
  glue::check_logits(scores, "scores");
  TORCH_CHECK(temperature == 0 || (temperature > 0 && std::isfinite(temperature)),
              "temperature must be 0 (greedy) or a positive finite number, got ", temperature);
  const int64_t N = scores.size(0);
  TORCH_CHECK(uniform.dim() == 1 && uniform.size(0) == N, "uniform must be [rows=", N, "], got shape ",
              uniform.sizes());
  TORCH_CHECK(uniform.scalar_type() == at::kDouble, "uniform must be float64, got ", uniform.scalar_type());
  glue::check_same_device(uniform, "uniform", scores, "scores");
  const Tensor u = uniform.contiguous();
  if (temperature != 0) {
    const double lo = u.min().item<double>(), hi = u.max().item<double>();
    TORCH_CHECK(lo >= 0 && hi < 1, "uniform must lie in [0, 1), got values in [", lo, ", ", hi, "]");
  }
  const Tensor x = scores.stride(1) == 1 ? scores : scores.contiguous();
  Tensor ids = at::empty({N}, x.options().dtype(at::kLong));
  Tensor lp = at::empty({N}, x.options().dtype(glue::acc_dtype(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sample_tokens", [&] {
    using A = acc_t<typename glue::kernel_type<scalar_t>::type>;
    glue::raise_status(sample_rows(glue::kptr<scalar_t>(x), x.stride(0), N, x.size(1), temperature,
                                   u.const_data_ptr<double>(), ids.mutable_data_ptr<int64_t>(),
                                   lp.mutable_data_ptr<A>()),
                       "scores", "ids");
  });
  return {ids, lp};
}

}  // namespace

TORCH_LIBRARY_IMPL(opdcore, CPU, m) { m.impl("sample_tokens", &sample_tokens_cpu); }

}  // namespace opdcore
