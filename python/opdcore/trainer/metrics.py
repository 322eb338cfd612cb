"""Per-step training metrics: the METHOD.md section 3 diagnostics (opdcore.metrics) over all ranks, per-position
profiles, rollout/trainer mismatch, timings."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch

from opdcore import metrics as D
from opdcore.trainer import dist
from opdcore.trainer.memory import phase_peak, run_peak_mib


class Timer:
    """Seconds and peak resident memory (MiB) per named phase."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}
        self.peak_mib: Dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        with phase_peak(self.peak_mib, name):
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


# Per-position diagnostics also profiled over response-position buckets (positions.jsonl, positions.png).
PROFILED = ("student_entropy", "entropy_gap", "sampled_token_reward", "overlap_ratio", "overlap_advantage")


def per_token(sc) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """name -> ([R] values, [R] mask of the positions where the value is defined, or None: all)."""
    out = {
        "student_entropy": (sc.student_entropy, None),
        "teacher_entropy": (sc.teacher_entropy, None),
        "entropy_gap": (D.entropy_gap(sc.teacher_entropy, sc.student_entropy), None),
        "sampled_token_reward": (sc.teacher_sampled_lp - sc.student_sampled_lp, None),
    }
    if sc.student_ids is not None:
        ov = D.overlap_stats(sc.student_ids, sc.student_logprobs, sc.teacher_ids, sc.teacher_on_student_lp)
        out.update({
            "overlap_ratio": (ov.ratio, None),
            "overlap_mass_student": (ov.mass_student, None),
            "overlap_mass_teacher": (ov.mass_teacher, None),
            "overlap_advantage": (ov.advantage, ov.has),
            # how much probability the student's top-k holds under each model: the reward-weighted top-k loss
            # only sees this mass, and leaks the rest when it is far from 1
            "student_topk_mass": (sc.student_logprobs.logsumexp(-1).exp(), None),
            "teacher_mass_on_student_topk": (sc.teacher_on_student_lp.logsumexp(-1).exp(), None),
            # METHOD.md 2.3: where this is > 0, the reward-weighted top-k loss lowers the student's top-k mass
            "student_topk_lbar": (D.set_mass_drift(sc.student_logprobs, sc.teacher_on_student_lp)[0], None),
        })
    return out


def _sequence_diagnostics(rollouts, correct, mbs, scored) -> Dict[str, float]:
    """Over all ranks' responses: AUROC of the sequence mean reward for correct vs incorrect responses, and the
    token with the largest |log q - log p| (training health)."""
    rbar = torch.full((len(rollouts),), math.nan, dtype=torch.float64)
    largest = (math.nan, math.nan)
    for mb, sc in zip(mbs, scored):
        if mb is None:
            continue
        # a response lies in one micro-batch: the others leave it NaN
        r = D.sequence_mean_reward((sc.teacher_sampled_lp - sc.student_sampled_lp).cpu(), mb.token_seq.cpu(),
                                   len(rollouts))
        rbar = torch.where(r.isnan(), rbar, r)
        cand = D.largest_reward_token(sc.student_sampled_lp, sc.teacher_sampled_lp)
        if math.isnan(largest[0]) or abs(cand[0]) > abs(largest[0]):
            largest = cand
    parts = dist.gather_objects((rbar.tolist(), list(correct), largest))
    scores = [x for p in parts for x in p[0]]
    labels = [x for p in parts for x in p[1]]
    big = max((p[2] for p in parts), key=lambda x: -1.0 if math.isnan(x[0]) else abs(x[0]))
    return {"reward_auroc": D.auroc(scores, labels), "largest_token_reward": big[0],
            "p_minus_q_at_largest_reward": big[1]}


