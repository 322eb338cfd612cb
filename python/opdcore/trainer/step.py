"""One OPD step after the rollouts: score (teacher, and the student unless the update scores it), build token sets,
update the student."""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from opdcore import objectives as O
from opdcore.config import Config, several_updates
from opdcore.objectives import FusedHead, ObjectiveSpec
from opdcore.ops import TokenSet
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
    # scored in the update (score_teacher): the teacher's hidden states [R, H] and log-sum-exp [R] at
    # loss.teacher_temperature, until the update fills in the student's fields and teacher_on_student_lp
    teacher_hidden: Optional[torch.Tensor] = None
    teacher_lse: Optional[torch.Tensor] = None


def objective_spec(cfg: Config) -> ObjectiveSpec:
    """The trainer config's loss as an ObjectiveSpec (the PPO clip only when a batch gets several updates)."""
    lo = cfg.loss
    loss = "dense" if lo.dense != "none" else "renorm_kl" if lo.renorm_kl else "tail_kl" if lo.tail_kl \
        else "reward_weighted"
    return ObjectiveSpec(
        loss=loss, topk=lo.topk, strategy=lo.strategy, weight_mode=lo.weight_mode, log_ratio_clip=lo.log_ratio_clip,
        divergence=lo.dense if lo.dense != "none" else "reverse_kl", beta=lo.dense_beta,
        temperature=cfg.rollout.temperature, teacher_temperature=lo.teacher_temperature,
        ppo=ppo_clip(cfg) if several_updates(cfg) else None, outcome_weight=lo.outcome_weight,
        aggregation=lo.aggregation, norm_length=lo.aggregation_norm or cfg.rollout.max_new_tokens)


def ppo_clip(cfg: Config) -> PPOClip:
    lo = cfg.loss
    return PPOClip(lo.ppo_clip, lo.ppo_clip if lo.ppo_clip_high is None else lo.ppo_clip_high, lo.ppo_dual_clip)


def _run(model, mb: MicroBatch, use):
    """model's forward on the micro-batch's response positions, ending in use(LMHead)."""
    return model(mb.input_ids, mb.attention_mask, mb.pred_index, use, position_ids=mb.position_ids)


@torch.no_grad()
def score(student, teacher, mb: MicroBatch, cfg: Config) -> Scored:
    k = cfg.loss.topk
    s = _run(student, mb, lambda head: head.score(k, cfg.rollout.temperature, mb.targets[:, None]))
    t_ids = mb.targets[:, None] if k == 0 else torch.cat([s.ids, mb.targets[:, None]], dim=1)
    t = _run(teacher, mb, lambda head: head.score(k, cfg.loss.teacher_temperature, t_ids))
    return Scored(
        student_ids=s.ids if k else None, student_logprobs=s.logprobs if k else None,
        student_entropy=s.entropy, student_sampled_lp=s.target_logprobs[:, 0],
        teacher_ids=t.ids if k else None, teacher_topk_lp=t.logprobs if k else None,
        teacher_on_student_lp=t.target_logprobs[:, :k] if k else None,
        teacher_entropy=t.entropy, teacher_sampled_lp=t.target_logprobs[:, -1])


@torch.no_grad()
def score_teacher(teacher, mb: MicroBatch, cfg: Config) -> Scored:
    """The teacher's half of score(), keeping its hidden states for the update to score the student's set
    (fill_student_scores): the student then needs no forward of its own before the update."""
    k = cfg.loss.topk
    t, hidden = _run(teacher, mb, lambda head: (head.score(k, cfg.loss.teacher_temperature, mb.targets[:, None]),
                                                head.hidden))
    return Scored(None, None, None, None, teacher_ids=t.ids if k else None, teacher_topk_lp=t.logprobs if k else None,
                  teacher_on_student_lp=None, teacher_entropy=t.entropy, teacher_sampled_lp=t.target_logprobs[:, 0],
                  teacher_hidden=hidden, teacher_lse=t.lse)


def fill_student_scores(sc: Scored, head, teacher_head: FusedHead, mb: MicroBatch, cfg: Config) -> None:
    """Inside the update's forward: the student's scores from its own head (no grad; with one update per batch it
    is the student that sampled the rollouts) and the teacher's log-probs on its top-k from the teacher's kept
    hidden states, k dot products per token."""
    k = cfg.loss.topk
    with torch.no_grad():
        s = head.score(k, cfg.rollout.temperature, mb.targets[:, None])
    sc.student_ids, sc.student_logprobs = (s.ids, s.logprobs) if k else (None, None)
    sc.student_entropy, sc.student_sampled_lp = s.entropy, s.target_logprobs[:, 0]
    if k:
        sc.teacher_on_student_lp = teacher_head.logprobs_at(s.ids, cfg.loss.teacher_temperature, sc.teacher_lse)
    sc.teacher_hidden = sc.teacher_lse = None  # not held past the update


def token_set(sc: Scored, mb: MicroBatch, cfg: Config) -> TokenSet:
    """The tokens that carry a reward at each position, with the teacher's log-probs on them."""
    return O.token_set(objective_spec(cfg), mb.targets, sc.teacher_sampled_lp, sc.student_ids, sc.teacher_ids,
                       sc.teacher_on_student_lp, sc.teacher_topk_lp)


