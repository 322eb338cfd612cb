"""Packed sequences: the varlen layout (flat [N] stream + cu_seqlens) and a buffer that builds it.

Layout (flash-attn convention, ARCHITECTURE.md): B sequences back to back in a flat [N] token stream,
`cu_seqlens` int32 [B+1] with the offsets, position ids restarting at 0 in every sequence, `max_seqlen` the
longest length, and a loss mask that is True on response tokens. Per-token payloads (teacher top-k ids
[N, k] int64, log-probs [N, k] float32, scalars [N] float32) ride along the stream, zero on prompt tokens.

The loss mask marks the response tokens themselves; a causal LM predicts token t from position t - 1, so a
trainer that scores logits shifts it by one inside each sequence.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from opdcore import _native
from opdcore.ops._device import check_device

_C = _native._C
_ops = torch.ops.opdcore

TokenIds = Union[torch.Tensor, Sequence[int]]


# ---- padded <-> packed ----------------------------------------------------------------------------------------

def _pad_setup(ctx, inputs, output):
    _, cu_seqlens, _, _ = inputs
    ctx.save_for_backward(cu_seqlens)


def _pad_backward(ctx, grad):
    (cu_seqlens,) = ctx.saved_tensors
    return _ops.unpad_packed(grad, cu_seqlens), None, None, None


def _unpad_setup(ctx, inputs, output):
    padded, cu_seqlens = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.max_seqlen = padded.shape[1]


def _unpad_backward(ctx, grad):
    (cu_seqlens,) = ctx.saved_tensors
    return _ops.pad_packed(grad, cu_seqlens, ctx.max_seqlen, 0.0), None


# pad and unpad are each other's adjoints (the padding receives no gradient).
torch.library.register_autograd("opdcore::pad_packed", _pad_backward, setup_context=_pad_setup)
torch.library.register_autograd("opdcore::unpad_packed", _unpad_backward, setup_context=_unpad_setup)


def _check_pair(x: torch.Tensor, name: str, cu_seqlens: torch.Tensor) -> None:
    check_device(x, name)
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.device != x.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {name} is on {x.device}")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D [B + 1] (sequence start offsets, then the total), got shape "
                         f"{tuple(cu_seqlens.shape)}")


def to_padded(packed: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: Optional[int] = None,
              pad_value: float = 0.0) -> torch.Tensor:
    """Packed [N, ...] -> padded [B, max_seqlen, ...], filling past each sequence's end with pad_value.

    Any dtype (pad_value must be representable in it: an integer for ids, 0/1 for bool). Differentiable.
    max_seqlen=None reads it from cu_seqlens (a device sync on GPU; pass PackedBatch.max_seqlen instead).
    """
    _check_pair(packed, "packed", cu_seqlens)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() >= 2 else 0
    return _ops.pad_packed(packed, cu_seqlens, int(max_seqlen), float(pad_value))


def from_padded(padded: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Padded [B, T, ...] -> packed [N, ...]: the first cu_seqlens[b+1] - cu_seqlens[b] rows of each b."""
    _check_pair(padded, "padded", cu_seqlens)
    return _ops.unpad_packed(padded, cu_seqlens)


