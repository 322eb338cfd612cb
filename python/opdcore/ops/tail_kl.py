"""The tail-aware top-k KL (METHOD.md 2.4): the exact reverse KL of the (k+1)-bin distributions, the set's ids plus
one bin for the rest of the vocabulary,

    loss_t = sum_{v in S} p(v) log(p(v) / q(v))  +  (1 - P) log((1 - P) / (1 - Q)),   P = sum_S p, Q = sum_S q,

with p, q full-vocabulary probabilities. Unlike the renormalised KL it moves the set's mass P toward the
teacher's Q, and it gives a gradient where the teacher's best token lies outside the student's set (through the
rest bin). Its gradient with respect to the student logits has the OPD loss's form:

    d loss / d z_u = (1/tau) (p_u a_u [u in S] - p_u sum_{v in S} p_v a_v),   a_v = l(v) - l_rest,
    l(v) = log p(v) - log q(v),   l_rest = log(1 - P) - log(1 - Q),

so the one-pass backward kernels of the reward-weighted loss serve it with coefficients c(v) = -p(v) a(v) (their
`rewards`): unfused, fused with the LM head (gradients formed in the forward) and vocabulary-parallel. What this
module adds is the rule that turns the set's log-probs into the loss and those coefficients, elementwise on
[N, K] (no vocabulary pass).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from opdcore.ops._device import check_devices
from opdcore.ops.loss import SetLossFunction, WeightedLinearSetLoss, prepare_set
from opdcore.ops.policy import _check_id_range
from opdcore.ops.topk import DEFAULT_BLOCK_ELEMENTS, check_linear

_ops = torch.ops.opdcore


class TailKL(NamedTuple):
    loss: torch.Tensor  # [N] per-token (k+1)-bin reverse KL (differentiable)
    coefficients: torch.Tensor  # [N, K] -p(v) (l(v) - l_rest), 0 outside the set
    student_logprobs: torch.Tensor  # [N, K] full-vocabulary log p at ids
    lse: torch.Tensor  # [N]


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (x near 0: the set holds nearly all the mass)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_kl_terms(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, valid: torch.Tensor,
                  log_ratio_clip: float = 0.0):
    """(coefficients [N, K], per-token loss [N]) of the tail-aware KL from the set's full-vocabulary log-probs.

    A rest bin that rounds to empty is floored at the smallest normal number (its term is then ~0, and the
    coefficients stay finite); a teacher log-prob of -inf at a valid entry where the student's is finite gives an
    infinite loss, as the KL is. log_ratio_clip > 0 clips l(v) and l_rest in the coefficients only (the loss
    reported is the true KL)."""
    lp = student_logprobs
    lq = teacher_logprobs.to(lp.dtype)
    ninf = torch.full((), -math.inf, dtype=lp.dtype, device=lp.device)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    lp_s = torch.where(valid, lp, ninf)
    lq_s = torch.where(valid, lq, ninf)
    floor = math.log(torch.finfo(lp.dtype).tiny)
    log_rest_p = _log1mexp(lp_s.logsumexp(-1)).clamp(min=floor)
    log_rest_q = _log1mexp(lq_s.logsumexp(-1)).clamp(min=floor)
    p = lp_s.exp()
    live = valid & (p > 0)  # p log(p / q) is 0 where p is
    ratio = torch.where(live, lp - lq, zero)
    rest = log_rest_p - log_rest_q
    loss = torch.where(live, p * ratio, zero).sum(-1) + log_rest_p.exp() * rest
    if log_ratio_clip > 0:
        ratio, rest = ratio.clamp(-log_ratio_clip, log_ratio_clip), rest.clamp(-log_ratio_clip, log_ratio_clip)
    coefficients = torch.where(live, -p * (ratio - rest[:, None]), zero)
    return coefficients, loss


class TailKLRule:
    """The set-loss rule of the tail-aware KL (see opdcore.ops.loss.SetLossFunction)."""

    def __init__(self, ids, tq, valid, temperature: float, clip: float):
        self.ids, self.tq, self.valid = ids, tq, valid
        self.temperature, self.clip = temperature, clip

    def from_logprobs(self, slp, r0: int, r1: int):
        coef, loss = tail_kl_terms(slp, self.tq[r0:r1], self.valid[r0:r1], self.clip)
        return loss, coef

    def from_logits(self, logits, r0: int, r1: int):
        slp, lse = _ops.logprobs_at(logits, self.ids[r0:r1], self.temperature)
        loss, coef = self.from_logprobs(slp, r0, r1)
        return loss, coef, slp, lse


def prepare_tail_kl(ids, teacher_logprobs, valid, rows: int, acc: torch.dtype, temperature: float,
                    log_ratio_clip: float) -> TailKLRule:
    """Checked inputs of the tail-aware KL as its rule (errors name the argument)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not log_ratio_clip >= 0:
        raise ValueError(f"log_ratio_clip must be >= 0 (0: off), got {log_ratio_clip}")
    ids, tq, valid = prepare_set(ids, teacher_logprobs, valid, rows)
    if not tq.is_floating_point():
        raise TypeError(f"teacher_logprobs must be a floating tensor, got {tq.dtype}")
    if valid.shape != ids.shape or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor of the shape of ids {tuple(ids.shape)}, got "
                         f"{tuple(valid.shape)} {valid.dtype}")
    if bool((valid & tq.isnan()).any()):
        raise ValueError("teacher_logprobs is NaN at a valid set entry")
    if ids.shape[1] > 1:  # the k+1 bins must be distinct ids: a repeated one would count its mass twice
        spare = -1 - torch.arange(ids.shape[1], device=ids.device)  # invalid entries never collide
        keys = torch.where(valid, ids, spare).sort(-1).values
        twice = (keys[:, 1:] == keys[:, :-1]).any(-1)
        if bool(twice.any()):
            raise ValueError(f"ids holds a valid id twice in row {int(twice.nonzero()[0, 0])}: the tail-aware KL's "
                             "bins must be distinct ids (mask repeats with valid)")
    return TailKLRule(ids.contiguous(), tq.to(acc).contiguous(), valid.contiguous(), float(temperature),
                      float(log_ratio_clip))