@torch.no_grad()
def policy_terms(student, mb: MicroBatch, sc: Scored, ts: TokenSet, cfg: Config):
    """Several updates per batch: (the rollout-time student's log-probs on the set, the advantages = its OPD
    rewards), fixed when the rollouts are scored. Its log-probs on its own top-k (or the sampled token) come from
    the scoring pass; sets with teacher ids (teacher, union, symmetric_difference) take one more student pass.
    None for the true divergences (no surrogate, no ratio)."""
    spec = objective_spec(cfg)
    if not spec.is_surrogate:
        return None
    if spec.topk == 0:
        old = sc.student_sampled_lp[:, None]
    elif O.set_is_scored_student_topk(spec):
        old = sc.student_logprobs
    else:
        old = _run(student, mb, lambda head: head.score(0, cfg.rollout.temperature, ts.ids)).target_logprobs
    return old, O.advantages(spec, old, ts)


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


def token_weights(mbs: List[Optional[MicroBatch]], lengths: Dict[int, int], spec: ObjectiveSpec,
                  global_tokens: float, global_seqs: float, world: int) -> List[Optional[torch.Tensor]]:
    """Per-token weights that turn the sum of per-token losses into the configured aggregation over all ranks.

    FSDP averages gradients over ranks, so each rank's weights are scaled by the world size.
    """
    out = []
    for mb in mbs:
        if mb is None:
            out.append(None)
            continue
        seq_len = torch.tensor([lengths[int(i)] for i in mb.token_seq.tolist()], dtype=torch.float32)
        w = O.aggregation_weights(seq_len, spec.aggregation, global_tokens, global_seqs, spec.norm_length) * world
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


def update(student, optimizer, mbs: List[Optional[MicroBatch]], sets: List[Optional[TokenSet]], weights,
           cfg: Config, params, outcome=None, teacher=None, policy=None, scored=None,
           advantages: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """One optimizer step: gradient accumulation over the micro-batches, grad clip, and the step (skipped when the
    gradient norm is not finite). A dense divergence runs the teacher again per micro-batch (its hidden states
    are never stored for the whole batch); with `policy` (several updates per batch) the reward-weighted
    losses are PPO surrogates and the clip counts come back too.

    Scoring in the update (`scored` from score_teacher, `sets` all None): each micro-batch's student scores,
    token set (written into `sets`) and outcome terms (from `advantages`) are formed inside its forward, and a
    dense divergence reuses the teacher's kept hidden states."""
    spec = dataclasses.replace(objective_spec(cfg), ppo=ppo_clip(cfg) if policy else None)
    objective = O.make_objective(spec)
    optimizer.zero_grad(set_to_none=True)
    total, pg_loss, clip_counts = 0.0, 0.0, None
    real = [i for i, mb in enumerate(mbs) if mb is not None]
    for i, mb in enumerate(mbs):
        # a rank with too few rollouts replays its first micro-batch at weight 0: FSDP forwards are collectives
        j, scale = (i, 1.0) if mb is not None else (real[0], 0.0)
        mb, w = mbs[j], weights[j] * scale
        with autocast(cfg, mb.input_ids.device, cache=False):  # the forward only: backward and step outside
            if scored is not None:
                sc = scored[j]
                t_head = FusedHead(sc.teacher_hidden, teacher.head_weight().to(sc.teacher_hidden.dtype))

                def use(head):
                    fill_student_scores(sc, head, t_head, mb, cfg)
                    sets[j] = ts = token_set(sc, mb, cfg)
                    out_j = outcome_terms([mb], [sc], advantages)[0]
                    return objective(head, O.Terms(ts.ids, ts.teacher_logprobs, ts.valid, w, outcome=out_j,
                                                   teacher=t_head))
                out = _run(student, mb, use)
            else:
                ts, t_head = sets[j], None
                if objective.needs_teacher_head:
                    with torch.no_grad():
                        t_head = _run(teacher, mb, lambda head: head.as_teacher())
                terms = O.Terms(ts.ids, ts.teacher_logprobs, ts.valid, w, ppo=policy[j] if policy else None,
                                outcome=outcome[j] if outcome else None, teacher=t_head)
                out = _run(student, mb, lambda head: objective(head, terms))
        if scale and out.clip_counts is not None:
            clip_counts = out.clip_counts if clip_counts is None else _add_counts(clip_counts, out.clip_counts)
        if out.pg_loss is not None:
            pg_loss += float(out.pg_loss)
        out.loss.backward()
        total += float(out.loss.detach())
    grad_norm = clip_grad_norm(params, cfg.optim.grad_clip)  # FSDP2 / tensor-parallel DTensor gradients too
    skipped = not math.isfinite(grad_norm)
    if skipped:
        warnings.warn(f"gradient norm is {grad_norm}: skipping this optimizer step")
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    torch.clear_autocast_cache()  # the weights changed in place: an enclosing autocast block's copies are stale
    out = {"loss": total, "grad_norm": grad_norm, "step_skipped": float(skipped)}
    if spec.is_surrogate:
        out["pg_loss"] = pg_loss
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
    out = {k: sum(u[k] for u in updates) / len(updates) for k in ("loss", "grad_norm", "pg_loss") if k in updates[0]}
    out.update(step_skipped=sum(u["step_skipped"] for u in updates), optimizer_steps=float(len(updates)))
    counts = [u["clip_counts"] for u in updates if "clip_counts" in u]
    if counts:
        out["clip_counts"] = functools.reduce(_add_counts, counts)
    return out
