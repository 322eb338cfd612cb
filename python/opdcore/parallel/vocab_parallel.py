"""Vocabulary-parallel ops (Megatron-style): rank r of `group` holds the logits (or LM-head rows) of the r-th
contiguous vocabulary shard, and the ops return what the single-device ops return on the full vocabulary.

Each rank streams its shard into a StreamState (top-k candidates, online max / sum-exp / entropy, values at
requested ids); the states are all-gathered (O(N * (3 + k + m)) numbers per rank, never [N, V]) and merged in
rank order, so every rank holds the same, deterministic result. The losses need only the global log-sum-exp and
the set's log-probs in the forward; their backward is local (each rank writes the gradient of its own columns).

Shard sizes may differ between ranks (V need not divide evenly); offsets follow from the sizes in rank order.
Every collective is entered by every rank even when one rank's input is bad: the failure is shared first and
all ranks raise, instead of the healthy ranks waiting forever in the next collective.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from opdcore.ops import OPDLoss, PPOLoss, StreamResult, StreamState, TailKL, weight_mode_index
from opdcore.ops.blocks import (DEFAULT_BLOCK_ELEMENTS, OPDRule, as_long, check_linear, check_weighted, divergence_index, iter_head_chunks,
                                kernels, prepare_ppo, prepare_set, prepare_tail_kl, scaled_saved_grads)


def shard_range(vocab_size: int, rank: int, world_size: int) -> Tuple[int, int]:
    """(offset, size) of rank's shard when vocab_size is split as evenly as possible (the first ranks get the
    remainder), e.g. to slice an LM head: weight[offset:offset + size]."""
    if vocab_size < world_size or not 0 <= rank < world_size:
        raise ValueError(f"cannot split a vocabulary of {vocab_size} over {world_size} ranks (rank {rank})")
    base, extra = divmod(vocab_size, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def _comm_device(group) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")


def _exchange(values: Sequence[int], error: Optional[BaseException], what: str, group) -> torch.Tensor:
    """All-gather [failed, *values] from every rank; if any rank failed, raise on every rank with its message."""
    dev = _comm_device(group)
    mine = torch.tensor([int(error is not None), *values], dtype=torch.int64, device=dev)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    table = torch.stack(rows).cpu()
    if bool(table[:, 0].any()):
        msgs: List[Optional[str]] = [None] * len(rows)
        dist.all_gather_object(msgs, None if error is None else f"{type(error).__name__}: {error}", group=group)
        bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
        raise RuntimeError(f"{what}: " + "; ".join(f"rank {r}: {m}" for r, m in bad))
    return table[:, 1:]


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _width(ids) -> int:
    """The last dimension of an ids argument (-1: none) for the cross-rank agreement."""
    return ids.shape[-1] if isinstance(ids, torch.Tensor) and ids.dim() else -1


def _dtype_code(dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def _shard_layout(rows: int, cols: int, error: Optional[BaseException], what: str, group,
                  **agree: int) -> Tuple[int, int]:
    """(this rank's vocabulary offset, total vocabulary) from every rank's [rows, cols] shard. agree: numbers
    every rank must share (k, the set size, the dtype as _dtype_code), checked in the same exchange, so that a
    mismatch is the same clear error on every rank instead of a collective of mismatched tensors (which aborts
    gloo and hangs NCCL)."""
    table = _exchange([rows, cols, *agree.values()], error, what, group)
    if bool((table[:, 0] != rows).any()):
        raise RuntimeError(f"{what}: ranks disagree on the number of rows (tokens): {table[:, 0].tolist()}")
    for j, name in enumerate(agree):
        col = table[:, 2 + j].tolist()
        if len(set(col)) > 1:
            shown = [str(_DTYPES[c]) if 0 <= c < len(_DTYPES) else "other" for c in col] if name == "dtype" else col
            raise RuntimeError(f"{what}: ranks disagree on {name} (rank by rank: {shown}); every rank must pass "
                               f"the same")
    sizes = table[:, 1].tolist()
    rank = dist.get_rank(group)
    return int(sum(sizes[:rank])), int(sum(sizes))


def _gather_merge(state: StreamState, group) -> StreamState:
    """Every rank's state, merged in rank order (the same result on every rank)."""
    dev = _comm_device(group)
    world = dist.get_world_size(group)
    floats = torch.cat([state.max[:, None], state.sumexp[:, None], state.ent[:, None], state.heap_vals,
                        state.target_vals], 1).to(dev)
    gathered = [torch.empty_like(floats) for _ in range(world)]
    dist.all_gather(gathered, floats, group=group)
    k = state.heap_ids.shape[1]
    if k:
        ids = state.heap_ids.to(dev)
        gathered_ids = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(gathered_ids, ids, group=group)
    merged = None
    for r in range(world):
        f = gathered[r].to(state.max.device)
        s = StreamState(state.max.shape[0], k, state.target_ids, dtype=state.max.dtype, device=state.max.device,
                        temperature=state.temperature)
        s.max.copy_(f[:, 0])
        s.sumexp.copy_(f[:, 1])
        s.ent.copy_(f[:, 2])
        s.heap_vals.copy_(f[:, 3:3 + k])
        s.target_vals.copy_(f[:, 3 + k:])
        if k:
            s.heap_ids.copy_(gathered_ids[r].to(state.max.device))
        merged = s if merged is None else merged.merge(s)
    return merged


def _check_ids(ids: Optional[torch.Tensor], vocab: int, name: str) -> None:
    if ids is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{name} holds an id outside [0, vocab={vocab})")


def _stream_shards(what, rows, cols, k, ids, acc, device, temperature, feed, group) -> Tuple[StreamResult, int]:
    """The shared body of the ops: layout, local streaming (feed(state, offset)), gather, finalize. Returns the
    result and this rank's vocabulary offset."""
    err = None
    try:
        if ids is not None:
            ids = as_long(ids, "ids")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
    except (TypeError, ValueError) as e:
        err = e
    offset, vocab = _shard_layout(rows, cols, err, what, group, k=k, ids_columns=_width(ids),
                                  dtype=_dtype_code(acc))
    state, err = None, None
    try:
        if k > vocab:
            raise ValueError(f"k must be in [0, vocab={vocab}], got {k}")
        _check_ids(ids, vocab, "ids")
        state = StreamState(rows, k, ids, dtype=acc, device=device, temperature=temperature)
        feed(state, offset)
    except (RuntimeError, ValueError) as e:
        err = e
    _exchange([], err, what, group)
    return _gather_merge(state, group).finalize(), offset


@torch.no_grad()
def vocab_parallel_topk_logprobs(logits_shard: torch.Tensor, k: int, *, ids: Optional[torch.Tensor] = None,
                                 temperature: float = 1.0, group=None) -> StreamResult:
    """topk_logprobs (and logprobs_at global ids [N, m]) of the full-vocabulary logits whose rank-r shard is
    logits_shard [N, V_r]. Top-k ids are global vocabulary ids; every rank gets the same StreamResult."""
    acc = torch.float64 if logits_shard.dtype == torch.float64 else torch.float32
    rows, cols = (logits_shard.shape[0], logits_shard.shape[1]) if logits_shard.dim() == 2 else (-1, -1)
    return _stream_shards("vocab_parallel_topk_logprobs", rows, cols, int(k), ids, acc, logits_shard.device,
                          temperature, lambda st, off: st.update(logits_shard, off), group)[0]


@torch.no_grad()
def vocab_parallel_linear_topk(hidden: torch.Tensor, weight_shard: torch.Tensor, k: int, *,
                               ids: Optional[torch.Tensor] = None, temperature: float = 1.0,
                               chunk_size: Optional[int] = None, group=None) -> StreamResult:
    """linear_topk with the LM head split by vocabulary rows: weight_shard [V_r, H] on rank r. The logits exist
    only one [N, chunk_size] chunk at a time on each rank."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32

    def feed(state, offset):
        for off, logits in iter_head_chunks(hidden, weight_shard, check_linear(hidden, weight_shard, chunk_size)):
            state.update(logits, offset + off)

    rows = hidden.shape[0] if hidden.dim() == 2 else -1
    cols = weight_shard.shape[0] if weight_shard.dim() == 2 else -1
    return _stream_shards("vocab_parallel_linear_topk", rows, cols, int(k), ids, acc, hidden.device, temperature,
                          feed, group)[0]


class _VocabParallelSetLoss(torch.autograd.Function):
    """A set loss (its rule: opdcore.ops.loss.OPDRule or the PPO rule) of the full-vocabulary logits whose
    shard this rank holds: the shards' states merge into the global log-sum-exp and set log-probs, the rule
    turns those into the loss and coefficients on every rank, the backward is local to each shard."""

    @staticmethod
    def forward(ctx, logits_shard, rule, what, group):
        acc = torch.float64 if logits_shard.dtype == torch.float64 else torch.float32
        res, offset = _stream_shards(what, logits_shard.shape[0], logits_shard.shape[1], 0, rule.ids, acc,
                                     logits_shard.device, rule.temperature,
                                     lambda st, off: st.update(logits_shard, off), group)
        # identical inputs on every rank (the merged log-probs, the replicated set values): all fail or none
        loss, coef = rule.from_logprobs(res.target_logprobs, 0, logits_shard.shape[0])
        ctx.save_for_backward(logits_shard, res.lse, coef)
        ctx.rule, ctx.offset = rule, offset
        ctx.mark_non_differentiable(coef, res.target_logprobs, res.lse)
        return loss, coef, res.target_logprobs, res.lse

    @staticmethod
    def backward(ctx, grad_loss, *_):
        logits_shard, lse, coef = ctx.saved_tensors
        grad = logits_shard.detach().clone(memory_format=torch.contiguous_format)
        # the local slice of the full gradient: dense softmax term + the set terms of ids in this shard
        kernels.opd_topk_loss_bwd_chunk_(grad, ctx.offset, grad_loss.contiguous(), lse, ctx.rule.ids, coef,
                                            ctx.rule.temperature)
        return grad, None, None, None


def vocab_parallel_opd_topk_loss(logits_shard: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                                 valid: Optional[torch.Tensor] = None, *, weight_mode: str = "student_p",
                                 temperature: float = 1.0, log_ratio_clip: float = 0.0, check_logprobs: bool = True,
                                 group=None) -> OPDLoss:
    """opd_topk_loss of the full-vocabulary logits whose rank-r shard is logits_shard [N, V_r]; ids are global
    vocabulary ids [N, K] (the same on every rank, like teacher_logprobs and valid). The loss is replicated on
    every rank; the gradient goes to each rank's own shard."""
    if logits_shard.dim() != 2:
        raise ValueError(f"logits_shard must be [N, V_r], got {tuple(logits_shard.shape)}")
    ids, tq, valid = prepare_set(ids, teacher_logprobs, valid, logits_shard.shape[0], logprobs=check_logprobs)
    if log_ratio_clip < 0:
        raise ValueError(f"log_ratio_clip must be >= 0 (0: off), got {log_ratio_clip}")
    acc = torch.float64 if logits_shard.dtype == torch.float64 else torch.float32
    rule = OPDRule(ids.contiguous(), tq.to(acc).contiguous(), valid.contiguous(), weight_mode_index(weight_mode),
                          float(temperature), float(log_ratio_clip))
    return OPDLoss(*_VocabParallelSetLoss.apply(logits_shard, rule, "vocab_parallel_opd_topk_loss", group))


class _VocabParallelWeightedLinearSetLoss(torch.autograd.Function):
    """sum_t token_weights[t] * loss_t of a set loss (its rule) on logits = hidden @ weight_shard.T per vocabulary
    shard, gradients formed in the forward (as opdcore.ops.loss.WeightedLinearSetLoss on one device), one
    [rows, V_r] block at a time: the block's shard logits stream into a state, the states merge across ranks
    (global log-sum-exp and set log-probs), the rule's loss and coefficients follow on every rank, the block's
    logits turn into their gradient in place, and d hidden (partial on each rank: its own columns) is summed
    across ranks."""

    @staticmethod
    def forward(ctx, hidden, weight_shard, token_weights, rule, rows_per_block, what, group):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, cols, ids = hidden.shape[0], weight_shard.shape[0], rule.ids
        offset, vocab = _shard_layout(N, cols, None, what, group, ids_columns=_width(ids), dtype=_dtype_code(acc))
        _exchange([], _first_error(lambda: _check_ids(ids, vocab, "ids")), what, group)
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight_shard.shape, dtype=acc, device=weight_shard.device) if need_w else None
        outs = [torch.empty(N, dtype=acc, device=hidden.device), torch.empty(ids.shape, dtype=acc, device=hidden.device),
                torch.empty(ids.shape, dtype=acc, device=hidden.device), torch.empty(N, dtype=acc, device=hidden.device)]
        loss, coef, slp, lse = outs
        with torch.no_grad():
            for r0 in range(0, N, rows_per_block):
                r1 = min(N, r0 + rows_per_block)
                h = hidden[r0:r1]
                z = h @ weight_shard.T
                state = StreamState(r1 - r0, 0, ids[r0:r1], dtype=acc, device=hidden.device,
                                    temperature=rule.temperature)
                _exchange([], _first_error(lambda: state.update(z, offset)), what, group)
                res = _gather_merge(state, group).finalize()
                # identical inputs on every rank (merged log-probs, replicated set values): all fail or none
                loss[r0:r1], coef[r0:r1] = rule.from_logprobs(res.target_logprobs, r0, r1)
                slp[r0:r1], lse[r0:r1] = res.target_logprobs, res.lse
                if need_h or need_w:
                    kernels.opd_topk_loss_bwd_chunk_(z, offset, token_weights[r0:r1], res.lse, ids[r0:r1],
                                                        coef[r0:r1], rule.temperature)
                    if need_h:
                        part = (z @ weight_shard).to(_comm_device(group))
                        dist.all_reduce(part, group=group)  # every rank's columns contribute
                        grad_h[r0:r1] = part.to(hidden.device)
                    if need_w:
                        grad_w.addmm_(z.T.to(acc), h.to(acc))
        ctx.save_for_backward(grad_h, grad_w.to(weight_shard.dtype) if need_w else None)
        ctx.mark_non_differentiable(loss, coef, slp, lse)
        return (loss.to(token_weights.dtype) * token_weights).sum(), loss, coef, slp, lse

    @staticmethod
    def backward(ctx, grad_total, *_):
        return scaled_saved_grads(ctx, grad_total, 7)


