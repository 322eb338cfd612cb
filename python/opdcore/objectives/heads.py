"""Where an objective reads a model's next-token distribution: the LM-head abstraction.

Three implementations, chosen once by type where the model's forward ends:
- LogitsHead: [R, V] logits (a model that post-processes its logits, or a user who already has them);
- FusedHead: hidden states [R, H] and the LM head [V, H]; the ops stream the head in row blocks and form the
  gradient in the forward, so [R, V] logits never exist;
- ShardHead: this rank's vocabulary shard of the head (tensor parallelism); the vocabulary-parallel ops combine
  the shards over `group`.

Every loss method returns the token-weighted sum sum_t w_t * loss_t (the aggregation's weights, see
opdcore.objectives.aggregation), so objectives never touch [R, V] and never care which head they got.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

import opdcore
from opdcore import ops
from opdcore import parallel as P
from opdcore.ops.loss import whole_head


class LMHead:
    """The interface (see the module docstring). `score` needs no gradient; the loss methods return
    (weighted sum, the op's per-token result) where the op has one, else the weighted sum."""

    def score(self, k: int, temperature: float, ids: Optional[torch.Tensor]) -> ops.StreamResult:
        raise NotImplementedError

    def set_loss(self, ids, teacher_logprobs, token_weights, valid=None, *, temperature, weight_mode="none",
                 log_ratio_clip=0.0, check_logprobs=True):
        """The reward-weighted set loss -sum_v sg(r(v)) log p(v) (METHOD.md 2.2-2.3): (sum, OPDLoss)."""
        raise NotImplementedError

    def ppo_set_loss(self, ids, old_logprobs, advantages, token_weights, valid=None, *, temperature, clip):
        """Its PPO surrogate with fixed advantages (several updates per batch): (sum, PPOLoss)."""
        raise NotImplementedError

    def renorm_kl(self, ids, teacher_logprobs, token_weights, valid=None, *, temperature):
        raise NotImplementedError

    def tail_kl(self, ids, teacher_logprobs, token_weights, valid=None, *, temperature):
        raise NotImplementedError

    def dense(self, teacher: "LMHead", token_weights, divergence: str, *, beta, temperature, teacher_scale):
        """A full-vocabulary divergence against the teacher's head; teacher logits are multiplied by
        teacher_scale (the two models' temperatures differ: softmax(z_t * scale / temperature))."""
        raise NotImplementedError

    def logits(self) -> torch.Tensor:
        raise NotImplementedError

    def as_teacher(self) -> "LMHead":
        """What a teacher hands to the student's dense divergence (may be called outside the model's forward)."""
        return self


class LogitsHead(LMHead):
    def __init__(self, logits: torch.Tensor):
        self._logits = logits

    def logits(self):
        return self._logits

    def score(self, k, temperature, ids):
        with torch.no_grad():
            top = opdcore.topk_logprobs(self._logits, max(k, 1), temperature)
            tgt = None if ids is None else opdcore.logprobs_at(self._logits, ids, temperature)[0]
        return ops.StreamResult(top.ids[:, :k], top.logprobs[:, :k], top.lse, top.entropy, tgt)

    def set_loss(self, ids, teacher_logprobs, token_weights, valid=None, *, temperature, weight_mode="none",
                 log_ratio_clip=0.0, check_logprobs=True):
        out = opdcore.opd_topk_loss(self._logits, ids, teacher_logprobs, valid, weight_mode=weight_mode,
                                    temperature=temperature, log_ratio_clip=log_ratio_clip,
                                    check_logprobs=check_logprobs)
        return (out.loss * token_weights).sum(), out

    def ppo_set_loss(self, ids, old_logprobs, advantages, token_weights, valid=None, *, temperature, clip):
        out = ops.ppo_topk_loss(self._logits, ids, old_logprobs, advantages, valid, temperature=temperature,
                                clip_low=clip.low, clip_high=clip.high, dual_clip=clip.dual)
        return (out.loss * token_weights).sum(), out

    def renorm_kl(self, ids, teacher_logprobs, token_weights, valid=None, *, temperature):
        return (opdcore.renorm_topk_kl(self._logits, ids, teacher_logprobs, valid, temperature=temperature)
                * token_weights).sum()

    def tail_kl(self, ids, teacher_logprobs, token_weights, valid=None, *, temperature):
        return (opdcore.tail_topk_kl(self._logits, ids, teacher_logprobs, valid, temperature=temperature).loss
                * token_weights).sum()

    def dense(self, teacher, token_weights, divergence, *, beta, temperature, teacher_scale):
        t_logits = teacher.logits() * teacher_scale
        per_token = opdcore.dense_divergence(self._logits, t_logits.to(self._logits.dtype), divergence, beta=beta,
                                             temperature=temperature)
        return (per_token * token_weights).sum()


class FusedHead(LMHead):
    """hidden [R, H] and the LM head weight [V, H]. weight_outlives_call=False (an FSDP-sharded model frees its
    gathered head when its forward returns): as a teacher it hands over its logits instead. max_block_elements:
    the row-block budget of the losses that form their gradient in the forward ([rows, V] logits per block)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, weight_outlives_call: bool = True,
                 max_block_elements: int = ops.DEFAULT_BLOCK_ELEMENTS):
        self.hidden, self.weight, self.weight_outlives_call = hidden, weight, weight_outlives_call
        self.block = dict(max_block_elements=max_block_elements)

    def logits(self):
        return self.hidden @ self.weight.T

    def as_teacher(self):
        return self if self.weight_outlives_call else LogitsHead(self.logits())

    def score(self, k, temperature, ids):
        return opdcore.linear_topk(self.hidden, self.weight, k, temperature=temperature, ids=ids)

    @torch.no_grad()
    def logprobs_at(self, ids: torch.Tensor, temperature: float, lse: torch.Tensor, rows: int = 1024):
        """log p at ids [R, m], given each row's log-sum-exp at this temperature (score's lse): m dot products per
        row, the head rows gathered a row block at a time. The logits are formed in the head's dtype as score forms
        them (bfloat16 logits round to 1/128 of their size), so they agree with lse; the log-probs come out in
        lse's dtype, at most 0."""
        out = torch.empty(ids.shape, dtype=lse.dtype, device=lse.device)
        whole = whole_head(self.weight.shape[0], ids.shape[1])
        for r0 in range(0, ids.shape[0], rows):
            r1 = min(ids.shape[0], r0 + rows)
            if whole:
                z = (self.hidden[r0:r1] @ self.weight.T).gather(1, ids[r0:r1]).to(lse.dtype)
            else:
                w = self.weight.index_select(0, ids[r0:r1].reshape(-1)).view(r1 - r0, ids.shape[1], -1)
                z = torch.bmm(w, self.hidden[r0:r1].unsqueeze(2)).squeeze(2).to(lse.dtype)
            out[r0:r1] = z / temperature - lse[r0:r1, None]
        return out.clamp_(max=0.0)

    def set_loss(self, ids, teacher_logprobs, token_weights, valid=None, *, temperature, weight_mode="none",
                 log_ratio_clip=0.0, check_logprobs=True):
        return ops.opd_topk_loss_linear_weighted(self.hidden, self.weight, ids, teacher_logprobs, token_weights,
                                                 valid, weight_mode=weight_mode, temperature=temperature,
                                                 log_ratio_clip=log_ratio_clip, check_logprobs=check_logprobs,
                                                 **self.block)

    def ppo_set_loss(self, ids, old_logprobs, advantages, token_weights, valid=None, *, temperature, clip):
        return ops.ppo_topk_loss_linear_weighted(self.hidden, self.weight, ids, old_logprobs, advantages,
                                                 token_weights, valid, temperature=temperature, clip_low=clip.low,
                                                 clip_high=clip.high, dual_clip=clip.dual, **self.block)

    def renorm_kl(self, ids, teacher_logprobs, token_weights, valid=None, *, temperature):
        # the normaliser cancels: only the set's k head rows per token
        return (ops.renorm_topk_kl_linear(self.hidden, self.weight, ids, teacher_logprobs, valid,
                                          temperature=temperature) * token_weights).sum()

    def tail_kl(self, ids, teacher_logprobs, token_weights, valid=None, *, temperature):
        return ops.tail_topk_kl_linear_weighted(self.hidden, self.weight, ids, teacher_logprobs, token_weights,
                                                valid, temperature=temperature, **self.block)[0]

    def dense(self, teacher, token_weights, divergence, *, beta, temperature, teacher_scale):
        if not isinstance(teacher, FusedHead):  # the teacher handed over logits: form the student's too
            return LogitsHead(self.logits()).dense(teacher, token_weights, divergence, beta=beta,
                                                   temperature=temperature, teacher_scale=teacher_scale)
        t_h, t_w = teacher.hidden.to(self.hidden.dtype), teacher.weight.to(self.hidden.dtype)
        return ops.dense_divergence_linear_weighted(self.hidden, self.weight, t_h, t_w, token_weights, divergence,
                                                    beta=beta, temperature=temperature,
                                                    teacher_logit_scale=teacher_scale, **self.block)[0]


