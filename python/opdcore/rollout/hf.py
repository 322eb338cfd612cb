"""Rollouts with transformers' generate: runs anywhere torch runs (the default; CPU included)."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                          TopPLogitsWarper)

from opdcore.rollout.base import Rollout, RolloutEngine, SamplingConfig, stop_token_ids


class _RecordLogprobs(LogitsProcessor):
    """Records the log-prob of each sampled token under the distribution it was sampled from.

    Placed after the temperature / top-p warpers: at step t it sees the token chosen at step t-1 as the last
    input id and the previous step's log-probs, which it keeps (one [B, V] tensor, never the whole history).
    """

    def __init__(self):
        self.prev = None
        self.taken: List[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.taken.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """[B, steps] log-probs, given the tokens sampled at the final step."""
        if self.prev is not None:
            self.taken.append(self.prev.gather(1, last_tokens[:, None]).squeeze(1))
        return torch.stack(self.taken, dim=1) if self.taken else torch.empty(last_tokens.shape[0], 0)


class _MaskPaddedVocab(LogitsProcessor):
    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, input_ids, scores):
        scores[:, self.limit:] = float("-inf")
        return scores


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
        greedy = sampling.temperature == 0
        recorder = _RecordLogprobs()
        processors = LogitsProcessorList()
        if self.vocab_limit and self.vocab_limit < self.model.get_output_embeddings().weight.shape[0]:
            processors.append(_MaskPaddedVocab(self.vocab_limit))  # padded LM-head rows are not tokens
        if not greedy:
            # our own warpers, in a fixed order, so the recorder sees exactly the sampling distribution
            processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(sampling.top_p))
        processors.append(recorder)
        # temperature 1 / top-p 1 / top-k 0 keep generate from adding warpers of its own
        config = GenerationConfig(do_sample=not greedy, max_new_tokens=sampling.max_new_tokens, temperature=1.0,
                                  top_p=1.0, top_k=0, pad_token_id=pad, eos_token_id=stops, bos_token_id=tok.bos_token_id)
        gen = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                  logits_processor=processors, synced_gpus=self.synced and dist.is_initialized())
        new = gen[:, width:].cpu()
        logprobs = recorder.finish(new[:, -1].to(recorder.prev.device) if new.shape[1] else new[:, 0]).cpu()
        rollouts = []
        for row, (i, p) in enumerate(items):
            toks = new[row].tolist()
            end = next((j for j, t in enumerate(toks) if t in stops), None)
            finished = end is not None
            length = end + 1 if finished else len(toks)
            rollouts.append(Rollout(i, list(p), toks[:length], logprobs[row, :length].tolist(), finished))
        return rollouts

    def update_weights(self, state_dict: Dict[str, torch.Tensor]) -> None:
        if self.shares_training_model:
            return  # generating with the training model itself: already current
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
            raise RuntimeError(f"weight sync mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
