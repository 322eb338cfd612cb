// ATen glue (CUDA) for the sparse top-k OPD loss and renorm_kl. The same argument checks and errors as the CPU
// glue (csrc/torch/loss_ops.cpp); kernels in csrc/cuda/opd_loss.cu.
#include <torch/library.h>

#include <tuple>

#include "cuda/cuda_glue.h"
#include "glue.h"
#include "opdcore/cuda_kernels.h"

namespace opdcore {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> opd_rewards_cuda(const Tensor& slp, const Tensor& tlp, const Tensor& valid,
                                            int64_t weight_mode, double clip) {
  glue::check_rewards_args(slp, tlp, valid, clip);
  const auto mode = glue::weight_mode_from(weight_mode);
  glue::CudaCall call(slp);
  const Tensor s = slp.contiguous(), t = tlp.to(slp.scalar_type()).contiguous(), v = valid.contiguous();
  Tensor rewards = call.output(s.sizes(), s.options()), loss = call.output({s.size(0)}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "opd_rewards_cuda", [&] {
    glue::raise_cuda_status(
        cuda::opd_rewards<scalar_t>(s.size(0), s.size(1), s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                                    v.const_data_ptr<bool>(), mode, clip, rewards.mutable_data_ptr<scalar_t>(),
                                    loss.mutable_data_ptr<scalar_t>(), call.launch),
        "student_logprobs", "ids");
  });
  return {rewards, loss};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> opd_topk_loss_fwd_cuda(const Tensor& logits, const Tensor& ids,
                                                                  const Tensor& tlp, const Tensor& valid,
                                                                  int64_t weight_mode, double temperature,
                                                                  double clip) {
  glue::check_logits(logits, "student_logits");
  glue::check_temperature(temperature);
  glue::check_clip(clip);
  const int64_t N = logits.size(0), V = logits.size(1);
  glue::check_set(ids, tlp, valid, N, logits);
  glue::check_cuda_columns(V, 0, "student_logits");
  const auto mode = glue::weight_mode_from(weight_mode);
  const auto acc = glue::acc_dtype(logits.scalar_type());
  glue::CudaCall call(logits);
  const Tensor idc = ids.contiguous(), t = tlp.to(acc).contiguous(), v = valid.contiguous();
  const int64_t K = idc.size(1);
  const auto opts = logits.options().dtype(acc);
  Tensor loss = call.output({N}, opts), rewards = call.output({N, K}, opts), slp = call.output({N, K}, opts),
         lse = call.output({N}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "opd_topk_loss_fwd_cuda", [&] {
    using A = acc_t<typename glue::kernel_type<scalar_t>::type>;
    call.set_workspace(logits, cuda::topk_workspace_bytes<A>(N, V, 0, K, call.launch.num_sms));
    glue::raise_cuda_status(
        cuda::opd_topk_loss_forward(glue::kptr<scalar_t>(logits), N, V, logits.stride(0), logits.stride(1),
                                    temperature, idc.const_data_ptr<int64_t>(), t.const_data_ptr<A>(),
                                    v.const_data_ptr<bool>(), K, mode, clip, loss.mutable_data_ptr<A>(),
                                    rewards.mutable_data_ptr<A>(), slp.mutable_data_ptr<A>(),
                                    lse.mutable_data_ptr<A>(), call.launch),
        "student_logits", "ids");
  });
  return {loss, rewards, slp, lse};
}

Tensor opd_topk_loss_bwd_cuda(const Tensor& grad_loss, const Tensor& logits, const Tensor& lse, const Tensor& ids,
                              const Tensor& rewards, double temperature) {
  glue::check_logits(logits, "student_logits");
  glue::check_backward(grad_loss, logits, lse, ids, rewards);
  glue::check_temperature(temperature);
  const auto acc = glue::acc_dtype(logits.scalar_type());
  glue::CudaCall call(logits);
  const Tensor g = grad_loss.to(acc).contiguous(), l = lse.contiguous(), idc = ids.contiguous(),
               r = rewards.contiguous();
  Tensor grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "opd_topk_loss_bwd_cuda", [&] {
    using A = acc_t<typename glue::kernel_type<scalar_t>::type>;
    glue::raise_cuda_status(
        cuda::opd_topk_loss_backward(glue::kptr<scalar_t>(logits), logits.size(0), logits.size(1), logits.stride(0),
                                     logits.stride(1), 0, temperature, l.const_data_ptr<A>(),
                                     idc.const_data_ptr<int64_t>(), r.const_data_ptr<A>(), idc.size(1),
                                     g.const_data_ptr<A>(), glue::kptr_mut<scalar_t>(grad), grad.stride(0),
                                     call.launch),
        "student_logits", "ids");
  });
  return grad;
}

// In place: chunk (logits of vocabulary ids [vocab_offset, vocab_offset + n)) becomes d loss / d chunk.
void opd_topk_loss_bwd_chunk_cuda(Tensor& chunk, int64_t vocab_offset, const Tensor& grad_loss, const Tensor& lse,
                                  const Tensor& ids, const Tensor& rewards, double temperature) {
  glue::check_logits(chunk, "chunk");
  TORCH_CHECK(chunk.stride(1) == 1, "chunk must have unit stride along the vocabulary");
  glue::check_backward(grad_loss, chunk, lse, ids, rewards);
  glue::check_temperature(temperature);
  const auto acc = glue::acc_dtype(chunk.scalar_type());
  glue::CudaCall call(chunk);
  const Tensor g = grad_loss.to(acc).contiguous(), l = lse.contiguous(), idc = ids.contiguous(),
               r = rewards.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, chunk.scalar_type(), "opd_topk_loss_bwd_chunk_cuda", [&] {
    using A = acc_t<typename glue::kernel_type<scalar_t>::type>;
    auto* p = glue::kptr_mut<scalar_t>(chunk);
    glue::raise_cuda_status(
        cuda::opd_topk_loss_backward(p, chunk.size(0), chunk.size(1), chunk.stride(0), 1, vocab_offset, temperature,
                                     l.const_data_ptr<A>(), idc.const_data_ptr<int64_t>(), r.const_data_ptr<A>(),
                                     idc.size(1), g.const_data_ptr<A>(), p, chunk.stride(0), call.launch),
        "chunk", "ids");
  });
}

