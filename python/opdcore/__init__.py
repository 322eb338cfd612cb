"""opdcore: kernels and a trainer for on-policy distillation of language models."""
from opdcore._native import build_info
from opdcore.ops import (
    StreamState,
    TokenSet,
    build_token_set,
    dense_divergence,
    linear_topk,
    logprobs_at,
    opd_topk_loss,
    opd_topk_loss_linear,
    renorm_topk_kl,
    sample_tokens,
    tail_topk_kl,
    topk_logprobs,
)
from opdcore.packing import PackedBatch, PackedBuffer, from_padded, split_micro_batches, to_padded

__version__ = build_info()["version"]