# ---- the pack result --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # [N] int64
    position_ids: torch.Tensor  # [N] int64, restarting at 0 per sequence
    cu_seqlens: torch.Tensor  # [B+1] int32
    max_seqlen: int
    loss_mask: torch.Tensor  # [N] bool, True on response tokens
    seq_ids: torch.Tensor  # [B] int64: the buffer index of each packed sequence
    payloads: Dict[str, torch.Tensor]  # name -> [N, ...], zero on prompt tokens

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        """Every tensor moved to device (max_seqlen stays a Python int: no sync needed later)."""
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return dataclasses.replace(
            self, input_ids=mv(self.input_ids), position_ids=mv(self.position_ids), cu_seqlens=mv(self.cu_seqlens),
            loss_mask=mv(self.loss_mask), seq_ids=mv(self.seq_ids),
            payloads={k: mv(v) for k, v in self.payloads.items()})

    def to_padded(self, packed: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
        """A [N, ...] tensor aligned with this batch -> [B, max_seqlen, ...]."""
        return to_padded(packed, self.cu_seqlens, self.max_seqlen, pad_value)

    def from_padded(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] (T >= max_seqlen) -> [N, ...] aligned with this batch."""
        return from_padded(padded, self.cu_seqlens)


# ---- the buffer -------------------------------------------------------------------------------------------------

def _ids(x: TokenIds) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    x = list(x)
    # an empty list must reach the native "is empty" check, not a float32 dtype error
    return torch.tensor(x, dtype=torch.int64) if not x else torch.as_tensor(x)


def _index_list(values, name: str) -> List[int]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    out = []
    for i, v in enumerate(values):
        try:
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{name} must hold integers, got {v!r} at position {i}") from None
    return out


class PackedBuffer:
    """Variable-length sequences (prompt + response ids, per-response-token payloads) held in native storage.

        buf = PackedBuffer()
        buf.add(prompt_ids, response_ids, {"teacher_ids": ids_rk, "teacher_logprobs": lp_rk})
        for batch in buf.micro_batches(max_tokens=16384):
            ...  # batch.input_ids, batch.cu_seqlens, batch.payloads["teacher_logprobs"], ...

    Every payload has a leading dim equal to the response length; the first sequence fixes the payload names,
    dtypes and trailing shapes. Tensors are copied to host memory on add; pack() returns CPU tensors
    (PackedBatch.to(device) moves them). A failed add leaves the buffer unchanged.
    """

    def __init__(self) -> None:
        self._impl = _C.PackedBuffer()

    def add(self, prompt_ids: TokenIds, response_ids: TokenIds,
            payloads: Optional[Mapping[str, torch.Tensor]] = None) -> int:
        """Append one sequence; returns its index."""
        if isinstance(payloads, Mapping) and not isinstance(payloads, dict):
            payloads = dict(payloads)  # anything else reaches the native check, which names payloads
        return self._impl.add(_ids(prompt_ids), _ids(response_ids), payloads)

    def pack(self, indices: Optional[Sequence[int]] = None) -> PackedBatch:
        """Pack the sequences at indices (in that order; default all) into the varlen layout."""
        d = self._impl.pack(None if indices is None else _index_list(indices, "indices"))
        return PackedBatch(**d)

    def split(self, max_tokens: Optional[int] = None, *, num_micro_batches: Optional[int] = None) -> List[List[int]]:
        """Balanced micro-batches as lists of sequence indices; see split_micro_batches."""
        return self._impl.split(max_tokens, num_micro_batches)

    def micro_batches(self, max_tokens: Optional[int] = None, *,
                      num_micro_batches: Optional[int] = None) -> List[PackedBatch]:
        return [self.pack(mb) for mb in self.split(max_tokens, num_micro_batches=num_micro_batches)]

    def clear(self) -> None:
        """Drop every sequence (and the payload schema)."""
        self._impl.clear()

    def __len__(self) -> int:
        return len(self._impl)

    @property
    def num_tokens(self) -> int:
        return self._impl.num_tokens

    @property
    def lengths(self) -> List[int]:
        """Prompt + response length of each sequence."""
        return self._impl.lengths

    @property
    def prompt_lengths(self) -> List[int]:
        return self._impl.prompt_lengths

    @property
    def response_lengths(self) -> List[int]:
        return self._impl.response_lengths

    @property
    def payload_names(self) -> List[str]:
        return self._impl.payload_names


def split_micro_batches(lengths: Union[Sequence[int], torch.Tensor], max_tokens: Optional[int] = None, *,
                        num_micro_batches: Optional[int] = None) -> List[List[int]]:
    """Balanced micro-batches over sequence lengths: longest first, each to the least-loaded micro-batch.

    max_tokens only: the fewest micro-batches the greedy fits under the token budget. num_micro_batches only:
    exactly that many. Both: exactly num_micro_batches, each within max_tokens, else an error. For data
    parallelism, all-reduce (MAX) len(split_micro_batches(lengths, max_tokens)) over ranks and pass it as
    num_micro_batches, so every rank runs the same number of micro-batches. Indices ascend within a
    micro-batch; micro-batch 0 holds the longest sequence. A sequence longer than max_tokens is an error.
    """
    return _C.split_micro_batches(_index_list(lengths, "lengths"), max_tokens, num_micro_batches)
