"""The OPD diagnostics of METHOD.md section 3, on tensors any trainer has after scoring its rollouts.

Per-position inputs are aligned [R] / [R, k] tensors over the response tokens: the student's top-k ids S_t with
its log-probs log p_t(S_t), the teacher's top-k ids T_t, and the teacher's log-probs on the student's ids
log q_t(S_t) (what opdcore's scoring returns). Functions return per-position values, so a caller can average
them, bucket them by response position (`position_profile`) or all-reduce sums and counts across ranks.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = ["topk_overlap", "overlap_mass", "overlap_advantage", "overlap_stats", "Overlap", "entropy_gap",
           "sequence_mean_reward", "auroc", "gap_recovery", "position_profile", "largest_reward_token", "ppo_clip_counts", "set_mass_drift",
           "drift_gradient_norms", "drift_share"]


def _check_topk(student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> None:
    if student_ids.dim() != 2 or teacher_ids.dim() != 2 or student_ids.shape[0] != teacher_ids.shape[0]:
        raise ValueError(f"student_ids and teacher_ids must be [positions, k] with the same positions, got "
                         f"{tuple(student_ids.shape)} and {tuple(teacher_ids.shape)}")


def _check_aligned(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def _in_teacher_topk(student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """[R, k] bool: the student's j-th id is one of the teacher's top-k ids. Ids below k_s * k_t (a small
    vocabulary) go through an [R, max id + 1] membership table, others through k_t compares of [R, k_s]: both hold
    at most the bytes of one [R, k_s, k_t] compare and take 2-5x less time on a CPU."""
    R, ks = student_ids.shape
    kt = teacher_ids.shape[1]
    if student_ids.numel() and teacher_ids.numel():
        lo = min(int(student_ids.min()), int(teacher_ids.min()))
        hi = max(int(student_ids.max()), int(teacher_ids.max()))
        if lo >= 0 and hi < ks * kt:
            table = torch.zeros(R, hi + 1, dtype=torch.bool, device=student_ids.device)
            return table.scatter_(1, teacher_ids.long(), True).gather(1, student_ids.long())
    out = torch.zeros(student_ids.shape, dtype=torch.bool, device=student_ids.device)
    for j in range(kt):
        out |= student_ids == teacher_ids[:, j:j + 1]
    return out


def topk_overlap(student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """Overlap ratio |S_t ∩ T_t| / k per position ([R] float32). Rises in successful runs, stagnates in failing
    ones (METHOD.md 3)."""
    _check_topk(student_ids, teacher_ids)
    return _in_teacher_topk(student_ids, teacher_ids).float().mean(1)


def _intersection(student_ids, student_logprobs, teacher_ids, teacher_on_student_logprobs,
                  in_teacher: Optional[torch.Tensor] = None) -> torch.Tensor:
    """S_t ∩ T_t as a mask over the student's ids, without entries either model gives zero probability (a
    vocabulary with fewer than k reachable tokens pads top-k lists with -inf entries). in_teacher: the
    _in_teacher_topk mask when the caller has it."""
    _check_topk(student_ids, teacher_ids)
    _check_aligned("student_logprobs", student_logprobs, "student_ids", student_ids)
    _check_aligned("teacher_on_student_logprobs", teacher_on_student_logprobs, "student_ids", student_ids)
    in_t = _in_teacher_topk(student_ids, teacher_ids) if in_teacher is None else in_teacher
    return in_t & (student_logprobs > -math.inf) & (teacher_on_student_logprobs > -math.inf)


def overlap_mass(student_ids: torch.Tensor, student_logprobs: torch.Tensor, teacher_ids: torch.Tensor,
                 teacher_on_student_logprobs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum over S_t ∩ T_t of p_t, the same of q_t) per position ([R] each). Near 0.97-0.99 in practice: the
    shared support carries almost all of both distributions' mass."""
    return _overlap_mass(_intersection(student_ids, student_logprobs, teacher_ids, teacher_on_student_logprobs),
                         student_logprobs, teacher_on_student_logprobs)