std::tuple<Tensor, Tensor, Tensor> renorm_kl_fwd_cuda(const Tensor& z, const Tensor& tlp, const Tensor& valid,
                                                      double temperature) {
  glue::check_renorm_args(z, tlp, valid, temperature);
  const auto acc = glue::acc_dtype(z.scalar_type());
  glue::CudaCall call(z);
  const Tensor zc = z.to(acc).contiguous(), t = tlp.to(acc).contiguous(), v = valid.contiguous();
  Tensor loss = call.output({z.size(0)}, zc.options()), pbar = call.output(zc.sizes(), zc.options()),
         lr = call.output(zc.sizes(), zc.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "renorm_kl_fwd_cuda", [&] {
    glue::raise_cuda_status(
        cuda::renorm_kl_forward<scalar_t>(zc.size(0), zc.size(1), zc.const_data_ptr<scalar_t>(),
                                          t.const_data_ptr<scalar_t>(), v.const_data_ptr<bool>(), temperature,
                                          loss.mutable_data_ptr<scalar_t>(), pbar.mutable_data_ptr<scalar_t>(),
                                          lr.mutable_data_ptr<scalar_t>(), call.launch),
        "set_logits", "ids");
  });
  return {loss, pbar, lr};
}

Tensor renorm_kl_bwd_cuda(const Tensor& grad_loss, const Tensor& pbar, const Tensor& lr, const Tensor& loss,
                          double temperature) {
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == pbar.size(0), "grad_loss must be [tokens]");
  glue::check_same_device(grad_loss, "grad_loss", pbar, "pbar");
  glue::CudaCall call(pbar);
  const Tensor g = grad_loss.to(pbar.scalar_type()).contiguous(), p = pbar.contiguous(), r = lr.contiguous(),
               l = loss.contiguous();
  Tensor grad = at::empty_like(p);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "renorm_kl_bwd_cuda", [&] {
    glue::raise_cuda_status(
        cuda::renorm_kl_backward<scalar_t>(p.size(0), p.size(1), p.const_data_ptr<scalar_t>(),
                                           r.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>(),
                                           g.const_data_ptr<scalar_t>(), temperature,
                                           grad.mutable_data_ptr<scalar_t>(), call.launch),
        "pbar", "ids");
  });
  return grad;
}

}  // namespace

OPDCORE_CUDA_LIBRARY_IMPL(m) {
  m.impl("opd_rewards", &opd_rewards_cuda);
  m.impl("opd_topk_loss_fwd", &opd_topk_loss_fwd_cuda);
  m.impl("opd_topk_loss_bwd", &opd_topk_loss_bwd_cuda);
  m.impl("opd_topk_loss_bwd_chunk_", &opd_topk_loss_bwd_chunk_cuda);
  m.impl("renorm_kl_fwd", &renorm_kl_fwd_cuda);
  m.impl("renorm_kl_bwd", &renorm_kl_bwd_cuda);
}

}  // namespace opdcore