def _first_error(fn) -> Optional[BaseException]:
    """fn()'s ValueError / RuntimeError, or None: the error a rank shares before the next collective."""
    try:
        fn()
    except (RuntimeError, ValueError) as e:
        return e
    return None


def vocab_parallel_opd_topk_loss_linear_weighted(hidden: torch.Tensor, weight_shard: torch.Tensor, ids: torch.Tensor,
                                                 teacher_logprobs: torch.Tensor, token_weights: torch.Tensor,
                                                 valid: Optional[torch.Tensor] = None, *,
                                                 weight_mode: str = "student_p", temperature: float = 1.0,
                                                 log_ratio_clip: float = 0.0, max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
                                                 check_logprobs: bool = True, group=None):
    """opd_topk_loss_linear_weighted with the LM head split by vocabulary rows (weight_shard [V_r, H] on rank r;
    hidden, ids, teacher_logprobs, valid, token_weights the same on every rank): (sum_t token_weights[t] *
    loss_t, OPDLoss), replicated. Never holds more than one [rows, V_r] block of logits; per block the ranks
    exchange N·3 numbers plus the set values and the [rows, H] hidden-state gradient. d hidden is complete on
    every rank, d weight_shard is this rank's rows of the full gradient."""
    what = "vocab_parallel_opd_topk_loss_linear_weighted"
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32

    def check():
        check_linear(hidden, weight_shard, None)
        check_weighted(hidden, token_weights, max_block_elements)
        if log_ratio_clip < 0:
            raise ValueError(f"log_ratio_clip must be >= 0 (0: off), got {log_ratio_clip}")
        return prepare_set(as_long(ids, "ids"), teacher_logprobs, valid, hidden.shape[0],
                                  logprobs=check_logprobs)

    ids, tq, valid = _checked_everywhere(check, what, group)
    rule = OPDRule(ids.contiguous(), tq.to(acc).contiguous(), valid.contiguous(), weight_mode_index(weight_mode),
                          float(temperature), float(log_ratio_clip))
    return _weighted_linear(hidden, weight_shard, token_weights, rule, max_block_elements, what, OPDLoss, group)


