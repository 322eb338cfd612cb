// ATen glue (CUDA) for the dense divergences: the CPU glue's checks, kernels in csrc/cuda/dense_div.cu.
#include <torch/library.h>

#include <tuple>

#include "cuda/cuda_glue.h"
#include "dense_glue.h"
#include "opdcore/cuda_kernels.h"

namespace opdcore {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor> dense_divergence_fwd_cuda(const Tensor& student, const Tensor& teacher,
                                                                     int64_t kind, double beta, double temperature,
    const std::optional<Tensor>& given_lse_s, const std::optional<Tensor>& given_lse_t) {
  const auto [s, t] = glue::dense_inputs(student, teacher, temperature);
  const Divergence d = glue::divergence_from(kind, beta);
  const auto [gls, glt] = glue::given_lse(given_lse_s, given_lse_t, s);
  glue::CudaCall call(s);
  const int64_t N = s.size(0);
  const auto opts = s.options().dtype(glue::acc_dtype(s.scalar_type()));
  Tensor loss = call.output({N}, opts), lse_s = call.output({N}, opts), lse_t = call.output({N}, opts),
         aux = call.output({N}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "dense_divergence_fwd_cuda", [&] {
    using A = acc_t<typename glue::kernel_type<scalar_t>::type>;
    glue::raise_cuda_status(
        cuda::dense_divergence_forward(glue::kptr<scalar_t>(s), s.stride(0), glue::kptr<scalar_t>(t), t.stride(0), N,
                                       s.size(1), d, beta, temperature, loss.mutable_data_ptr<A>(),
                                       lse_s.mutable_data_ptr<A>(), lse_t.mutable_data_ptr<A>(),
                                       aux.mutable_data_ptr<A>(), gls.defined() ? gls.const_data_ptr<A>() : nullptr,
                                       glt.defined() ? glt.const_data_ptr<A>() : nullptr, call.launch),
        "student_logits", "ids");
  });
  return {loss, lse_s, lse_t, aux};
}

Tensor dense_divergence_bwd_cuda(const Tensor& grad_loss, const Tensor& student, const Tensor& teacher,
                                 const Tensor& lse_s, const Tensor& lse_t, const Tensor& aux, int64_t kind, double beta,
                                 double temperature) {
  const auto [s, t] = glue::dense_inputs(student, teacher, temperature);
  const Divergence d = glue::divergence_from(kind, beta);
  glue::check_dense_backward(grad_loss, s, lse_s, lse_t, aux);
  glue::CudaCall call(s);
  const auto acc = glue::acc_dtype(s.scalar_type());
  const Tensor g = grad_loss.to(acc).contiguous(), ls = lse_s.contiguous(), lt = lse_t.contiguous(),
               ax = aux.contiguous();
  Tensor grad = at::empty(s.sizes(), s.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "dense_divergence_bwd_cuda", [&] {
    using A = acc_t<typename glue::kernel_type<scalar_t>::type>;
    glue::raise_cuda_status(
        cuda::dense_divergence_backward(glue::kptr<scalar_t>(s), s.stride(0), glue::kptr<scalar_t>(t), t.stride(0),
                                        s.size(0), s.size(1), d, beta, temperature, ls.const_data_ptr<A>(),
                                        lt.const_data_ptr<A>(), ax.const_data_ptr<A>(), g.const_data_ptr<A>(),
                                        glue::kptr_mut<scalar_t>(grad), grad.stride(0), call.launch),
        "student_logits", "ids");
  });
  return grad;
}

}  // namespace

OPDCORE_CUDA_LIBRARY_IMPL(m) {
  m.impl("dense_divergence_fwd", &dense_divergence_fwd_cuda);
  m.impl("dense_divergence_bwd", &dense_divergence_bwd_cuda);
}

}  // namespace opdcore
