"""Rollout engines: the student samples responses to prompts (Hugging Face generate, or vLLM)."""
from opdcore.rollout.base import Rollout, RolloutEngine, SamplingConfig

__all__ = ["Rollout", "RolloutEngine", "SamplingConfig"]
