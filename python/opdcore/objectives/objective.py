"""The objectives: make_objective(spec)(head, terms) is one micro-batch's weighted loss on any LM head.

What a micro-batch brings (Terms) is plain tensors: the token set with the teacher's log-probs on it, each
token's aggregation weight, and where the spec asks for them the PPO terms, the outcome terms and the teacher's
head (dense divergences). How the set was scored and how the model was run is the caller's business.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from opdcore.metrics import ppo_clip_counts
from opdcore.objectives.heads import LMHead
from opdcore.objectives.spec import ObjectiveSpec
from opdcore.ops import TokenSet, build_token_set, opd_rewards, set_is_student_topk


@dataclass
class Terms:
    """One micro-batch's inputs to an objective; R response tokens, K set columns."""
    ids: torch.Tensor  # [R, K] int64 token set
    teacher_logprobs: torch.Tensor  # [R, K] log q on ids
    valid: torch.Tensor  # [R, K] bool
    token_weights: torch.Tensor  # [R] aggregation weights (opdcore.objectives.aggregation_weights)
    # several updates per batch: (old log p on ids [R, K], advantages [R, K]) fixed when the rollouts were scored
    ppo: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    # hybrid: (sampled ids [R, 1], log p(y_t) at rollout time [R], outcome advantage of each token [R])
    outcome: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
    teacher: Optional[LMHead] = None  # dense divergences: the teacher's head (LMHead.as_teacher())


@dataclass
class LossOut:
    loss: torch.Tensor  # scalar: sum_t w_t * loss_t (+ the outcome term)
    clip_counts: Optional[torch.Tensor] = None  # PPO surrogates: opdcore.metrics.ppo_clip_counts of the main term
    # reward-weighted losses: the reference fork's logged pg_loss, -sum_t w_t sum_v r(v) = sum_t w_t sum_v w(v) l(v)
    # (the loss's value, -sum sg(r) log p, has the same gradient but another meaning); no gradient
    pg_loss: Optional[torch.Tensor] = None


def token_set(spec: ObjectiveSpec, sampled_ids: torch.Tensor, teacher_sampled_lp: torch.Tensor,
              student_ids=None, teacher_ids=None, teacher_on_student_lp=None, teacher_topk_lp=None) -> TokenSet:
    """The set carrying a reward at each position: the sampled token alone (topk 0) or the strategy's set of the
    two models' top-k (opdcore.build_token_set), with the teacher's log-probs on it."""
    if spec.topk == 0:
        ids = sampled_ids.reshape(-1, 1)
        return TokenSet(ids, torch.ones_like(ids, dtype=torch.bool), teacher_sampled_lp.reshape(-1, 1))
    return build_token_set(student_ids, teacher_ids, spec.strategy, teacher_on_student_lp, teacher_topk_lp)


def set_is_scored_student_topk(spec: ObjectiveSpec) -> bool:
    """Whether the set's columns are the student's scored top-k (or the sampled token), so the rollout-time
    student's log-probs on it are already known; other sets take one more student pass."""
    return spec.topk == 0 or set_is_student_topk(spec.strategy)


def advantages(spec: ObjectiveSpec, old_logprobs: torch.Tensor, ts: TokenSet) -> torch.Tensor:
    """The PPO surrogate's fixed advantages: the OPD rewards of the student that scored the rollouts."""
    return opd_rewards(old_logprobs, ts.teacher_logprobs, ts.valid, weight_mode=spec.resolved_weight_mode,
                       log_ratio_clip=spec.log_ratio_clip)[0]


class Objective:
    needs_teacher_head = False  # Terms.teacher must hold the teacher's head (LMHead.as_teacher())

    def __init__(self, spec: ObjectiveSpec):
        self.spec = spec

    def __call__(self, head: LMHead, terms: Terms) -> LossOut:
        out = self.main(head, terms)
        if self.spec.outcome_weight and terms.outcome is not None:
            out.loss = out.loss + self.outcome(head, terms)
        return out

    def main(self, head: LMHead, terms: Terms) -> LossOut:
        raise NotImplementedError

    def outcome(self, head: LMHead, t: Terms):
        """The hybrid outcome term -A log p(y_t) (METHOD.md 2.6) through the set-loss kernels: with one update per
        batch as the OPD loss with q := p_rollout * e^A and weight 1 (its reward -(log p - log q) is A while p is
        the rollout-time p); with several, as a PPO surrogate on the sampled token."""
        sampled, lp_rollout, adv = t.outcome
        w, temp = t.token_weights * self.spec.outcome_weight, self.spec.temperature
        if self.spec.ppo is not None:
            return head.ppo_set_loss(sampled, lp_rollout[:, None], adv[:, None], w, temperature=temp,
                                     clip=self.spec.ppo)[0]
        return head.set_loss(sampled, (lp_rollout + adv)[:, None], w, temperature=temp, weight_mode="none",
                             check_logprobs=False)[0]


class RewardWeighted(Objective):
    """-sum_v sg(r(v)) log p(v) on the token set; with spec.ppo the clipped surrogate with fixed advantages."""

    def main(self, head, t):
        s = self.spec
        if s.ppo is None:
            total, out = head.set_loss(t.ids, t.teacher_logprobs, t.token_weights, t.valid,
                                       temperature=s.temperature, weight_mode=s.resolved_weight_mode,
                                       log_ratio_clip=s.log_ratio_clip)
            return LossOut(total, pg_loss=_pg_loss(out.rewards, t.token_weights))
        if t.ppo is None:
            raise ValueError("spec.ppo is set (several updates per batch): terms.ppo must hold the rollout-time "
                             "log-probs and advantages")
        old, adv = t.ppo
        total, out = head.ppo_set_loss(t.ids, old, adv, t.token_weights, t.valid, temperature=s.temperature,
                                       clip=s.ppo)
        return LossOut(total, ppo_clip_counts(out.student_logprobs, old, adv, out.coefficients, t.valid),
                       _pg_loss(torch.where(t.valid, adv, torch.zeros_like(adv)), t.token_weights))


def _pg_loss(rewards: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    return -(rewards.detach().sum(1) * token_weights.detach().to(rewards.dtype)).sum()


class RenormKL(Objective):
    def main(self, head, t):
        return LossOut(head.renorm_kl(t.ids, t.teacher_logprobs, t.token_weights, t.valid,
                                      temperature=self.spec.temperature))


class TailKL(Objective):
    def main(self, head, t):
        return LossOut(head.tail_kl(t.ids, t.teacher_logprobs, t.token_weights, t.valid,
                                    temperature=self.spec.temperature))


class Dense(Objective):
    needs_teacher_head = True

    def main(self, head, t):
        if t.teacher is None:
            raise ValueError("a dense divergence needs terms.teacher (the teacher's LMHead.as_teacher())")
        s = self.spec
        return LossOut(head.dense(t.teacher, t.token_weights, s.divergence, beta=s.beta, temperature=s.temperature,
                                  teacher_scale=s.teacher_scale))


OBJECTIVES = {"reward_weighted": RewardWeighted, "renorm_kl": RenormKL, "tail_kl": TailKL, "dense": Dense}


def make_objective(spec: ObjectiveSpec) -> Objective:
    return OBJECTIVES[spec.loss](spec)
