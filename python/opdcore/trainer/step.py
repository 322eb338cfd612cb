"""One OPD step after the rollouts: score (student, then teacher), build token sets, update the student."""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from opdcore.config import Config
from opdcore.losses import default_weight_mode
from opdcore.ops import build_token_set, canonical_strategy, opd_rewards
from opdcore.ops.policy import PPOClip
from opdcore.parallel.tensor_parallel import clip_grad_norm
from opdcore.trainer.microbatch import MicroBatch


def autocast(cfg: Config, device: torch.device, cache: bool = True):
    """model.autocast's context. The update's forward passes cache=False: autocast keeps a bfloat16 copy of every
    weight it casts until the context exits, which there would hold all of them through the backward, where
    gradient checkpointing needs only one layer's at a time."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.model.autocast != "none",
                          cache_enabled=cache)


@dataclass
class Scored:
    """Per-response-token results of one micro-batch (all [R] or [R, k])."""
    student_ids: Optional[torch.Tensor]
    student_logprobs: Optional[torch.Tensor]
    student_entropy: torch.Tensor
    student_sampled_lp: torch.Tensor  # log p(y_t) at the rollout temperature
    teacher_ids: Optional[torch.Tensor]
    teacher_topk_lp: Optional[torch.Tensor]
    teacher_on_student_lp: Optional[torch.Tensor]  # log q on the student's top-k ids
    teacher_entropy: torch.Tensor
    teacher_sampled_lp: torch.Tensor  # log q(y_t)


@torch.no_grad()
def score(student, teacher, mb: MicroBatch, cfg: Config) -> Scored:
    k = cfg.loss.topk
    s = student(mb.input_ids, mb.attention_mask, mb.pred_index, "score", k=k,
                temperature=cfg.rollout.temperature, ids=mb.targets[:, None])
    t_ids = mb.targets[:, None] if k == 0 else torch.cat([s.ids, mb.targets[:, None]], dim=1)
    t = teacher(mb.input_ids, mb.attention_mask, mb.pred_index, "score", k=k,
                temperature=cfg.loss.teacher_temperature, ids=t_ids)
    return Scored(
        student_ids=s.ids if k else None, student_logprobs=s.logprobs if k else None,
        student_entropy=s.entropy, student_sampled_lp=s.target_logprobs[:, 0],
        teacher_ids=t.ids if k else None, teacher_topk_lp=t.logprobs if k else None,
        teacher_on_student_lp=t.target_logprobs[:, :k] if k else None,
        teacher_entropy=t.entropy, teacher_sampled_lp=t.target_logprobs[:, -1])


def token_set(sc: Scored, mb: MicroBatch, cfg: Config):
    """(ids, teacher log-probs, valid, weight mode) of the tokens that carry a reward at each position."""
    if cfg.loss.topk == 0:  # sampled-token OPD: the sampled token alone, weight 1
        ids = mb.targets[:, None]
        return ids, sc.teacher_sampled_lp[:, None], torch.ones_like(ids, dtype=torch.bool), "none"
    ts = build_token_set(sc.student_ids, sc.teacher_ids, cfg.loss.strategy, sc.teacher_on_student_lp,
                         sc.teacher_topk_lp)
    mode = default_weight_mode(cfg.loss.strategy) if cfg.loss.weight_mode == "auto" else cfg.loss.weight_mode
    return ts.ids, ts.teacher_logprobs, ts.valid, mode


@dataclass
class PolicyTerms:
    """What the PPO surrogate needs of a micro-batch with several updates per batch (METHOD.md 2.3), fixed when
    the rollouts are scored: the student's log-probs on the token set then and the advantages (the OPD rewards
    of that student). The outcome term needs only the clip (its old log-prob is the scored sampled token's)."""
    clip: PPOClip
    old_logprobs: Optional[torch.Tensor] = None  # [R, K]
    advantages: Optional[torch.Tensor] = None  # [R, K]


def objective(cfg: Config) -> str:
    """The student forward's loss mode: "dense", "renorm_kl", "tail_kl" (true divergences, minimised as they are)
    or "loss" (the reward-weighted OPD loss, a PPO surrogate with several updates per batch)."""
    lo = cfg.loss
    return "dense" if lo.dense != "none" else "renorm_kl" if lo.renorm_kl else "tail_kl" if lo.tail_kl else "loss"


def ppo_clip(cfg: Config) -> PPOClip:
    lo = cfg.loss.ppo_clip
    return PPOClip(lo, lo if cfg.loss.ppo_clip_high is None else cfg.loss.ppo_clip_high, cfg.loss.ppo_dual_clip)


@torch.no_grad()
def policy_terms(student, mb: MicroBatch, sc: Scored, token_set, cfg: Config) -> PolicyTerms:
    """The micro-batch's PolicyTerms. The student's log-probs on its own top-k (or the sampled token) come from
    the scoring pass; sets with teacher ids (teacher, union, symmetric_difference) take one more student pass."""
    clip = ppo_clip(cfg)
    if objective(cfg) != "loss":  # true divergences: no surrogate, no ratio
        return PolicyTerms(clip)
    ids, tq, valid, mode = token_set
    if cfg.loss.topk == 0:
        old = sc.student_sampled_lp[:, None]
    elif canonical_strategy(cfg.loss.strategy) in ("student", "intersection"):  # the set's ids are S_t
        old = sc.student_logprobs
    else:
        old = student(mb.input_ids, mb.attention_mask, mb.pred_index, "score", k=0,
                      temperature=cfg.rollout.temperature, ids=ids).target_logprobs
    adv = opd_rewards(old, tq, valid, weight_mode=mode, log_ratio_clip=cfg.loss.log_ratio_clip)[0]
    return PolicyTerms(clip, old, adv)


def rollout_correction(mb: MicroBatch, sc: Scored, cap: float) -> torch.Tensor:
    """[R] truncated importance weights min(p_trainer(y_t) / p_rollout(y_t), cap) of the sampled tokens: the
    rollouts were drawn by the engine's sampler, whose numerics (vLLM's kernels, bf16) differ from the trainer's
    forward. 1 where the engine reported no log-prob."""
    ratio = torch.exp(sc.student_sampled_lp - mb.rollout_logprobs.to(sc.student_sampled_lp.dtype))
    return torch.where(torch.isfinite(mb.rollout_logprobs), ratio.clamp(max=cap), torch.ones_like(ratio))


def mini_batch_groups(count: int, mini_batches: int) -> List[List[int]]:
    """Micro-batch indices [0, count) in mini_batches contiguous, near-equal groups (one optimizer step each)."""
    bounds = [round(i * count / mini_batches) for i in range(mini_batches + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(mini_batches)]


def token_weights(mbs: List[Optional[MicroBatch]], lengths: Dict[int, int], aggregation: str,
                  global_tokens: float, global_seqs: float, world: int) -> List[Optional[torch.Tensor]]:
    """Per-token weights that turn the sum of per-token losses into the configured mean over all ranks.

    FSDP averages gradients over ranks, so each rank's weights are scaled by the world size.
    """
    out = []
    for mb in mbs:
        if mb is None:
            out.append(None)
            continue
        if aggregation == "token-mean":
            w = torch.full((mb.num_tokens,), world / global_tokens)
        else:
            per_seq = torch.tensor([lengths[int(i)] for i in mb.token_seq.tolist()], dtype=torch.float32)
            w = world / global_seqs / (per_seq if aggregation == "seq-mean-token-mean" else torch.ones_like(per_seq))
        out.append(w.to(mb.targets.device))
    return out


def grpo_advantages(prompt_index: List[int], rewards: List[float], eps: float = 1e-6) -> torch.Tensor:
    """Outcome advantage per rollout: the reward normalised within its prompt's group of n samples
    (METHOD.md 2.6). A group whose rewards are all equal carries no signal: advantage 0."""
    r = torch.tensor(rewards, dtype=torch.float32)
    group = torch.tensor(prompt_index)
    adv = torch.zeros_like(r)
    for g in group.unique():
        m = group == g
        std = r[m].std(unbiased=False)
        adv[m] = (r[m] - r[m].mean()) / (std + eps) if std > 0 else 0.0
    return adv


def outcome_terms(mbs: List[Optional[MicroBatch]], scored, advantages: Optional[torch.Tensor]):
    """Per micro-batch (sampled ids, log p(y_t) at rollout time, advantage of each token) for the hybrid loss."""
    if advantages is None:
        return [None] * len(mbs)
    return [None if mb is None else (mb.targets[:, None], sc.student_sampled_lp,
                                     advantages.to(mb.targets.device)[mb.token_seq])
            for mb, sc in zip(mbs, scored)]


def _dense_terms(teacher, mb: MicroBatch, cfg: Config) -> dict:
    """What the student's "dense" loss needs of the teacher: its hidden states and LM head (or its logits), and
    the factor that makes softmax(teacher logits * factor / rollout temperature) its distribution at
    loss.teacher_temperature (the dense divergences take one temperature for both sides)."""
    with torch.no_grad():
        head = teacher(mb.input_ids, mb.attention_mask, mb.pred_index, "head")
    return dict(teacher_head=head, teacher_scale=cfg.rollout.temperature / cfg.loss.teacher_temperature,
                divergence=cfg.loss.dense, beta=cfg.loss.dense_beta)


def update(student, optimizer, mbs: List[Optional[MicroBatch]], sets, weights, cfg: Config, params, outcome=None,
           teacher=None, policy=None) -> Dict[str, float]:
    """One optimizer step: gradient accumulation over the micro-batches, grad clip, and the step (skipped when the
    gradient norm is not finite). With loss.dense the teacher runs again per micro-batch (its hidden states
    are never stored for the whole batch); with `policy` (several updates per batch) the reward-weighted
    losses are PPO surrogates and the clip counts come back too."""
    optimizer.zero_grad(set_to_none=True)
    total, clip_counts = 0.0, None
    real = [i for i, mb in enumerate(mbs) if mb is not None]
    for i, mb in enumerate(mbs):
        # a rank with too few rollouts replays its first micro-batch at weight 0: FSDP forwards are collectives
        j, scale = (i, 1.0) if mb is not None else (real[0], 0.0)
        mb, (ids, tq, valid, mode), w = mbs[j], sets[j], weights[j]
        mode_name = objective(cfg)
        with autocast(cfg, mb.input_ids.device, cache=False):  # the forward only: backward and step outside
            dense = _dense_terms(teacher, mb, cfg) if mode_name == "dense" else {}
            loss = student(mb.input_ids, mb.attention_mask, mb.pred_index, mode_name, ids=ids,
                           teacher_logprobs=tq, valid=valid, weight_mode=mode, temperature=cfg.rollout.temperature,
                           log_ratio_clip=cfg.loss.log_ratio_clip, token_weights=w * scale,
                           outcome=outcome[j] if outcome else None, outcome_weight=cfg.loss.outcome_weight,
                           ppo=policy[j] if policy else None, **dense)
        if isinstance(loss, tuple):  # the PPO surrogate: (loss, clip counts)
            loss, counts = loss
            if scale:
                clip_counts = counts if clip_counts is None else _add_counts(clip_counts, counts)
        loss.backward()
        total += float(loss.detach())
    grad_norm = clip_grad_norm(params, cfg.optim.grad_clip)  # FSDP2 / tensor-parallel DTensor gradients too
    skipped = not math.isfinite(grad_norm)
    if skipped:
        warnings.warn(f"gradient norm is {grad_norm}: skipping this optimizer step")
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    torch.clear_autocast_cache()  # the weights changed in place: an enclosing autocast block's copies are stale
    out = {"loss": total, "grad_norm": grad_norm, "step_skipped": float(skipped)}
    if clip_counts is not None:
        out["clip_counts"] = clip_counts
    return out


def _add_counts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge two ppo_clip_counts: sums add, the largest ratio is the larger."""
    return torch.cat([a[:3] + b[:3], torch.maximum(a[3:], b[3:])])


def merge_updates(updates: List[Dict]) -> Dict:
    """A training step's record of its optimizer steps: the mean loss and gradient norm, the skipped steps
    counted, the clip counts merged."""
    if len(updates) == 1:
        return updates[0]
    out = {"loss": sum(u["loss"] for u in updates) / len(updates),
           "grad_norm": sum(u["grad_norm"] for u in updates) / len(updates),
           "step_skipped": sum(u["step_skipped"] for u in updates), "optimizer_steps": float(len(updates))}
    counts = [u["clip_counts"] for u in updates if "clip_counts" in u]
    if counts:
        out["clip_counts"] = functools.reduce(_add_counts, counts)
    return out
