"""Parallel variants of the ops: vocabulary-parallel extraction and losses (each rank holds a vocabulary shard)."""
from opdcore.parallel.vocab_parallel import (
    shard_range,
    vocab_parallel_dense_divergence,
    vocab_parallel_linear_topk,
    vocab_parallel_opd_topk_loss,
    vocab_parallel_renorm_topk_kl,
    vocab_parallel_topk_logprobs,
)

__all__ = ["shard_range", "vocab_parallel_dense_divergence", "vocab_parallel_linear_topk", "vocab_parallel_opd_topk_loss",
           "vocab_parallel_renorm_topk_kl", "vocab_parallel_topk_logprobs"]