def tail_topk_kl(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                 valid: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                 log_ratio_clip: float = 0.0) -> TailKL:
    """Per-token tail-aware top-k KL of student_logits [N, V] on the token set ids [N, K] with the teacher's
    full-vocabulary log-probs there (teacher_logprobs [N, K]); valid [N, K] masks set entries. One pass over the
    logits forward, the OPD loss's one-pass kernel backward."""
    check_devices(student_logits=student_logits, ids=ids, teacher_logprobs=teacher_logprobs, valid=valid)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    _check_id_range(ids, student_logits.shape[1])
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    rule = prepare_tail_kl(ids, teacher_logprobs, valid, student_logits.shape[0], acc, temperature, log_ratio_clip)
    return TailKL(*SetLossFunction.apply(student_logits, rule))


def tail_topk_kl_linear_weighted(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                                 teacher_logprobs: torch.Tensor, token_weights: torch.Tensor,
                                 valid: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                                 log_ratio_clip: float = 0.0, max_block_elements: int = DEFAULT_BLOCK_ELEMENTS):
    """(sum_t token_weights[t] * loss_t, TailKL) on logits = hidden @ weight.T, gradients formed in the forward
    over row blocks (three head matmuls, never [N, V]; as opd_topk_loss_linear_weighted)."""
    check_devices(hidden=hidden, weight=weight, ids=ids, teacher_logprobs=teacher_logprobs,
                  token_weights=token_weights, valid=valid)
    check_linear(hidden, weight, None)
    _check_id_range(ids, weight.shape[0])
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rule = prepare_tail_kl(ids, teacher_logprobs, valid, hidden.shape[0], acc, temperature, log_ratio_clip)
    total, *out = WeightedLinearSetLoss.run(hidden, weight, rule, token_weights, max_block_elements)
    return total, TailKL(*out)
