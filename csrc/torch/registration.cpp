// Schemas of every opdcore operator. Implementations register per dispatch key in the *_ops.cpp files
// (CPU) and csrc/torch/cuda/ (CUDA); the Python layer adds fake kernels and autograd.
#include <torch/library.h>

// The CUDA emulator's build (scripts/build_cuda_emu.sh) registers the same schemas as opdcore_emu.
#ifndef OPDCORE_LIBRARY
#define OPDCORE_LIBRARY opdcore
#endif
#define OPDCORE_DEFINE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

OPDCORE_DEFINE_LIBRARY(OPDCORE_LIBRARY, m) {
  // Streaming top-k over full rows.
  m.def("topk_logprobs(Tensor logits, int k, float temperature=1.0) -> (Tensor ids, Tensor logprobs, Tensor lse, Tensor entropy)");
  m.def("logprobs_at(Tensor logits, Tensor ids, float temperature=1.0) -> (Tensor logprobs, Tensor lse)");
  // Fused LM-head top-k in one tiled kernel (CUDA only: kernel 0 the SIMT mainloop, 1 CUTLASS's sm_90a one).
  m.def("linear_topk_tiled(Tensor hidden, Tensor weight, int k, float temperature=1.0, int kernel=0) "
        "-> (Tensor ids, Tensor logprobs, Tensor lse, Tensor entropy)");
  // Streaming state over vocabulary chunks (state tensors are updated in place).
  m.def("stream_update(Tensor(a!) max, Tensor(b!) sumexp, Tensor(c!) ent, Tensor(d!) heap_vals, Tensor(e!) heap_ids, "
        "Tensor target_ids, Tensor(f!) target_vals, Tensor logits, int vocab_offset, float temperature) -> ()");
  m.def("stream_merge(Tensor(a!) max, Tensor(b!) sumexp, Tensor(c!) ent, Tensor(d!) heap_vals, Tensor(e!) heap_ids, "
        "Tensor(f!) target_vals, Tensor max_b, Tensor sumexp_b, Tensor ent_b, Tensor heap_vals_b, Tensor heap_ids_b, "
        "Tensor target_vals_b) -> ()");
  m.def("stream_finalize(Tensor max, Tensor sumexp, Tensor ent, Tensor heap_vals, Tensor heap_ids, Tensor target_vals) "
        "-> (Tensor ids, Tensor logprobs, Tensor lse, Tensor entropy, Tensor target_logprobs)");
  // Sparse top-k OPD loss.
  m.def("opd_rewards(Tensor student_logprobs, Tensor teacher_logprobs, Tensor valid, int weight_mode, float clip) "
        "-> (Tensor rewards, Tensor loss)");
  m.def("opd_topk_loss_fwd(Tensor logits, Tensor ids, Tensor teacher_logprobs, Tensor valid, int weight_mode, "
        "float temperature, float clip) -> (Tensor loss, Tensor rewards, Tensor student_logprobs, Tensor lse)");
  m.def("opd_topk_loss_bwd(Tensor grad_loss, Tensor logits, Tensor lse, Tensor ids, Tensor rewards, float temperature) -> Tensor");
  m.def("opd_topk_loss_bwd_chunk_(Tensor(a!) chunk, int vocab_offset, Tensor grad_loss, Tensor lse, Tensor ids, "
        "Tensor rewards, float temperature) -> ()");
  m.def("renorm_kl_fwd(Tensor set_logits, Tensor teacher_logprobs, Tensor valid, float temperature) "
        "-> (Tensor loss, Tensor pbar, Tensor log_ratio)");
  m.def("renorm_kl_bwd(Tensor grad_loss, Tensor pbar, Tensor log_ratio, Tensor loss, float temperature) -> Tensor");
  // Dense divergences between student and teacher logits (kind 0 forward KL, 1 reverse KL, 2 JSD(beta)).
  m.def("dense_divergence_fwd(Tensor student_logits, Tensor teacher_logits, int kind, float beta, float temperature, "
        "Tensor? lse_s=None, Tensor? lse_t=None) -> (Tensor loss, Tensor lse_s, Tensor lse_t, Tensor aux)");
  m.def("dense_divergence_bwd(Tensor grad_loss, Tensor student_logits, Tensor teacher_logits, Tensor lse_s, "
        "Tensor lse_t, Tensor aux, int kind, float beta, float temperature) -> Tensor");
  // The rollout's next-token draw by inverse CDF, with the drawn token's log-prob (temperature 0: greedy).
  m.def("sample_tokens(Tensor scores, Tensor uniform, float temperature=1.0) -> (Tensor ids, Tensor logprobs)");
  // Packed sequences: padded [B, T, ...] <-> packed [N, ...].
  m.def("pad_packed(Tensor packed, Tensor cu_seqlens, int max_seqlen, float pad_value=0.0) -> Tensor");
  m.def("unpad_packed(Tensor padded, Tensor cu_seqlens) -> Tensor");
}