def _shifted_exp(logprobs: torch.Tensor, f: torch.Tensor, has: torch.Tensor):
    """(x, m, e, z) for one side of the intersection given as a 0/1 float mask f: x = logprobs with -inf raised to
    a finite floor (such entries are never in it), m = the row's largest x in it (0 where it is empty),
    e = exp(x - m) in it and 0 elsewhere, z = e's row sums ([R, 1]; >= 1 where it is not empty).

    Finite arithmetic and masks as factors throughout: on a CPU, exp of -inf or of denormal results, and
    where / masked_fill with a bool mask, each cost 5-30x a multiply. exp's argument is clamped to [-80, 0]:
    outside the intersection x may exceed m, and inside it e^-80 stands in for smaller weights (1e-35 of the
    row's largest, below float32's resolution of z)."""
    big = torch.finfo(logprobs.dtype).max / 4
    x = logprobs.clamp(min=-big)
    m = torch.where(has[:, None], (x - (1 - f) * big).amax(1, keepdim=True), 0.0)
    e = (x - m).clamp(min=-80.0, max=0.0).exp() * f
    return x, m, e, e.sum(1, keepdim=True)


def _overlap_mass(inter, student_logprobs, teacher_on_student_logprobs):
    f, has = inter.to(student_logprobs.dtype), inter.any(1)
    (_, mp, _, zp), (_, mq, _, zq) = (_shifted_exp(x, f, has)
                                      for x in (student_logprobs, teacher_on_student_logprobs))
    return (mp.exp() * zp).squeeze(1), (mq.exp() * zq).squeeze(1)


