"""Learning-rate schedules: constant, cosine or linear decay after a linear warm-up."""
from __future__ import annotations

import math

import torch


def make_scheduler(optimizer, kind: str, warmup: int, total: int, min_ratio: float = 0.0):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    if kind not in ("constant", "cosine", "linear"):
        raise ValueError(f"schedule must be constant, cosine or linear, got {kind!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