class ShardHead(LMHead):
    """This rank's vocabulary shard: hidden [R, H], the shard's head rows [V_r, H], and shard_logits() giving
    [R, V_r] through the model's column-parallel head (whose backward all-reduces the hidden states' gradient).
    Extraction and the set losses stream the shard from hidden states; renorm_kl and the dense divergences take
    the shard's logits."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, group, shard_logits: Callable[[], torch.Tensor]):
        self.hidden, self.weight, self.group, self._shard_logits = hidden, weight, group, shard_logits

    def logits(self):
        return self._shard_logits()

    def as_teacher(self):
        return LogitsHead(self.logits())

    def score(self, k, temperature, ids):
        with torch.no_grad():
            return P.vocab_parallel_linear_topk(self.hidden, self.weight, k, ids=ids, temperature=temperature,
                                                group=self.group)

    def set_loss(self, ids, teacher_logprobs, token_weights, valid=None, *, temperature, weight_mode="none",
                 log_ratio_clip=0.0, check_logprobs=True):
        return P.vocab_parallel_opd_topk_loss_linear_weighted(
            self.hidden, self.weight, ids, teacher_logprobs, token_weights, valid, weight_mode=weight_mode,
            temperature=temperature, log_ratio_clip=log_ratio_clip, check_logprobs=check_logprobs, group=self.group)

    def ppo_set_loss(self, ids, old_logprobs, advantages, token_weights, valid=None, *, temperature, clip):
        return P.vocab_parallel_ppo_topk_loss_linear_weighted(
            self.hidden, self.weight, ids, old_logprobs, advantages, token_weights, valid, temperature=temperature,
            clip_low=clip.low, clip_high=clip.high, dual_clip=clip.dual, group=self.group)

    def renorm_kl(self, ids, teacher_logprobs, token_weights, valid=None, *, temperature):
        return (P.vocab_parallel_renorm_topk_kl(self.logits(), ids, teacher_logprobs, valid,
                                                temperature=temperature, group=self.group) * token_weights).sum()

    def tail_kl(self, ids, teacher_logprobs, token_weights, valid=None, *, temperature):
        return P.vocab_parallel_tail_topk_kl_linear_weighted(self.hidden, self.weight, ids, teacher_logprobs,
                                                             token_weights, valid, temperature=temperature,
                                                             group=self.group)[0]

    def dense(self, teacher, token_weights, divergence, *, beta, temperature, teacher_scale):
        logits = self.logits()
        t_logits = teacher.logits() * teacher_scale
        if t_logits.shape != logits.shape:
            raise ValueError(f"a dense divergence with tensor parallelism needs student and teacher LM heads of the "
                             f"same size (the same vocabulary shards): shard {tuple(logits.shape)} vs "
                             f"{tuple(t_logits.shape)}")
        per_token = P.vocab_parallel_dense_divergence(logits, t_logits.to(logits.dtype), divergence, beta=beta,
                                                      temperature=temperature, group=self.group)
        return (per_token * token_weights).sum()