def _weighted_linear(hidden, weight_shard, token_weights, rule, max_block_elements, what, result, group):
    rows = max(1, min(hidden.shape[0], max_block_elements // max(1, weight_shard.shape[0])))
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    total, *out = _VocabParallelWeightedLinearSetLoss.apply(hidden, weight_shard,
                                                            token_weights.detach().to(acc).contiguous(), rule, rows,
                                                            what, group)
    return total, result(*out)


def vocab_parallel_ppo_topk_loss(logits_shard: torch.Tensor, ids: torch.Tensor, old_logprobs: torch.Tensor,
                                 advantages: torch.Tensor, valid: Optional[torch.Tensor] = None, *,
                                 temperature: float = 1.0, clip_low: float = 0.2, clip_high: Optional[float] = None,
                                 dual_clip: float = 3.0, group=None) -> PPOLoss:
    """opdcore.ops.ppo_topk_loss of the full-vocabulary logits whose rank-r shard is logits_shard [N, V_r]; ids,
    old_logprobs, advantages and valid are the same on every rank. Loss replicated, gradient per shard."""
    what = "vocab_parallel_ppo_topk_loss"
    acc = torch.float64 if logits_shard.dtype == torch.float64 else torch.float32

    def check():
        if logits_shard.dim() != 2:
            raise ValueError(f"logits_shard must be [N, V_r], got {tuple(logits_shard.shape)}")
        return prepare_ppo(ids, old_logprobs, advantages, valid, logits_shard.shape[0], acc, temperature,
                                   clip_low, clip_high, dual_clip)

    rule = _checked_everywhere(check, what, group)
    return PPOLoss(*_VocabParallelSetLoss.apply(logits_shard, rule, what, group))


def vocab_parallel_ppo_topk_loss_linear_weighted(hidden: torch.Tensor, weight_shard: torch.Tensor, ids: torch.Tensor,
                                                 old_logprobs: torch.Tensor, advantages: torch.Tensor,
                                                 token_weights: torch.Tensor, valid: Optional[torch.Tensor] = None, *,
                                                 temperature: float = 1.0, clip_low: float = 0.2,
                                                 clip_high: Optional[float] = None, dual_clip: float = 3.0,
                                                 max_block_elements: int = DEFAULT_BLOCK_ELEMENTS, group=None):
    """opdcore.ops.ppo_topk_loss_linear_weighted with the LM head split by vocabulary rows (as
    vocab_parallel_opd_topk_loss_linear_weighted): (sum_t token_weights[t] * loss_t, PPOLoss), replicated."""
    what = "vocab_parallel_ppo_topk_loss_linear_weighted"
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32

    def check():
        check_linear(hidden, weight_shard, None)
        check_weighted(hidden, token_weights, max_block_elements)
        return prepare_ppo(ids, old_logprobs, advantages, valid, hidden.shape[0], acc, temperature,
                                   clip_low, clip_high, dual_clip)

    rule = _checked_everywhere(check, what, group)
    return _weighted_linear(hidden, weight_shard, token_weights, rule, max_block_elements, what, PPOLoss, group)


def _checked_everywhere(check, what, group):
    """check()'s result; a bad input on any rank makes every rank raise (before any collective of the op)."""
    try:
        out, err = check(), None
    except (TypeError, ValueError) as e:
        out, err = None, e
    _exchange([], err, what, group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward passes the gradient through (every rank's loss is the same replicated value,
    so d loss / d (this rank's summand) = d loss / d sum)."""

    @staticmethod
    def forward(ctx, x, group):
        dev = _comm_device(group)
        y = x.to(dev, copy=True)
        dist.all_reduce(y, group=group)
        return y.to(x.device)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def vocab_parallel_renorm_topk_kl(logits_shard: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                                  valid: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                                  group=None) -> torch.Tensor:
    """renorm_topk_kl of the full-vocabulary logits whose rank-r shard is logits_shard [N, V_r]: each set logit is
    read on the rank that owns its id and summed across ranks ([N, K] numbers), then the renormalised KL runs
    on every rank. Differentiable to each rank's shard."""
    what = "vocab_parallel_renorm_topk_kl"
    err = None
    try:
        if logits_shard.dim() != 2:
            raise ValueError(f"logits_shard must be [N, V_r], got {tuple(logits_shard.shape)}")
        ids, tq, valid = prepare_set(ids, teacher_logprobs, valid, logits_shard.shape[0])
    except (TypeError, ValueError) as e:
        err = e
    rows, cols = (logits_shard.shape[0], logits_shard.shape[1]) if logits_shard.dim() == 2 else (-1, -1)
    offset, vocab = _shard_layout(rows, cols, err, what, group, ids_columns=_width(ids),
                                  dtype=_dtype_code(logits_shard.dtype))
    try:
        _check_ids(ids, vocab, "ids")
    except ValueError as e:
        err = e
    _exchange([], err, what, group)
    local = ids - offset
    mine = (local >= 0) & (local < cols)
    picked = logits_shard.gather(1, local.clamp(0, cols - 1))
    set_logits = _AllReduceSum.apply(torch.where(mine, picked, torch.zeros_like(picked)), group)
    acc = torch.float64 if logits_shard.dtype == torch.float64 else torch.float32
    return kernels.renorm_kl_fwd(set_logits.to(acc), tq.to(acc).contiguous(), valid.contiguous(),
                                    float(temperature))[0]


class _VocabParallelDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_shard, t_shard, kind, beta, temperature, group):
        what = "vocab_parallel_dense_divergence"
        err, lse = None, None
        try:  # the shard's own log-sum-exps; a shard may be all -inf on a row (a masked vocabulary range)
            if s_shard.dim() != 2 or s_shard.shape != t_shard.shape or s_shard.dtype != t_shard.dtype:
                raise ValueError(f"student_shard {tuple(s_shard.shape)} {s_shard.dtype} and teacher_shard "
                                 f"{tuple(t_shard.shape)} {t_shard.dtype} must be [N, V_r] with one shape and dtype")
            acc = torch.float64 if s_shard.dtype == torch.float64 else torch.float32
            sides = []
            for name, x in (("student_shard", s_shard), ("teacher_shard", t_shard)):
                st = StreamState(x.shape[0], 0, dtype=acc, device=x.device, temperature=temperature)
                try:
                    st.update(x, 0)
                except RuntimeError as e:
                    raise RuntimeError(f"{name}: {e}") from e
                sides.append(st.max + st.sumexp.log())  # -inf + -inf for an all -inf row
            lse = torch.stack(sides)
        except (RuntimeError, ValueError, TypeError) as e:
            err = e
        rows, cols = (s_shard.shape[0], s_shard.shape[1]) if s_shard.dim() == 2 else (-1, -1)
        _shard_layout(rows, cols, err, what, group, dtype=_dtype_code(s_shard.dtype))
        parts = [torch.empty_like(lse, device=_comm_device(group)) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, lse.to(_comm_device(group)), group=group)
        glob = torch.logsumexp(torch.stack(parts), dim=0).to(s_shard.device)  # the same on every rank
        for side, name in ((0, "student"), (1, "teacher")):
            dead = torch.isinf(glob[side]).nonzero()
            if dead.numel():
                raise RuntimeError(f"{what}: {name} logits row {int(dead[0])} is entirely -inf over the whole "
                                   "vocabulary: no token has probability")
        ls, lt = glob[0].contiguous(), glob[1].contiguous()
        # this shard's share of the sums under the global normalisers, summed over ranks
        share = kernels.dense_divergence_fwd(s_shard, t_shard, kind, beta, temperature, ls, lt)
        sums = _AllReduceSum.apply(torch.stack([share[0], share[3]]), group)
        loss, aux = sums[0].contiguous(), sums[1].contiguous()
        ctx.save_for_backward(s_shard, t_shard, ls, lt, aux)
        ctx.args = (kind, beta, temperature)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        s_shard, t_shard, ls, lt, aux = ctx.saved_tensors
        grad = kernels.dense_divergence_bwd(grad_loss.contiguous(), s_shard, t_shard, ls, lt, aux, *ctx.args)
        return grad, None, None, None, None, None


def vocab_parallel_dense_divergence(student_shard: torch.Tensor, teacher_shard: torch.Tensor,
                                    divergence: str = "reverse_kl", *, beta: float = 0.5, temperature: float = 1.0,
                                    group=None) -> torch.Tensor:
    """dense_divergence of the full-vocabulary logits whose rank-r shards are student_shard and teacher_shard
    [N, V_r] (the same columns of both): each rank streams its shard for its log-sum-exps, those combine into
    the global ones ([N] numbers), then each rank's share of the sums under them is summed across ranks. The
    divergence [N] is replicated on every rank; the gradient goes to each rank's student shard."""
    return _VocabParallelDense.apply(student_shard, teacher_shard.detach(), divergence_index(divergence),
                                     float(beta), float(temperature), group)


def vocab_parallel_tail_topk_kl(logits_shard: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                                valid: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                                log_ratio_clip: float = 0.0, group=None) -> TailKL:
    """opdcore.ops.tail_topk_kl of the full-vocabulary logits whose rank-r shard is logits_shard [N, V_r]; ids,
    teacher_logprobs and valid are the same on every rank. Loss replicated, gradient per shard."""
    what = "vocab_parallel_tail_topk_kl"
    acc = torch.float64 if logits_shard.dtype == torch.float64 else torch.float32

    def check():
        if logits_shard.dim() != 2:
            raise ValueError(f"logits_shard must be [N, V_r], got {tuple(logits_shard.shape)}")
        return prepare_tail_kl(ids, teacher_logprobs, valid, logits_shard.shape[0], acc, temperature,
                                     log_ratio_clip)

    rule = _checked_everywhere(check, what, group)
    return TailKL(*_VocabParallelSetLoss.apply(logits_shard, rule, what, group))


def vocab_parallel_tail_topk_kl_linear_weighted(hidden: torch.Tensor, weight_shard: torch.Tensor, ids: torch.Tensor,
                                                teacher_logprobs: torch.Tensor, token_weights: torch.Tensor,
                                                valid: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                                                log_ratio_clip: float = 0.0, max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
                                                group=None):
    """opdcore.ops.tail_topk_kl_linear_weighted with the LM head split by vocabulary rows (as
    vocab_parallel_opd_topk_loss_linear_weighted): (sum_t token_weights[t] * loss_t, TailKL), replicated."""
    what = "vocab_parallel_tail_topk_kl_linear_weighted"
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32

    def check():
        check_linear(hidden, weight_shard, None)
        check_weighted(hidden, token_weights, max_block_elements)
        return prepare_tail_kl(ids, teacher_logprobs, valid, hidden.shape[0], acc, temperature,
                                     log_ratio_clip)

    rule = _checked_everywhere(check, what, group)
    return _weighted_linear(hidden, weight_shard, token_weights, rule, max_block_elements, what, TailKL, group)
