"""The small interface every rollout engine implements."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch


@dataclass
class SamplingConfig:
    n: int = 1  # responses per prompt
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: Optional[int] = None


@dataclass
class Rollout:
    """One sampled response."""
    prompt_index: int  # index into the prompts given to generate()
    prompt_ids: List[int]
    response_ids: List[int]  # includes the EOS token when the response stopped on it
    rollout_logprobs: Optional[List[float]]  # the engine's log-prob of each response token, if it reports them
    finished: bool  # stopped on EOS (False: truncated at max_new_tokens)


class RolloutEngine(abc.ABC):
    """generate() samples n responses per prompt; update_weights() loads the student's new weights.

    Capabilities the trainer reads: shares_training_model (it generates with the training model itself, so
    there are no weights to sync) and synced (its generate is a collective every rank must join, even without
    prompts of its own)."""

    shares_training_model: bool = False
    synced: bool = False

    @abc.abstractmethod
    def generate(self, prompts: List[List[int]], sampling: SamplingConfig) -> List[Rollout]:
        """Rollouts ordered prompt by prompt, n per prompt."""

    @abc.abstractmethod
    def update_weights(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Load full (unsharded) student weights, named as in the Hugging Face model."""

    def close(self) -> None:  # pragma: no cover - engines with resources override it
        pass


def stop_token_ids(tokenizer, generation_config=None) -> List[int]:
    """The ids that end a response: the tokenizer's eos and every eos id of the model's generation config (chat
    models such as Gemma and Phi-3 end a turn on a token other than the tokenizer's eos)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    extra = getattr(generation_config, "eos_token_id", None)
    for i in ([] if extra is None else [extra] if isinstance(extra, int) else list(extra)):
        if i not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config names an eos token: responses "
                         "would never end")
    return ids
