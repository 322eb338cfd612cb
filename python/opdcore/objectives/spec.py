"""ObjectiveSpec: every choice that defines an OPD training objective, as plain values (no trainer config)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from opdcore.objectives.aggregation import check_aggregation
from opdcore.ops import DIVERGENCES, WEIGHT_MODES, canonical_strategy
from opdcore.ops.policy import PPOClip

# reward_weighted: -sum sg(r) log p on the token set (METHOD.md 2.1-2.3; a PPO surrogate with several updates per
# batch); renorm_kl / tail_kl: the exact top-k reverse KLs of 2.4; dense: a full-vocabulary divergence (2.5)
LOSSES = ("reward_weighted", "renorm_kl", "tail_kl", "dense")


def default_weight_mode(strategy: str) -> str:
    """student_p, except symmetric_difference, where the reference fork uses the raw p(v) (not renormalised)."""
    return "student_p_raw" if canonical_strategy(strategy) == "symmetric_difference" else "student_p"


@dataclass(frozen=True)
class ObjectiveSpec:
    loss: str = "reward_weighted"
    topk: int = 16  # 0: sampled-token OPD (reward_weighted only)
    strategy: str = "student"  # the token set (opdcore.ops.STRATEGIES or the reference fork's aliases)
    weight_mode: str = "auto"  # auto: default_weight_mode(strategy); sampled-token OPD always weighs 1
    log_ratio_clip: float = 0.0  # |log p - log q| clipped before the reward is formed (0: off)
    divergence: str = "reverse_kl"  # dense only: forward_kl | reverse_kl | jsd
    beta: float = 0.5  # the JSD's beta (TRL's convention)
    temperature: float = 1.0  # the student's (the rollout temperature)
    teacher_temperature: float = 1.0
    ppo: Optional[PPOClip] = None  # several updates per batch: the reward-weighted terms as PPO surrogates
    outcome_weight: float = 0.0  # the hybrid outcome term's weight (METHOD.md 2.6)
    aggregation: str = "token-mean"
    norm_length: Optional[float] = None  # seq-mean-token-sum-norm's constant

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.topk < 0:
            raise ValueError(f"topk must be >= 0 (0: sampled-token), got {self.topk}")
        if self.topk == 0 and self.loss in ("renorm_kl", "tail_kl"):
            raise ValueError(f"loss {self.loss!r} needs topk > 0")
        canonical_strategy(self.strategy)
        if self.weight_mode != "auto" and self.weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be 'auto' or one of {WEIGHT_MODES}, got {self.weight_mode!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        for name in ("temperature", "teacher_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.log_ratio_clip < 0 or self.outcome_weight < 0:
            raise ValueError("log_ratio_clip and outcome_weight must be >= 0")
        check_aggregation(self.aggregation, self.norm_length)

    @property
    def resolved_weight_mode(self) -> str:
        if self.topk == 0:
            return "none"  # the sampled token alone: weight 1
        return default_weight_mode(self.strategy) if self.weight_mode == "auto" else self.weight_mode

    @property
    def is_surrogate(self) -> bool:
        """A stop-gradient surrogate (PPO-clipped with several updates, subject to set-mass drift) rather than a
        divergence minimised as it is."""
        return self.loss == "reward_weighted"

    @property
    def teacher_scale(self) -> float:
        """Multiplies the teacher's logits so one temperature serves both models in the dense divergences."""
        return self.temperature / self.teacher_temperature