def step_metrics(rollouts, correct, mbs, scored, sets, upd, timer: Timer, optimizer, bucket_width: int,
                 num_buckets: int, correction=None, cap: float = 0.0,
                 no_answer=None) -> Tuple[Dict[str, float], Dict[str, list]]:
    """(metrics, per-position profile). Sums and counts are all-reduced, so every rank returns the global
    values. The profile holds the mean of each PROFILED diagnostic per response-position bucket (NaN where a
    bucket is empty) and the token count per bucket."""
    sums: Dict[str, float] = {}
    prof: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def add(name, total, count):
        s, c = sums.get(name, (0.0, 0.0))
        sums[name] = (s + float(total), c + float(count))

    graded = [c for c in correct if not math.isnan(c)]
    add("train_accuracy", sum(graded), len(graded))
    add("response_length", sum(len(r.response_ids) for r in rollouts), len(rollouts))
    add("truncated_fraction", sum(not r.finished for r in rollouts), len(rollouts))
    add("peak_rss_mib", run_peak_mib(), 1)  # this process's resident high-water mark (mean over ranks)
    for k, v in timer.peak_mib.items():  # ... and within each phase of this step
        add(f"rss_{k}_mib", v, 1)
    if no_answer is not None:  # responses where data.answer_extraction found no answer at all
        add("no_answer_fraction", sum(no_answer), len(no_answer))
    for mb, sc, st in zip(mbs, scored, sets):
        if mb is None:
            continue
        n = mb.num_tokens
        for name, (v, mask) in per_token(sc).items():
            add(name, v[mask].sum() if mask is not None else v.sum(), mask.sum() if mask is not None else n)
            if name in PROFILED:
                ps, pc = D.position_profile(v.cpu(), mb.positions.cpu(), bucket_width, num_buckets,
                                            None if mask is None else mask.cpu())
                old = prof.get(name, (0.0, 0.0))
                prof[name] = (old[0] + ps, old[1] + pc)
        finite = torch.isfinite(mb.rollout_logprobs)
        diff = (mb.rollout_logprobs - sc.student_sampled_lp)[finite].abs()
        add("rollout_logprob_mismatch", diff.sum(), diff.numel())
        add("set_size", st.valid.sum(), n)
        if sc.student_ids is not None:  # the two parts of the reward-weighted top-k loss's gradient (METHOD.md 2.3)
            d, k = D.drift_gradient_norms(sc.student_logprobs, sc.teacher_on_student_lp)
            add("_drift_sq", d.sum(), n)
            add("_kl_sq", k.sum(), n)
    for w in correction or []:  # loss.rollout_is_cap: the truncated importance weights of the sampled tokens
        if w is not None:
            add("rollout_is_weight", w.sum(), w.numel())
            add("rollout_is_capped_fraction", (w >= cap).sum(), w.numel())
    names, pnames = sorted(sums), sorted(prof)
    losses = [k for k in ("loss", "pg_loss") if k in upd]  # already weighted sums over the rank's tokens
    flat = [v for k in names for v in sums[k]] + [upd[k] for k in losses]
    flat += torch.cat([torch.cat(prof[k]) for k in pnames]).tolist() if pnames else []
    reduced = dist.all_reduce(flat)
    out = {k: float(reduced[2 * i] / reduced[2 * i + 1]) if reduced[2 * i + 1] > 0 else float("nan")
           for i, k in enumerate(names)}
    for i, k in enumerate(losses):
        out[k] = float(reduced[2 * len(names) + i]) / dist.world()
    if "_drift_sq" in out:  # means over the same tokens: their ratio is the ratio of the sums
        out["student_topk_drift_share"] = D.drift_share(torch.tensor(out.pop("_drift_sq")),
                                                        torch.tensor(out.pop("_kl_sq")))
    profile: Dict[str, list] = {"bucket_width": bucket_width}
    at = 2 * len(names) + len(losses)
    for k in pnames:
        ps, pc = reduced[at:at + num_buckets], reduced[at + num_buckets:at + 2 * num_buckets]
        at += 2 * num_buckets
        profile[k] = torch.where(pc > 0, ps / pc.clamp(min=1), torch.full_like(ps, math.nan)).tolist()
        if k == "student_entropy":  # defined at every position: its counts are the bucket's tokens
            profile["tokens"] = pc.tolist()
    out.update(_sequence_diagnostics(rollouts, correct, mbs, scored))
    out["grad_norm"] = upd["grad_norm"]
    out["step_skipped"] = upd["step_skipped"]
    if "optimizer_steps" in upd:
        out["optimizer_steps"] = upd["optimizer_steps"]
    if "clip_counts" in upd:  # several updates per batch: how far the student moved from the rollouts' student
        c = upd["clip_counts"]
        clipped, counted, dev = dist.all_reduce(c[:3].tolist()).tolist()
        out["ppo_clip_fraction"] = clipped / counted if counted else float("nan")
        out["ppo_ratio_deviation"] = dev / counted if counted else float("nan")
        out["ppo_ratio_max"] = float(dist.all_reduce([float(c[3])], op="max")[0])
    out["lr"] = optimizer.param_groups[0]["lr"]
    # tensor-parallel peers hold the same rollouts: count them once
    tokens = float(dist.all_reduce([sum(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)])[0]) / \
        dist.tp_world()
    total_time = sum(timer.seconds.values())
    out["tokens_per_s"] = tokens / total_time if total_time > 0 else float("nan")
    for k, v in timer.seconds.items():
        out[f"time_{k}_s"] = v
    return out, profile
