"""OPD objectives (METHOD.md section 2) built on the kernel ops: token set + per-token loss + aggregation."""
from __future__ import annotations

from typing import Optional

import torch

from opdcore.ops import OPDLoss, TokenSet, canonical_strategy, opd_topk_loss, renorm_topk_kl

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def default_weight_mode(strategy: str) -> str:
    """student_p, except symmetric_difference, where the reference fork uses the raw p(v) (not renormalised)."""
    return "student_p_raw" if canonical_strategy(strategy) == "symmetric_difference" else "student_p"


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reduce a per-token loss [N] over the masked (response) tokens.

    token-mean: sum / number of masked tokens. seq-mean-token-mean: mean over sequences of each sequence's
    token mean. seq-mean-token-sum: mean over sequences of each sequence's token sum. The seq-* modes need
    cu_seqlens (int32 [B+1]) of the packed stream; sequences without masked tokens are skipped.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    if per_token.shape != mask.shape or per_token.dim() != 1:
        raise ValueError(f"per-token loss {tuple(per_token.shape)} and mask {tuple(mask.shape)} must both be [N]")
    m = mask.to(per_token.dtype)
    if mode == "token-mean":
        return (per_token * m).sum() / m.sum().clamp(min=1)
    if cu_seqlens is None:
        raise ValueError(f"aggregation {mode!r} needs cu_seqlens")
    if cu_seqlens.dim() != 1 or int(cu_seqlens[-1]) != per_token.shape[0]:
        raise ValueError(f"cu_seqlens must be 1-D ending at N={per_token.shape[0]}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=per_token.device), lengths)
    sums = torch.zeros(lengths.numel(), dtype=per_token.dtype, device=per_token.device).index_add_(0, seq, per_token * m)
    counts = torch.zeros_like(sums).index_add_(0, seq, m)
    has = counts > 0
    per_seq = sums / counts.clamp(min=1) if mode == "seq-mean-token-mean" else sums
    return per_seq[has].sum() / has.sum().clamp(min=1)


def topk_opd_loss(student_logits: torch.Tensor, token_set: TokenSet, mask: torch.Tensor, *,
                  strategy: str = "student", weight_mode: Optional[str] = None, temperature: float = 1.0,
                  log_ratio_clip: float = 0.0, aggregation: str = "token-mean",
                  cu_seqlens: Optional[torch.Tensor] = None, renorm_kl: bool = False):
    """Scalar OPD loss over response tokens and the per-token kernel outputs (for logging).

    token_set comes from opdcore.build_token_set with teacher log-probs filled in. renorm_kl=True uses the
    exact renormalised top-k reverse KL (METHOD.md 2.4) instead of the reward-weighted surrogate.
    """
    if token_set.teacher_logprobs is None:
        raise ValueError("token_set.teacher_logprobs is None: pass the teacher's log-probs to build_token_set")
    if renorm_kl:
        per_token = renorm_topk_kl(student_logits, token_set.ids, token_set.teacher_logprobs, token_set.valid,
                                   temperature=temperature)
        return aggregate(per_token, mask, aggregation, cu_seqlens), None
    out: OPDLoss = opd_topk_loss(student_logits, token_set.ids, token_set.teacher_logprobs, token_set.valid,
                                 weight_mode=weight_mode or default_weight_mode(strategy), temperature=temperature,
                                 log_ratio_clip=log_ratio_clip)
    return aggregate(out.loss, mask, aggregation, cu_seqlens), out
