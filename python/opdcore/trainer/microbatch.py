"""Micro-batches of rollouts for the model forward: packed stream -> padded [B, T] + response positions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from opdcore.packing import PackedBatch, PackedBuffer
from opdcore.rollout import Rollout
from opdcore.trainer import dist


@dataclass
class MicroBatch:
    indices: List[int]  # rollout indices (rank-local)
    input_ids: torch.Tensor  # [B, T]: one right-padded sequence per row, or packed rows (position_ids)
    attention_mask: Optional[torch.Tensor]  # [B, T]; None for packed rows
    pred_index: torch.Tensor  # [R] flat positions in [B*T] whose hidden state predicts a response token
    targets: torch.Tensor  # [R] the response tokens
    token_seq: torch.Tensor  # [R] rollout index of each response token
    rollout_logprobs: torch.Tensor  # [R] the engine's log-prob of each response token (NaN if unknown)
    positions: torch.Tensor  # [R] position of each token in its response (0 = first response token)
    # packed rows: [B, T] position ids restarting at 0 with every sequence (transformers then masks attention
    # between a row's sequences); None for one sequence per row
    position_ids: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())


def row_layout(lengths: List[int], width: int) -> List[Tuple[int, int]]:
    """(row, column) of each sequence packed into rows of `width` tokens: first fit in decreasing length (ties in
    order), within 11/9 of the fewest rows possible plus one."""
    if any(n > width for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit rows of {width}")
    free: List[int] = []
    place = [(0, 0)] * len(lengths)
    for s in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, f in enumerate(free) if f >= lengths[s]), len(free))
        if row == len(free):
            free.append(width)
        place[s] = (row, width - free[row])
        free[row] -= lengths[s]
    return place


def from_packed(batch: PackedBatch, indices: List[int], device, pack_rows: bool = False) -> MicroBatch:
    """The micro-batch of a packed batch: one right-padded sequence per row, or (pack_rows) several sequences per
    row of the longest sequence's width, each with position ids restarting at 0 and no attention mask (the
    model must keep them apart: trainer.models.packs_rows)."""
    T = batch.max_seqlen
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    seq_of = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)  # [N]
    start = batch.cu_seqlens.long()[seq_of]  # [N] each token's sequence start in the packed stream
    if pack_rows:
        place = torch.tensor(row_layout(lengths.tolist(), T), dtype=torch.long).reshape(-1, 2)
        flat = place[seq_of, 0] * T + place[seq_of, 1] + torch.arange(seq_of.numel()) - start  # [N]
        rows = int(place[:, 0].max()) + 1 if place.numel() else 0
        input_ids = torch.zeros(rows * T, dtype=batch.input_ids.dtype).index_copy_(0, flat, batch.input_ids)
        # padding continues its row's column numbers: it follows the row's sequences, so none of them sees it
        position_ids = torch.arange(T).repeat(rows).index_copy_(0, flat, batch.position_ids.long())
        input_ids, position_ids, attention_mask = input_ids.view(rows, T), position_ids.view(rows, T), None
    else:
        flat = seq_of * T + torch.arange(seq_of.numel()) - start
        input_ids = batch.to_padded(batch.input_ids)
        attention_mask, position_ids = batch.to_padded(torch.ones_like(batch.input_ids)).to(device), None
    j = batch.loss_mask.nonzero().squeeze(1)
    seq = seq_of[j]
    offset = j - start[j]
    # responses end their sequences: the response starts at the sequence length minus its masked token count
    response_len = torch.zeros_like(lengths).index_add_(0, seq, torch.ones_like(seq))
    positions = offset - (lengths - response_len)[seq]
    # a causal LM predicts the token at offset o from the hidden state at o - 1 (prompts are never empty)
    pred_index = flat[j] - 1
    return MicroBatch(indices, input_ids.to(device), attention_mask, pred_index.to(device),
                      batch.input_ids[j].to(device), batch.seq_ids[seq].to(device),
                      batch.payloads["rollout_logprobs"][j].to(device), positions.to(device),
                      None if position_ids is None else position_ids.to(device))


def build(rollouts: List[Rollout], max_tokens: int, device, min_count: int = 1,
          pack_rows: bool = False) -> List[MicroBatch]:
    """Split the rank's rollouts under a token budget into at least min_count micro-batches (one per
    mini-batch at least), with the same number on every rank (each FSDP forward is a collective, so ranks must
    run equally many). pack_rows: several sequences per row (from_packed)."""
    buf = PackedBuffer()
    for r in rollouts:
        lp = r.rollout_logprobs if r.rollout_logprobs is not None else [float("nan")] * len(r.response_ids)
        buf.add(r.prompt_ids, r.response_ids, {"rollout_logprobs": torch.tensor(lp, dtype=torch.float32)})
    groups = buf.split(max_tokens)
    count = max(int(dist.all_reduce([len(groups)], op="max")[0]), min_count)
    if count > len(groups):  # rebalance into as many as the busiest rank; None marks a rank with too few rollouts
        groups = buf.split(num_micro_batches=min(count, len(rollouts)))
        groups += [[]] * (count - len(groups))
    return [from_packed(buf.pack(g), g, device, pack_rows) if g else None for g in groups]
