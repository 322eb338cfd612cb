"""Rollouts with transformers' generate: runs anywhere torch runs (the default; CPU included)."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import (DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel,
                          TemperatureLogitsWarper, TopPLogitsWarper)

from opdcore.ops.sampling import sample_tokens
from opdcore.rollout import decode_attention
from opdcore.rollout.base import Rollout, RolloutEngine, SamplingConfig, stop_token_ids


class _DrawTokens(LogitsProcessor):
    """The draw itself: opdcore.sample_tokens on the processed scores (one fused pass, the drawn token's log-prob
    with it), recorded per step; the scores it returns leave only the drawn token, so generate runs greedy and
    just appends it. Replaces generate's softmax + multinomial (an exponential variate per vocabulary entry:
    ~30 ms per step at [32, 49152] on 2 CPU cores) and a log_softmax + gather to record the log-probs.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature  # 0: greedy
        self.logprobs: List[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        drawn = sample_tokens(scores, self.temperature)
        self.logprobs.append(drawn.logprobs)
        scores.fill_(float("-inf"))  # generate's own float32 copy of the logits: safe to overwrite
        scores.scatter_(1, drawn.ids[:, None], 0.0)
        return scores

    def finish(self, rows: int) -> torch.Tensor:
        """[rows, steps] log-probs of the drawn tokens."""
        return torch.stack(self.logprobs, dim=1).cpu() if self.logprobs else torch.empty(rows, 0)


class _MaskPaddedVocab(LogitsProcessor):
    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, input_ids, scores):
        scores[:, self.limit:] = float("-inf")
        return scores


class _Attention:
    """Switches a CPU model on sdpa attention to opdcore's decode attention until close()."""

    def __init__(self, model, previous: Optional[str]):
        self.model, self.previous = model, previous

    def close(self) -> None:
        if self.previous is not None:
            self.model.set_attn_implementation(self.previous)


def _decode_attention(model, enabled: bool) -> _Attention:
    """Unsharded CPU models on sdpa only (a sharded model's attention sees DTensors or a rank's heads)."""
    hf = getattr(getattr(model, "model", None), "hf", model)  # GenerateThroughRoot -> OPDModel -> transformers
    config = getattr(hf, "config", None)
    first = next(hf.parameters())
    if (not enabled or config is None or getattr(config, "_attn_implementation", None) != "sdpa"
            or first.device.type != "cpu" or isinstance(first, DTensor)
            or not hasattr(hf, "set_attn_implementation")):
        return _Attention(hf, None)
    hf.set_attn_implementation(decode_attention.NAME)
    return _Attention(hf, "sdpa")


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class HFEngine(RolloutEngine):
    """Generates with a plain (unsharded) copy of the student.

    With one process the engine can share the training model itself (no weight sync needed); under FSDP the
    trainer gives it a separate replica and calls update_weights() after each step.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64, shares_training_model: bool = False,
                 vocab_limit: int = 0, synced: bool = False):
        self.model = model
        # synced: the model is sharded (FSDP2 or tensor-parallel), so every forward is a collective: all ranks run
        # the same number of generate calls (padding with a throw-away batch) and of decoding steps (synced_gpus)
        self.synced = synced
        self.vocab_limit = vocab_limit
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.shares_training_model = shares_training_model
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (for example tokenizer.pad_token = eos)")
        self.stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))

    @torch.no_grad()
    def generate(self, prompts: List[List[int]], sampling: SamplingConfig) -> List[Rollout]:
        was_training = self.model.training
        self.model.eval()
        attention = _decode_attention(self.model, enabled=not self.synced)
        try:
            out: List[Rollout] = []
            expanded = [(i, p) for i, p in enumerate(prompts) for _ in range(sampling.n)]
            batches = [expanded[s:s + self.batch_size] for s in range(0, len(expanded), self.batch_size)]
            for batch in batches:
                out.extend(self._generate_batch(batch, sampling))
            if self.synced and dist.is_initialized():
                most = torch.tensor([len(batches)], device=_comm_device())
                dist.all_reduce(most, op=dist.ReduceOp.MAX)
                filler = [(0, [self.tokenizer.pad_token_id])]
                for _ in range(int(most) - len(batches)):
                    self._generate_batch(filler, sampling)
            return out
        finally:
            self.model.train(was_training)
            attention.close()

    def _generate_batch(self, items, sampling: SamplingConfig) -> List[Rollout]:
        tok = self.tokenizer
        pad, stops = tok.pad_token_id, self.stop_ids
        width = max(len(p) for _, p in items)
        device = next(self.model.parameters()).device
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for row, (_, p) in enumerate(items):  # left padding: generation continues from the right end
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        temperature = sampling.temperature
        processors = LogitsProcessorList()
        if self.vocab_limit and self.vocab_limit < self.model.get_output_embeddings().weight.shape[0]:
            processors.append(_MaskPaddedVocab(self.vocab_limit))  # padded LM-head rows are not tokens
        if temperature > 0 and sampling.top_p < 1.0:
            # top-p needs the tempered scores first; the draw then samples them as they are
            processors.extend([TemperatureLogitsWarper(temperature), TopPLogitsWarper(sampling.top_p)])
            temperature = 1.0
        recorder = _DrawTokens(temperature)
        processors.append(recorder)
        # greedy on the recorder's one-token scores: generate adds no warpers or sampling of its own
        config = GenerationConfig(do_sample=False, max_new_tokens=sampling.max_new_tokens, pad_token_id=pad,
                                  eos_token_id=stops, bos_token_id=tok.bos_token_id)
        ids, mask = ids.to(device), mask.to(device)
        shared = self._shared_prompt_cache(items, ids, mask)
        gen = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                  logits_processor=processors, synced_gpus=self.synced and dist.is_initialized(),
                                  **({"past_key_values": shared} if shared is not None else {}))
        new = gen[:, width:].cpu()
        logprobs = recorder.finish(len(items))
        rollouts = []
        for row, (i, p) in enumerate(items):
            toks = new[row].tolist()
            end = next((j for j, t in enumerate(toks) if t in stops), None)
            finished = end is not None
            length = end + 1 if finished else len(toks)
            rollouts.append(Rollout(i, list(p), toks[:length], logprobs[row, :length].tolist(), finished))
        return rollouts

    def _shared_prompt_cache(self, items, ids, mask):
        """The KV cache of every prompt but its last token, computed once per distinct prompt and repeated for
        its samples (generate would run the prompt's forward once per sample: n times the prefill). None where it
        does not apply: one sample per prompt, a batch that splits a prompt's samples unevenly, a sharded model
        (its forwards are collectives), or a model that is not a plain transformers model."""
        group = next((j for j, (i, _) in enumerate(items) if i != items[0][0]), len(items))
        if (group < 2 or self.synced or ids.shape[1] < 2 or len(items) % group
                or any(items[j][0] != items[j - j % group][0] for j in range(len(items)))
                or not isinstance(self.model, PreTrainedModel)):
            return None
        uniq_ids, uniq_mask = ids[::group, :-1], mask[::group, :-1]
        cache = DynamicCache(config=self.model.config)
        position_ids = (uniq_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: as generate numbers the positions
        self.model.get_decoder()(input_ids=uniq_ids, attention_mask=uniq_mask, position_ids=position_ids,
                                 past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(group)
        return cache

    def update_weights(self, state_dict: Dict[str, torch.Tensor]) -> None:
        if self.shares_training_model:
            return  # generating with the training model itself: already current
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
            raise RuntimeError(f"weight sync mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
