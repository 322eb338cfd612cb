"""The clipped (PPO) policy-gradient loss on a token set, for several updates per rollout batch (METHOD.md 2.3).

With one update per batch the student that is trained is the one that sampled, the PPO ratio is exactly 1 and
the OPD losses of opdcore.ops.loss are the whole story. With several epochs or mini-batches per batch the
student moves away from the one that scored the rollouts; then each set token v carries a fixed advantage A(v)
(the OPD reward r(v) of the rollout-time student, or any other advantage) and a ratio rho(v) = p(v) / p_old(v),
and the per-token loss is the PPO surrogate with the dual clip of the reference fork:

    l(v) = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)),   for A < 0 also min(l(v), -c A),
    loss_t = sum_{v in set} l(v).

Its gradient with respect to the student logits has the form of the OPD loss's, with coefficients
A(v) rho(v) where the unclipped term is the active one and 0 where a clip holds, so the same one-pass backward
kernels (unfused, fused with the LM head, vocabulary-parallel) serve it: only the rule that turns the set's
log-probs into coefficients differs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from opdcore.ops._device import check_device, check_devices
from opdcore.ops.loss import SetLossFunction, WeightedLinearSetLoss, prepare_set
from opdcore.ops.topk import DEFAULT_BLOCK_ELEMENTS, as_long, check_linear

_ops = torch.ops.opdcore


class PPOLoss(NamedTuple):
    loss: torch.Tensor  # [N] per-token surrogate loss (differentiable)
    coefficients: torch.Tensor  # [N, K] A * rho where the unclipped term is active, 0 where clipped / outside
    student_logprobs: torch.Tensor  # [N, K] current full-vocabulary log p at ids
    lse: torch.Tensor  # [N]


class PPOClip(NamedTuple):
    low: float = 0.2  # rho is clipped to [1 - low, 1 + high]
    high: float = 0.2  # "clip-higher" (DAPO) when larger than low
    dual: float = 3.0  # for A < 0 the loss is capped at -dual * A (0: off)


def check_clip(clip_low: float, clip_high: Optional[float], dual_clip: float) -> PPOClip:
    high = clip_low if clip_high is None else clip_high
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if high < 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip != 0 and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (0: off), got {dual_clip}")
    return PPOClip(float(clip_low), float(high), float(dual_clip))


def ppo_coefficients(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     valid: torch.Tensor, clip: PPOClip = PPOClip()):
    """(coefficients [N, K], per-token loss [N]) from the set's current and rollout-time log-probs.

    No vocabulary pass: elementwise on [N, K]. The coefficient is d(-loss_t)/d log p(v); entries outside the
    set (valid False) get 0 and contribute nothing.
    """
    ratio = torch.exp(logprobs - old_logprobs.to(logprobs.dtype))
    adv = advantages.to(logprobs.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip.low, 1.0 + clip.high)
    per_id = torch.maximum(unclipped, clipped)
    active = unclipped >= clipped  # inside the clip range the two are equal and the gradient is the unclipped one
    if clip.dual:
        capped = (adv < 0) & (per_id > -clip.dual * adv)
        per_id = torch.where(capped, -clip.dual * adv, per_id)
        active &= ~capped
    zero = torch.zeros_like(per_id)
    coefficients = torch.where(valid & active, adv * ratio, zero)
    return coefficients, torch.where(valid, per_id, zero).sum(-1)


class PPORule:
    """The set-loss rule of the PPO surrogate (see opdcore.ops.loss.SetLossFunction)."""

    def __init__(self, ids, old_logprobs, advantages, valid, temperature: float, clip: PPOClip):
        self.ids, self.old, self.adv, self.valid = ids, old_logprobs, advantages, valid
        self.temperature, self.clip = temperature, clip

    def from_logprobs(self, slp, r0: int, r1: int):
        coef, loss = ppo_coefficients(slp, self.old[r0:r1], self.adv[r0:r1], self.valid[r0:r1], self.clip)
        return loss, coef

    def from_logits(self, logits, r0: int, r1: int):
        slp, lse = _ops.logprobs_at(logits, self.ids[r0:r1], self.temperature)
        loss, coef = self.from_logprobs(slp, r0, r1)
        return loss, coef, slp, lse


def _check_id_range(ids, vocab: int) -> None:
    if isinstance(ids, torch.Tensor) and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"ids holds an id outside [0, vocab={vocab})")


def prepare_ppo(ids, old_logprobs, advantages, valid, rows: int, acc: torch.dtype, temperature: float,
                clip_low: float, clip_high: Optional[float], dual_clip: float) -> PPORule:
    """Checked inputs of the PPO losses as their rule (errors name the argument)."""
    clip = check_clip(clip_low, clip_high, dual_clip)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids, old, valid = prepare_set(as_long(ids, "ids"), old_logprobs, valid, rows, name="old_logprobs")
    for name, t in (("old_logprobs", old), ("advantages", advantages)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {getattr(t, 'dtype', type(t))}")
    if advantages.shape != ids.shape:
        raise ValueError(f"advantages must have the shape of ids {tuple(ids.shape)}, got {tuple(advantages.shape)}")
    if valid.shape != ids.shape or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor of the shape of ids {tuple(ids.shape)}, got "
                         f"{tuple(valid.shape)} {valid.dtype}")
    for name, t in (("old_logprobs", old), ("advantages", advantages)):
        bad = valid & ~torch.isfinite(t)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} is not finite at a valid set entry (row {row}): the rollout-time student "
                             f"must give every set token a finite log-prob and advantage")
    return PPORule(ids.contiguous(), old.detach().to(acc).contiguous(), advantages.detach().to(acc).contiguous(),
                   valid.contiguous(), float(temperature), clip)


def ppo_topk_loss(student_logits: torch.Tensor, ids: torch.Tensor, old_logprobs: torch.Tensor,
                  advantages: torch.Tensor, valid: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                  clip_low: float = 0.2, clip_high: Optional[float] = None, dual_clip: float = 3.0) -> PPOLoss:
    """Per-token clipped surrogate loss on the token set ids [N, K] of student_logits [N, V].

    old_logprobs [N, K]: full-vocabulary log p of the student that scored the rollouts (at the same
    temperature), advantages [N, K] fixed per set entry (for OPD: the rewards r(v) of that student, e.g.
    opdcore.ops.opd_topk_loss(...).rewards). The backward is the OPD loss's one-pass kernel. clip_high defaults
    to clip_low; dual_clip 0 turns the dual clip off.
    """
    check_devices(student_logits=student_logits, ids=ids, old_logprobs=old_logprobs, advantages=advantages, valid=valid)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    _check_id_range(ids, student_logits.shape[1])
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    rule = prepare_ppo(ids, old_logprobs, advantages, valid, student_logits.shape[0], acc, temperature, clip_low,
                       clip_high, dual_clip)
    return PPOLoss(*SetLossFunction.apply(student_logits, rule))


def ppo_topk_loss_linear_weighted(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                                  old_logprobs: torch.Tensor, advantages: torch.Tensor, token_weights: torch.Tensor,
                                  valid: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                                  clip_low: float = 0.2, clip_high: Optional[float] = None, dual_clip: float = 3.0,
                                  max_block_elements: int = DEFAULT_BLOCK_ELEMENTS):
    """(sum_t token_weights[t] * loss_t, PPOLoss) of ppo_topk_loss on logits = hidden @ weight.T, gradients formed
    in the forward over row blocks (as opd_topk_loss_linear_weighted: three head matmuls, never [N, V])."""
    check_devices(hidden=hidden, weight=weight, ids=ids,
                  old_logprobs=old_logprobs, advantages=advantages, token_weights=token_weights, valid=valid)
    check_linear(hidden, weight, None)
    _check_id_range(ids, weight.shape[0])
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rule = prepare_ppo(ids, old_logprobs, advantages, valid, hidden.shape[0], acc, temperature, clip_low, clip_high,
                       dual_clip)
    total, *out = WeightedLinearSetLoss.run(hidden, weight, rule, token_weights, max_block_elements)
    return total, PPOLoss(*out)
