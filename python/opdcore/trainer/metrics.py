"""Per-step training metrics: rewards, entropies, top-k overlap, rollout/trainer mismatch, timings."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Dict

import torch

from opdcore.trainer import dist


class Timer:
    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def _overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_t ∩ b_t| / k per row."""
    return (a.unsqueeze(2) == b.unsqueeze(1)).any(2).float().mean(1)


def step_metrics(rollouts, correct, mbs, scored, sets, upd, timer: Timer, optimizer) -> Dict[str, float]:
    """Sums and counts are all-reduced, so every rank returns the global values."""
    sums: Dict[str, float] = {}

    def add(name, total, count):
        s, c = sums.get(name, (0.0, 0.0))
        sums[name] = (s + float(total), c + float(count))

    graded = [c for c in correct if not math.isnan(c)]
    add("train_accuracy", sum(graded), len(graded))
    add("response_length", sum(len(r.response_ids) for r in rollouts), len(rollouts))
    add("truncated_fraction", sum(not r.finished for r in rollouts), len(rollouts))
    for mb, sc, st in zip(mbs, scored, sets):
        if mb is None:
            continue
        n = mb.num_tokens
        add("student_entropy", sc.student_entropy.sum(), n)
        add("teacher_entropy", sc.teacher_entropy.sum(), n)
        add("entropy_gap", (sc.teacher_entropy - sc.student_entropy).abs().sum(), n)
        add("sampled_token_reward", (sc.teacher_sampled_lp - sc.student_sampled_lp).sum(), n)
        finite = torch.isfinite(mb.rollout_logprobs)
        diff = (mb.rollout_logprobs - sc.student_sampled_lp)[finite].abs()
        add("rollout_logprob_mismatch", diff.sum(), diff.numel())
        add("set_size", st[2].sum(), n)
        if sc.student_ids is not None:
            add("overlap_ratio", _overlap(sc.student_ids, sc.teacher_ids).sum(), n)
            # how much probability the student's top-k holds under each model: the reward-weighted top-k loss
            # only sees this mass, and leaks the rest when it is far from 1
            add("student_topk_mass", sc.student_logprobs.logsumexp(-1).exp().sum(), n)
            add("teacher_mass_on_student_topk", sc.teacher_on_student_lp.logsumexp(-1).exp().sum(), n)
    names = sorted(sums)
    reduced = dist.all_reduce([v for k in names for v in sums[k]] + [upd["loss"]])
    out = {k: float(reduced[2 * i] / reduced[2 * i + 1]) if reduced[2 * i + 1] > 0 else float("nan")
           for i, k in enumerate(names)}
    out["loss"] = float(reduced[-1]) / dist.world()
    out["grad_norm"] = upd["grad_norm"]
    out["step_skipped"] = upd["step_skipped"]
    out["lr"] = optimizer.param_groups[0]["lr"]
    tokens = float(dist.all_reduce([sum(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)])[0])
    total_time = sum(timer.seconds.values())
    out["tokens_per_s"] = tokens / total_time if total_time > 0 else float("nan")
    for k, v in timer.seconds.items():
        out[f"time_{k}_s"] = v
    return out
