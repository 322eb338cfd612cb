"""The evidence `opdcore diagnose` judges: the student's own rollouts on a few hundred prompts, scored by both models
exactly as a training step would score them (Trainer.sample_and_score, no update), plus both models' held-out
accuracy and the teacher continuation probe. One process."""
from __future__ import annotations

import math
from typing import Dict, List

import torch

from opdcore import metrics as D
from opdcore.trainer import metrics as M
from opdcore.trainer import step as S

# per-token diagnostics profiled over response-position buckets in the evidence
PROFILED = ("overlap_ratio", "overlap_mass_student", "entropy_gap", "student_entropy", "teacher_entropy",
            "sampled_token_reward")


def collect(trainer, num_prompts: int, progress: bool = True) -> Dict[str, object]:
    """Sample trainer.cfg.rollout.n responses for each of the first `num_prompts` training prompts (in batches of
    train.prompts_per_step), score them, and return the evidence: token means of every METHOD.md section 3
    diagnostic, per-position profiles, the sequence-level numbers (AUROC of the sequence mean reward, sampled
    accuracy, lengths), both models' greedy held-out accuracy and the continuation probe."""
    cfg = trainer.cfg
    if cfg.loss.topk < 1:
        raise ValueError("the diagnosis compares top-k sets: loss.topk must be >= 1")
    n = min(num_prompts, len(trainer.train_prompts))
    batch = cfg.train.prompts_per_step
    chunks = [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
    nb = cfg.diagnostics.position_buckets
    width = -(-cfg.rollout.max_new_tokens // nb)
    sums: Dict[str, List[float]] = {}
    prof: Dict[str, List[torch.Tensor]] = {}
    drift = torch.zeros(2, dtype=torch.float64)
    rbar_all: List[float] = []
    correct_all: List[float] = []
    lengths, truncated, no_answer = [], [], []
    timer = M.Timer()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="diagnose: sample and score", unit="prompt", dynamic_ncols=True)
    for idx in chunks:
        rollouts, correct, preds, mbs, scored, _ = trainer.sample_and_score(idx, timer)
        rbar = torch.full((len(rollouts),), math.nan, dtype=torch.float64)
        for mb, sc in zip(mbs, scored):
            if mb is None:
                continue
            for name, (v, mask) in M.per_token(sc).items():
                v = v.double().cpu()
                m = None if mask is None else mask.cpu()
                s = sums.setdefault(name, [0.0, 0.0])
                s[0] += float(v.sum() if m is None else v[m].sum())
                s[1] += float(v.numel() if m is None else m.sum())
                if name in PROFILED:
                    ps, pc = D.position_profile(v, mb.positions.cpu(), width, nb, m)
                    old = prof.get(name)
                    prof[name] = [ps, pc] if old is None else [old[0] + ps, old[1] + pc]
            d, k = D.drift_gradient_norms(sc.student_logprobs, sc.teacher_on_student_lp)
            drift += torch.stack([d.sum(), k.sum()]).cpu()
            r = D.sequence_mean_reward((sc.teacher_sampled_lp - sc.student_sampled_lp).cpu(), mb.token_seq.cpu(),
                                       len(rollouts))
            rbar = torch.where(r.isnan(), rbar, r)
        rbar_all += rbar.tolist()
        correct_all += list(correct)
        lengths += [len(r.response_ids) for r in rollouts]
        truncated += [not r.finished for r in rollouts]
        no_answer += [p is None for p in preds]
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    means = {k: s[0] / s[1] if s[1] else math.nan for k, s in sums.items()}
    means["student_topk_drift_share"] = D.drift_share(drift[0], drift[1])
    graded = [c for c in correct_all if not math.isnan(c)]
    profiles = {"bucket_width": width,
                "tokens": prof["student_entropy"][1].tolist()}
    for name, (ps, pc) in prof.items():
        profiles[name] = torch.where(pc > 0, ps / pc.clamp(min=1), torch.full_like(ps, math.nan)).tolist()
    evidence: Dict[str, object] = {
        "prompts": n, "responses": len(lengths), "tokens": int(sums["student_entropy"][1]), "k": cfg.loss.topk,
        "loss": S.objective_spec(cfg).loss,  # the drift of METHOD.md 2.3 concerns "reward_weighted" only
        "vocab": trainer.vocab, "max_new_tokens": cfg.rollout.max_new_tokens, "temperature": cfg.rollout.temperature,
        "token_means": means, "profiles": profiles,
        "sequence": {
            "reward_auroc": D.auroc(rbar_all, correct_all),
            "sampled_accuracy": sum(graded) / len(graded) if graded else math.nan,
            "graded_responses": len(graded),
            "response_length": sum(lengths) / max(len(lengths), 1),
            "truncated_fraction": sum(truncated) / max(len(truncated), 1),
            "no_answer_fraction": sum(no_answer) / max(len(no_answer), 1),
            "rbar": rbar_all, "correct": correct_all},
        "seconds": dict(timer.seconds),
    }
    evidence.update(_accuracies_and_probe(trainer, progress))
    return evidence


def _accuracies_and_probe(trainer, progress: bool) -> Dict[str, object]:
    """Greedy held-out accuracy of both models (how far the teacher is ahead) and the continuation probe (whether
    it stays ahead on the student's own partial responses)."""
    if not trainer.eval_prompts:
        return {"accuracy": {}, "probe": {}}
    if progress:
        print(f"diagnose: greedy accuracy of both models on {len(trainer.eval_prompts)} prompts, then the probe")
    key = trainer._acc_key()
    student = trainer.evaluate()
    teacher = trainer.evaluate(trainer._teacher_engine())
    acc = {"student": student[key], "teacher": teacher[key], "eval_prompts": len(trainer.eval_prompts),
           "graded": student["eval_responses"]}
    probe = trainer.probe(log=False) if trainer.cfg.diagnostics.probe_every else {}
    return {"accuracy": acc, "probe": {k: v for k, v in probe.items() if k.startswith("probe_")}}
