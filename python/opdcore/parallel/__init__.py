"""Parallel variants of the ops and models: vocabulary-parallel extraction and losses (each rank holds a
vocabulary shard) and DTensor tensor parallelism of decoder LMs whose LM-head shards feed them."""
from opdcore.parallel.tensor_parallel import clip_grad_norm, local_vocab, parallelize, tensor_parallel_plan
from opdcore.parallel.vocab_parallel import (
    shard_range,
    vocab_parallel_dense_divergence,
    vocab_parallel_linear_topk,
    vocab_parallel_opd_topk_loss,
    vocab_parallel_opd_topk_loss_linear_weighted,
    vocab_parallel_ppo_topk_loss,
    vocab_parallel_ppo_topk_loss_linear_weighted,
    vocab_parallel_renorm_topk_kl,
    vocab_parallel_tail_topk_kl,
    vocab_parallel_tail_topk_kl_linear_weighted,
    vocab_parallel_topk_logprobs,
)

__all__ = ["clip_grad_norm", "local_vocab", "parallelize", "tensor_parallel_plan", "shard_range",
           "vocab_parallel_dense_divergence", "vocab_parallel_linear_topk", "vocab_parallel_opd_topk_loss",
           "vocab_parallel_opd_topk_loss_linear_weighted", "vocab_parallel_ppo_topk_loss",
           "vocab_parallel_ppo_topk_loss_linear_weighted",
           "vocab_parallel_renorm_topk_kl", "vocab_parallel_tail_topk_kl",
           "vocab_parallel_tail_topk_kl_linear_weighted", "vocab_parallel_topk_logprobs"]