def overlap_advantage(student_ids: torch.Tensor, student_logprobs: torch.Tensor, teacher_ids: torch.Tensor,
                      teacher_on_student_logprobs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean over v in S_t ∩ T_t of A_t(v) = pbar(v) (log qbar(v) - log pbar(v)), with pbar and qbar renormalised
    over the intersection, per position; and the [R] mask of positions where the intersection is not empty (the
    value is 0 elsewhere and must be left out of averages). Equals -KL(pbar || qbar) / |S_t ∩ T_t| <= 0 and goes
    toward 0 in successful runs."""
    return _overlap_advantage(_intersection(student_ids, student_logprobs, teacher_ids,
                                            teacher_on_student_logprobs),
                              student_logprobs, teacher_on_student_logprobs)


def _overlap_advantage(inter, student_logprobs, teacher_on_student_logprobs):
    f, count = inter.to(student_logprobs.dtype), inter.sum(1)
    has = count > 0
    xp, mp, ep, zp = _shifted_exp(student_logprobs, f, has)
    xq, mq, _, zq = _shifted_exp(teacher_on_student_logprobs, f, has)
    zp, zq = zp.clamp(min=1.0), zq.clamp(min=1.0)  # >= 1 where not empty; empty rows give 0 below
    log_pbar, log_qbar = xp - mp - zp.log(), xq - mq - zq.log()
    a = (ep / zp * (log_qbar - log_pbar)).sum(1)  # ep is 0 outside the intersection
    return torch.where(has, a / count.clamp(min=1), 0.0), has


class Overlap(NamedTuple):
    """The S_t ∩ T_t diagnostics per position ([R] each): see topk_overlap, overlap_mass, overlap_advantage."""
    ratio: torch.Tensor
    mass_student: torch.Tensor
    mass_teacher: torch.Tensor
    advantage: torch.Tensor
    has: torch.Tensor


def overlap_stats(student_ids: torch.Tensor, student_logprobs: torch.Tensor, teacher_ids: torch.Tensor,
                  teacher_on_student_logprobs: torch.Tensor) -> Overlap:
    """topk_overlap, overlap_mass and overlap_advantage from one intersection (what a trainer logs every step)."""
    _check_topk(student_ids, teacher_ids)
    in_t = _in_teacher_topk(student_ids, teacher_ids)
    inter = _intersection(student_ids, student_logprobs, teacher_ids, teacher_on_student_logprobs, in_t)
    p, q = _overlap_mass(inter, student_logprobs, teacher_on_student_logprobs)
    adv, has = _overlap_advantage(inter, student_logprobs, teacher_on_student_logprobs)
    return Overlap(in_t.float().mean(1), p, q, adv, has)


def set_mass_drift(set_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                   valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lbar, KL(pbar || qbar)) per position ([R] each) for a token set with the student's and teacher's
    full-vocabulary log-probs on it (METHOD.md 2.3): lbar = sum_S pbar (log p - log q) = KL(pbar || qbar) +
    log(P_S / Q_S). The student_p-weighted top-k loss's gradient is grad KL(pbar || qbar) + lbar * grad log P_S:
    where lbar > 0 every descent step lowers the student's mass P_S on its own set, the drift that collapses
    small-vocabulary students. Positions with an empty set give 0."""
    if set_logprobs.shape != teacher_logprobs.shape or set_logprobs.dim() != 2:
        raise ValueError(f"set_logprobs and teacher_logprobs must be one [R, K] shape, got "
                         f"{tuple(set_logprobs.shape)} and {tuple(teacher_logprobs.shape)}")
    ninf = torch.full((), -math.inf, dtype=set_logprobs.dtype, device=set_logprobs.device)
    lp = set_logprobs if valid is None else torch.where(valid, set_logprobs, ninf)
    lq = teacher_logprobs if valid is None else torch.where(valid, teacher_logprobs, ninf)
    log_p_mass, log_q_mass = lp.logsumexp(1), lq.logsumexp(1)
    pbar = (lp - log_p_mass[:, None]).exp()
    has = torch.isfinite(log_p_mass)
    kl = torch.where(torch.isfinite(lp), pbar * ((lp - log_p_mass[:, None]) - (lq - log_q_mass[:, None])),
                     torch.zeros((), dtype=lp.dtype, device=lp.device)).sum(1)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    kl = torch.where(has, kl, zero)
    lbar = torch.where(has, kl + log_p_mass - log_q_mass, zero)
    return lbar, kl


def drift_gradient_norms(set_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                         valid: Optional[torch.Tensor] = None,
                         tail_sq: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(|g_drift|^2, |g_kl|^2) per position ([R] each, float64): the squared norms, with respect to the student's
    logits, of the two parts of the student_p-weighted top-k loss's gradient (METHOD.md 2.3), lbar * grad log P_S
    and grad KL(pbar || qbar). On the set g_kl = pbar (l - lbar) and g_drift = lbar (pbar - p); off the set g_kl
    is 0 and g_drift = -lbar p, whose squared norm needs tail_sq = sum over ids outside the set of p^2 ([R]);
    without it (None) the norms are over the set's logits only. Squared norms, so callers add positions and ranks
    before forming drift_share."""
    lbar, _ = set_mass_drift(set_logprobs, teacher_logprobs, valid)
    lp, lq = set_logprobs.double(), teacher_logprobs.double()
    use = torch.isfinite(lp) & torch.isfinite(lq) if valid is None else valid & torch.isfinite(lp) & torch.isfinite(lq)
    zero = torch.zeros((), dtype=torch.float64, device=lp.device)
    p = torch.where(use, lp.exp(), zero)
    pbar = p / p.sum(1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    l = torch.where(use, lp - lq, zero)
    lb = lbar.double()[:, None]
    drift = (lb * (pbar - p)).square().sum(1)
    if tail_sq is not None:
        _check_aligned("tail_sq", tail_sq, "lbar", lbar)
        drift = drift + lbar.double().square() * tail_sq.double()
    kl = torch.where(use, pbar * (l - lb), zero).square().sum(1)
    return drift, kl


def drift_share(drift_sq: torch.Tensor, kl_sq: torch.Tensor) -> float:
    """|g_drift| / (|g_drift| + |g_kl|) over all positions given (sums of drift_gradient_norms): the share of the
    reward-weighted top-k loss's gradient that only moves the student's mass on its own set (0: none, the exact
    renormalised KL; near 1: the update mostly drains or fills the set). NaN without gradient."""
    d, k = float(drift_sq.double().sum()) ** 0.5, float(kl_sq.double().sum()) ** 0.5
    return d / (d + k) if d + k > 0 else math.nan


def entropy_gap(teacher_entropy: torch.Tensor, student_entropy: torch.Tensor) -> torch.Tensor:
    """|H(q_t) - H(p_t)| per position (the gap at each position, not the gap of the averages)."""
    _check_aligned("student_entropy", student_entropy, "teacher_entropy", teacher_entropy)
    return (teacher_entropy - student_entropy).abs()


def sequence_mean_reward(token_reward: torch.Tensor, token_seq: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """rbar(y) = (1/T) sum_t r_t per sequence ([num_seqs], NaN for a sequence with no tokens), where
    r_t = log q_t(y_t) - log p_t(y_t) and token_seq[i] in [0, num_seqs) is the sequence of token i."""
    _check_aligned("token_seq", token_seq, "token_reward", token_reward)
    if token_reward.dim() != 1:
        raise ValueError(f"token_reward must be [tokens], got {tuple(token_reward.shape)}")
    if token_seq.numel() and (int(token_seq.min()) < 0 or int(token_seq.max()) >= num_seqs):
        raise ValueError(f"token_seq holds sequence ids outside [0, num_seqs={num_seqs})")
    r = token_reward.double()
    sums = torch.zeros(num_seqs, dtype=torch.float64, device=r.device).index_add_(0, token_seq, r)
    counts = torch.zeros(num_seqs, dtype=torch.float64, device=r.device).index_add_(0, token_seq, torch.ones_like(r))
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, math.nan))


def auroc(scores: Sequence[float], labels: Sequence[float]) -> float:
    """Area under the ROC curve of `scores` separating label 1 from label 0 (the Mann-Whitney U statistic; ties
    count half). Pairs with a NaN score or label are left out; NaN when either class is empty. METHOD.md 3
    applies it to rbar(y) of correct vs incorrect responses: how informative the teacher's reward is globally."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels, dtype=torch.float64).flatten()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.numel()} vs {y.numel()}")
    keep = ~(s.isnan() | y.isnan())
    s, y = s[keep], y[keep]
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("labels must be 0, 1 or NaN")
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = s.argsort()
    _, inverse, counts = torch.unique_consecutive(s[order], return_inverse=True, return_counts=True)
    first = counts.cumsum(0) - counts + 1  # 1-based rank of each tie group's first member
    ranks = torch.empty_like(s)
    ranks[order] = (first + (counts - 1) / 2.0).double()[inverse]
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def gap_recovery(acc_before: float, acc_after: float, acc_teacher: float) -> float:
    """(acc_after - acc_before) / (acc_teacher - acc_before): the fraction of the student-teacher gap that
    training closed (1: the teacher's accuracy reached; may exceed 1 or be negative). NaN when the teacher is not
    ahead of the starting student (there is no gap to recover)."""
    gap = acc_teacher - acc_before
    return (acc_after - acc_before) / gap if gap > 0 else math.nan


def position_profile(values: torch.Tensor, positions: torch.Tensor, bucket_width: int, num_buckets: int,
                     mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts) of `values` per response-position bucket ([num_buckets] float64 each): position p falls in
    bucket min(p // bucket_width, num_buckets - 1). Sums and counts (not means) so ranks and steps can add them;
    `mask` leaves positions out."""
    _check_aligned("positions", positions, "values", values)
    if bucket_width < 1 or num_buckets < 1:
        raise ValueError(f"bucket_width and num_buckets must be >= 1, got {bucket_width} and {num_buckets}")
    if positions.numel() and int(positions.min()) < 0:
        raise ValueError("positions must be >= 0")
    b = (positions // bucket_width).clamp(max=num_buckets - 1).long()
    v = values.double()
    w = torch.ones_like(v)
    if mask is not None:
        _check_aligned("mask", mask, "values", values)
        w = mask.double()
        v = torch.where(mask, v, torch.zeros_like(v))
    sums = torch.zeros(num_buckets, dtype=torch.float64, device=v.device).index_add_(0, b, v)
    counts = torch.zeros(num_buckets, dtype=torch.float64, device=v.device).index_add_(0, b, w)
    return sums, counts


def largest_reward_token(student_sampled_logprobs: torch.Tensor,
                         teacher_sampled_logprobs: torch.Tensor) -> Tuple[float, float]:
    """Training health: (r, p - q) at the token with the largest |r_t| = |log q_t(y_t) - log p_t(y_t)|, the
    position that dominates a sampled-token update. (NaN, NaN) without tokens."""
    _check_aligned("teacher_sampled_logprobs", teacher_sampled_logprobs, "student_sampled_logprobs",
                   student_sampled_logprobs)
    r = (teacher_sampled_logprobs - student_sampled_logprobs).double().flatten()
    finite = torch.isfinite(r)
    if not bool(finite.any()):
        return math.nan, math.nan
    i = int(torch.where(finite, r.abs(), torch.full_like(r, -1.0)).argmax())
    p = float(student_sampled_logprobs.flatten()[i].double().exp())
    q = float(teacher_sampled_logprobs.flatten()[i].double().exp())
    return float(r[i]), p - q


def ppo_clip_counts(student_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    coefficients: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Training health of several updates per batch: float64 [4] = (set entries whose gradient a clip removed,
    set entries with a nonzero advantage, sum of |ratio - 1| over those, largest ratio), from a PPO loss's
    student_logprobs / coefficients and its inputs. Sums (and a max) so callers can add micro-batches and
    all-reduce ranks: clip fraction = [0] / [1], mean |ratio - 1| = [2] / [1]."""
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("coefficients", coefficients)):
        _check_aligned(name, t, "student_logprobs", student_logprobs)
    counted = (advantages != 0) if valid is None else valid & (advantages != 0)
    ratio = torch.exp(student_logprobs.double() - old_logprobs.double())[counted]
    clipped = counted & (coefficients == 0)
    top = ratio.max() if ratio.numel() else torch.zeros((), dtype=torch.float64, device=ratio.device)
    return torch.stack([clipped.sum().double(), counted.sum().double(), (ratio - 1).abs().sum(), top]).cpu()
