"""Micro-batches of rollouts for the model forward: packed stream -> padded [B, T] + response positions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from opdcore.packing import PackedBatch, PackedBuffer
from opdcore.rollout import Rollout
from opdcore.trainer import dist


@dataclass
class MicroBatch:
    indices: List[int]  # rollout indices (rank-local)
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    pred_index: torch.Tensor  # [R] flat positions in [B*T] whose hidden state predicts a response token
    targets: torch.Tensor  # [R] the response tokens
    token_seq: torch.Tensor  # [R] rollout index of each response token
    rollout_logprobs: torch.Tensor  # [R] the engine's log-prob of each response token (NaN if unknown)
    positions: torch.Tensor  # [R] position of each token in its response (0 = first response token)

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())


def from_packed(batch: PackedBatch, indices: List[int], device) -> MicroBatch:
    T = batch.max_seqlen
    input_ids = batch.to_padded(batch.input_ids)
    attention_mask = batch.to_padded(torch.ones_like(batch.input_ids))
    j = batch.loss_mask.nonzero().squeeze(1)
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)[j]
    offset = j - batch.cu_seqlens.long()[seq]
    # responses end their sequences: the response starts at the sequence length minus its masked token count
    response_len = torch.zeros_like(lengths).index_add_(0, seq, torch.ones_like(seq))
    positions = offset - (lengths - response_len)[seq]
    # a causal LM predicts the token at offset o from the hidden state at o - 1 (prompts are never empty)
    pred_index = seq * T + offset - 1
    return MicroBatch(indices, input_ids.to(device), attention_mask.to(device), pred_index.to(device),
                      batch.input_ids[j].to(device), batch.seq_ids[seq].to(device),
                      batch.payloads["rollout_logprobs"][j].to(device), positions.to(device))


def build(rollouts: List[Rollout], max_tokens: int, device, min_count: int = 1) -> List[MicroBatch]:
    """Split the rank's rollouts under a token budget into at least min_count micro-batches (one per
    mini-batch at least), with the same number on every rank (each FSDP forward is a collective, so ranks must
    run equally many)."""
    buf = PackedBuffer()
    for r in rollouts:
        lp = r.rollout_logprobs if r.rollout_logprobs is not None else [float("nan")] * len(r.response_ids)
        buf.add(r.prompt_ids, r.response_ids, {"rollout_logprobs": torch.tensor(lp, dtype=torch.float32)})
    groups = buf.split(max_tokens)
    count = max(int(dist.all_reduce([len(groups)], op="max")[0]), min_count)
    if count > len(groups):  # rebalance into as many as the busiest rank; None marks a rank with too few rollouts
        groups = buf.split(num_micro_batches=min(count, len(rollouts)))
        groups += [[]] * (count - len(groups))
    return [from_packed(buf.pack(g), g, device) if g else None for g in groups]
