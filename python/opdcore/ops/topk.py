"""Streaming top-k extraction: full rows, chunked state, and fused with the LM head.

All functions return float32 log-probs for float32/bfloat16/float16 logits (float64 for float64 logits).
Top-k ids are ordered by log-prob descending; ties go to the lower vocabulary id.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

from opdcore.ops._device import check_device, check_devices

_ops = torch.ops.opdcore
_EMPTY_ID = torch.iinfo(torch.int64).max
DEFAULT_CHUNK = 4096


class TopK(NamedTuple):
    ids: torch.Tensor  # [N, k] int64
    logprobs: torch.Tensor  # [N, k] full-vocabulary log-softmax values
    lse: torch.Tensor  # [N] logsumexp(logits / temperature)
    entropy: torch.Tensor  # [N]


class StreamResult(NamedTuple):
    ids: torch.Tensor
    logprobs: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    target_logprobs: torch.Tensor  # [N, m] log-probs at the requested ids (m may be 0)


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    """Top-k ids and log-probs of softmax(logits / temperature), with log-sum-exp and entropy, in one pass. Not
    differentiable (the outputs never require grad; the losses below carry gradients)."""
    check_device(logits, "logits")
    return TopK(*_ops.topk_logprobs(logits.detach(), int(k), float(temperature)))


def logprobs_at(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0):
    """Full-vocabulary log-probs at ids [N, m] (and lse [N]) in one pass; ids outside [0, V) are an error. Not
    differentiable, like topk_logprobs."""
    check_devices(logits=logits, ids=ids)
    return _ops.logprobs_at(logits.detach(), as_long(ids, "ids"), float(temperature))


def as_long(ids: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {getattr(ids, 'dtype', type(ids))}")
    return ids.long()


class StreamState:
    """Per-row streaming state: feed vocabulary chunks in any order, merge states, finalize.

    The same merge combines tensor-parallel vocabulary shards (each rank streams its shard, then the states
    are gathered and merged).
    """

    def __init__(self, rows: int, k: int = 0, target_ids: Optional[torch.Tensor] = None,
                 dtype: torch.dtype = torch.float32, device=None, temperature: float = 1.0):
        if rows < 1:
            raise ValueError(f"rows must be >= 1 (empty batch), got {rows}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype (the accumulator) must be float32 or float64, got {dtype}")
        self.temperature = float(temperature)
        self.max = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        self.sumexp = torch.zeros(rows, dtype=dtype, device=device)
        self.ent = torch.zeros(rows, dtype=dtype, device=device)
        self.heap_vals = torch.full((rows, k), float("-inf"), dtype=dtype, device=device)
        self.heap_ids = torch.full((rows, k), _EMPTY_ID, dtype=torch.int64, device=device)
        if target_ids is None:
            target_ids = torch.empty(rows, 0, dtype=torch.int64, device=device)
        target_ids = as_long(target_ids, "target_ids")
        if target_ids.dim() != 2 or target_ids.shape[0] != rows:
            raise ValueError(f"target_ids must be [rows={rows}, m], got {tuple(target_ids.shape)}")
        if target_ids.numel() and int(target_ids.min()) < 0:
            raise ValueError("target_ids holds a negative id")
        self.target_ids = target_ids.contiguous()
        self.target_vals = torch.full(target_ids.shape, float("nan"), dtype=dtype, device=device)
        self.fed: List[Tuple[int, int]] = []  # the vocabulary ranges streamed so far: each id may come once

    def _tensors(self):
        return (self.max, self.sumexp, self.ent, self.heap_vals, self.heap_ids, self.target_vals)

    def update(self, logits_chunk: torch.Tensor, vocab_offset: int) -> "StreamState":
        """Feed logits [rows, n] of vocabulary ids [vocab_offset, vocab_offset + n) (not differentiable)."""
        check_devices(logits_chunk=logits_chunk, state=self.max)
        m, s, e, hv, hi, tv = self._tensors()
        n = logits_chunk.shape[-1] if logits_chunk.dim() else 0
        fed = self._add_ranges([(int(vocab_offset), int(vocab_offset) + n)], "logits chunk")
        _ops.stream_update(m, s, e, hv, hi, self.target_ids, tv, logits_chunk.detach(), int(vocab_offset),
                           self.temperature)
        self.fed = fed
        return self

    def merge(self, other: "StreamState") -> "StreamState":
        """self <- merge(self, other): the states of two disjoint vocabulary ranges."""
        if other.temperature != self.temperature or not torch.equal(other.target_ids, self.target_ids):
            raise ValueError("cannot merge stream states with different temperatures or target ids")
        fed = self._add_ranges(other.fed, "the merged state")
        _ops.stream_merge(*self._tensors(), *other._tensors())
        self.fed = fed
        return self

    def _add_ranges(self, ranges, what: str) -> List[Tuple[int, int]]:
        """self.fed with ranges added; an overlap (ids counted twice: a wrong log-sum-exp) is an error."""
        for lo, hi in ranges:
            for a, b in self.fed:
                if lo < b and a < hi:
                    raise ValueError(f"{what} covers vocabulary ids [{lo}, {hi}), overlapping [{a}, {b}) already "
                                     f"streamed into this state: each id must be fed exactly once")
        return self.fed + [(lo, hi) for lo, hi in ranges if hi > lo]

    def finalize(self) -> StreamResult:
        return StreamResult(*_ops.stream_finalize(*self._tensors()))


def check_linear(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: Optional[int]) -> int:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden has H={hidden.shape[1]}, weight has H={weight.shape[1]}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    if hidden.shape[0] == 0:
        raise ValueError("hidden has no rows (empty batch)")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows (a vocabulary of 0)")
    chunk = DEFAULT_CHUNK if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return min(chunk, weight.shape[0])



# Row-block budget of the losses that form their gradient in the forward: [rows, V] logits per block. 2^25 (128 MiB
# in float32) keeps >= 220 rows at V = 151936; the GEMMs of 110-row blocks (2^24) ran 1.4x slower on a 2-core
# AVX-512 CPU (benchmarks/RESULTS.md, bench_floors).
DEFAULT_BLOCK_ELEMENTS = 1 << 25

def check_weighted(hidden: torch.Tensor, token_weights: torch.Tensor, max_block_elements: int) -> None:
    """The arguments of the row-block losses that form their gradient in the forward."""
    if token_weights.shape != (hidden.shape[0],) or not token_weights.is_floating_point():
        raise ValueError(f"token_weights must be a floating [N={hidden.shape[0]}] tensor, got "
                         f"{tuple(token_weights.shape)} {token_weights.dtype}")
    if max_block_elements < 1:
        raise ValueError(f"max_block_elements must be >= 1, got {max_block_elements}")


def iter_head_chunks(hidden: torch.Tensor, weight: torch.Tensor, chunk: int):
    """Yield (offset, logits chunk) for hidden @ weight[offset:offset+chunk].T, reusing one workspace."""
    V = weight.shape[0]
    work = torch.empty(hidden.shape[0], chunk, dtype=hidden.dtype, device=hidden.device)
    for off in range(0, V, chunk):
        n = min(chunk, V - off)
        out = work[:, :n]
        torch.matmul(hidden, weight[off:off + n].T, out=out)
        yield off, out


# The kernels behind linear_topk: "stream" forms logits chunk by chunk in a workspace that the streaming kernel
# reads; the tiled ones (CUDA) keep each 128 x 128 logits tile in registers. "sm90" is CUTLASS's TMA + wgmma
# mainloop (Hopper, sm_90a); "simt" is a plain-FMA mainloop feeding the same epilogue (any GPU; the test twin).
HEAD_KERNELS = {"stream": None, "simt": 0, "sm90": 1}


@torch.no_grad()
def linear_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, temperature: float = 1.0,
                chunk_size: Optional[int] = None, ids: Optional[torch.Tensor] = None,
                kernel: str = "stream") -> StreamResult:
    """Top-k of softmax(hidden @ weight.T / temperature) without materialising [N, V] logits.

    kernel="stream" (default): the LM-head matmul runs chunk by chunk into one [N, chunk_size] workspace that the
    streaming kernel consumes; optionally also log-probs at ids [N, m] from the same pass (target_logprobs).
    kernel="sm90" / "simt" (CUDA, 16-bit or (simt) float32 inputs, k <= 32, no ids): one tiled kernel, the logits
    only ever in registers, products accumulated in float32 (the stream path rounds logits to the input dtype).
    "sm90" is used only where asked for until a GPU run has verified it (benchmarks/gpu_check.sh).
    """
    if kernel not in HEAD_KERNELS:
        raise ValueError(f"kernel must be one of {sorted(HEAD_KERNELS)}, got {kernel!r}")
    check_devices(hidden=hidden, weight=weight, ids=ids)
    if HEAD_KERNELS[kernel] is not None:
        return _linear_topk_tiled(hidden, weight, k, temperature, chunk_size, ids, kernel)
    chunk = check_linear(hidden, weight, chunk_size)
    if ids is not None and ids.numel() and int(ids.max()) >= weight.shape[0]:
        raise ValueError(f"ids holds an id >= vocab size {weight.shape[0]}")
    if k > weight.shape[0]:
        raise ValueError(f"k must be in [0, vocab={weight.shape[0]}], got {k}")
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    state = StreamState(hidden.shape[0], k, ids, dtype=acc, device=hidden.device, temperature=temperature)
    for off, logits in iter_head_chunks(hidden, weight, chunk):
        state.update(logits, off)
    return state.finalize()


def _linear_topk_tiled(hidden, weight, k, temperature, chunk_size, ids, kernel) -> StreamResult:
    if ids is not None or chunk_size is not None:
        raise ValueError(f"kernel={kernel!r} takes no ids or chunk_size (use kernel='stream')")
    if _ops.name == "opdcore" and hidden.device.type != "cuda":
        raise ValueError(f"kernel={kernel!r} runs on CUDA tensors, hidden is on {hidden.device}")
    out = _ops.linear_topk_tiled(hidden.detach(), weight.detach(), int(k), float(temperature), HEAD_KERNELS[kernel])
    return StreamResult(*out, out[1].new_empty(hidden.shape[0], 0))
