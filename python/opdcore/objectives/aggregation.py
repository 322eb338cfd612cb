"""How per-token losses become one number (METHOD.md 2.3): the aggregation modes as per-token weights.

Every mode is a weighted sum, sum_t w_t * loss_t, so the trainer forms the weights once per batch (over all
ranks and micro-batches) and the kernels fold them into the gradient they form in the forward; `aggregate` is
the same definition applied to one packed stream. Names follow verl's `loss_agg_mode`.
"""
from __future__ import annotations

from typing import Optional

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def check_aggregation(mode: str, norm_length: Optional[float] = None) -> None:
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    if mode == "seq-mean-token-sum-norm" and not (norm_length and norm_length > 0):
        raise ValueError("aggregation 'seq-mean-token-sum-norm' needs norm_length > 0 (verl's loss_scale_factor: "
                         f"a constant such as the maximum response length), got {norm_length!r}")


def aggregation_weights(seq_lengths: torch.Tensor, mode: str, num_tokens: float, num_seqs: float,
                        norm_length: Optional[float] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token weights [N] given each token's sequence length in loss tokens (seq_lengths [N]) and the batch's
    totals (every rank's): token-mean 1/num_tokens; seq-mean-token-mean 1/(num_seqs * length);
    seq-mean-token-sum 1/num_seqs; seq-mean-token-sum-norm 1/(num_seqs * norm_length) (Dr. GRPO's constant
    normaliser: no length bias), in `dtype`."""
    check_aggregation(mode, norm_length)
    lengths = seq_lengths.to(dtype)
    if mode == "token-mean":
        return torch.full_like(lengths, 1.0 / max(num_tokens, 1.0))
    if mode == "seq-mean-token-mean":
        return 1.0 / (max(num_seqs, 1.0) * lengths.clamp(min=1))
    scale = 1.0 if mode == "seq-mean-token-sum" else float(norm_length)
    return torch.full_like(lengths, 1.0 / (max(num_seqs, 1.0) * scale))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              cu_seqlens: Optional[torch.Tensor] = None, norm_length: Optional[float] = None) -> torch.Tensor:
    """Reduce a per-token loss [N] over the masked (response) tokens of one packed stream.

    The seq-* modes need cu_seqlens (int [B+1]) of the stream; sequences without masked tokens are skipped (not
    averaged in as 0). seq-mean-token-sum-norm also needs norm_length.
    """
    check_aggregation(mode, norm_length)
    if per_token.shape != mask.shape or per_token.dim() != 1:
        raise ValueError(f"per-token loss {tuple(per_token.shape)} and mask {tuple(mask.shape)} must both be [N]")
    m = mask.to(torch.bool)
    if mode == "token-mean":
        seq_len = torch.zeros_like(per_token, dtype=torch.float32)
        num_seqs = 1.0
    else:
        if cu_seqlens is None:
            raise ValueError(f"aggregation {mode!r} needs cu_seqlens")
        if cu_seqlens.dim() != 1 or int(cu_seqlens[-1]) != per_token.shape[0]:
            raise ValueError(f"cu_seqlens must be 1-D ending at N={per_token.shape[0]}")
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(per_token.device)
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=per_token.device), lengths)
        counts = torch.zeros(lengths.numel(), device=per_token.device).index_add_(0, seq, m.float())
        seq_len = counts[seq]
        num_seqs = float((counts > 0).sum())
    w = aggregation_weights(seq_len, mode, float(m.sum()), num_seqs, norm_length, dtype=per_token.dtype)
    return (per_token * w * m.to(per_token.dtype)).sum()
