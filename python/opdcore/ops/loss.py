"""The sparse top-k OPD loss (METHOD.md 2.2-2.4) with hand-written backward kernels.

Every function returns the *per-token* loss [N]; how tokens are averaged (token-mean, seq-mean-...) is the
caller's choice (opdcore.objectives.aggregation). Only the student logits (or hidden states / LM head) receive gradients:
the rewards are stop-gradient by construction and the teacher is frozen.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from opdcore.ops._autograd import scaled_saved_grads
from opdcore.ops._device import check_device, check_devices
from opdcore.ops.topk import DEFAULT_BLOCK_ELEMENTS, StreamState, as_long, check_linear, check_weighted, iter_head_chunks

_ops = torch.ops.opdcore

# none: 1/|set|; none_raw: 1 per id (the reference fork's "none" for union-intersection, which never renormalises)
WEIGHT_MODES = ("student_p", "teacher_p", "none", "student_p_raw", "teacher_p_raw", "none_raw")


def weight_mode_index(name: str) -> int:
    if name not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {name!r}")
    return WEIGHT_MODES.index(name)


class OPDLoss(NamedTuple):
    loss: torch.Tensor  # [N] per-token loss (differentiable)
    rewards: torch.Tensor  # [N, K] r(v) = -w(v) * l(v), 0 outside the set (for logging)
    student_logprobs: torch.Tensor  # [N, K] full-vocabulary log p at ids
    lse: torch.Tensor  # [N]


def prepare_set(ids, teacher_logprobs, valid, rows: int, name: str = "teacher_logprobs", logprobs: bool = True):
    """(ids, the per-entry values named `name`, valid) checked against each other and the row count; logprobs:
    the values are log-probs (a positive one at a valid entry means logits were passed: an error)."""
    ids = as_long(ids, "ids")
    if valid is None:
        valid = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    if teacher_logprobs.shape != ids.shape:
        raise ValueError(f"{name} must have the shape of ids {tuple(ids.shape)}, got {tuple(teacher_logprobs.shape)}")
    if ids.dim() != 2 or ids.shape[0] != rows:
        raise ValueError(f"ids must be [N={rows}, K], got {tuple(ids.shape)}")
    capturing = teacher_logprobs.is_cuda and torch.cuda.is_current_stream_capturing()  # no sync inside a graph
    if logprobs and valid.shape == ids.shape and valid.dtype == torch.bool and teacher_logprobs.is_floating_point() \
            and not capturing:
        bad = valid & (teacher_logprobs > 1e-3)  # rounding may leave +1e-7 on a log-prob of 1, not more
        if bool(bad.any()):
            raise ValueError(f"{name} holds a positive log-prob at a valid set entry (logits instead of "
                             f"log-probs?) in row {int(bad.nonzero()[0, 0])}")
    return ids, teacher_logprobs.detach(), valid


def opd_rewards(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                valid: Optional[torch.Tensor] = None, *, weight_mode: str = "student_p",
                log_ratio_clip: float = 0.0):
    """(rewards [N, K], per-token loss [N]) of the top-k OPD loss from the set's log-probs alone (no vocabulary
    pass): r = -w (log p - log q). Also the fixed advantages of the PPO surrogate (opdcore.ops.ppo_topk_loss)
    when a batch gets several updates: the rewards of the student that scored the rollouts."""
    if student_logprobs.dim() != 2:
        raise ValueError(f"student_logprobs must be [N, K], got {tuple(student_logprobs.shape)}")
    if valid is None:
        valid = torch.ones(student_logprobs.shape, dtype=torch.bool, device=student_logprobs.device)
    return _ops.opd_rewards(student_logprobs, teacher_logprobs, valid, weight_mode_index(weight_mode),
                            float(log_ratio_clip))


# ---- unfused: student logits [N, V] -------------------------------------------------------------------------

def _loss_setup(ctx, inputs, output):
    logits, ids, _, _, _, temperature, _ = inputs
    _, rewards, _, lse = output
    ctx.save_for_backward(logits, lse, ids, rewards)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(*output[1:])


def _loss_backward(ctx, grad_loss, *_):
    logits, lse, ids, rewards = ctx.saved_tensors
    grad = _ops.opd_topk_loss_bwd(grad_loss, logits, lse, ids, rewards, ctx.temperature)
    return grad, None, None, None, None, None, None


torch.library.register_autograd("opdcore::opd_topk_loss_fwd", _loss_backward, setup_context=_loss_setup)


def opd_topk_loss(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                  valid: Optional[torch.Tensor] = None, *, weight_mode: str = "student_p", temperature: float = 1.0,
                  log_ratio_clip: float = 0.0, check_logprobs: bool = True) -> OPDLoss:
    """Per-token top-k OPD loss: loss_t = -sum_{v in set} sg(r_t(v)) log p_t(v), r = -w (log p - log q).

    student_logits [N, V] (float32/bfloat16/float16/float64), ids [N, K] (the token set, see build_token_set),
    teacher_logprobs [N, K] full-vocabulary log q at ids, valid [N, K] bool (default: all). The backward
    writes d loss / d logits in one pass over the vocabulary without storing the softmax.
    Sampled-token OPD (METHOD.md 2.1) is K = 1 with weight_mode="none". check_logprobs=False accepts any finite
    teacher values (a positive one is otherwise taken for logits passed by mistake): the trainer's hybrid outcome
    term passes log p_rollout + A.
    """
    check_devices(student_logits=student_logits, ids=ids, teacher_logprobs=teacher_logprobs, valid=valid)
    ids, tq, valid = prepare_set(ids, teacher_logprobs, valid, student_logits.shape[0] if student_logits.dim() else -1,
                                  logprobs=check_logprobs)
    return OPDLoss(*_ops.opd_topk_loss_fwd(student_logits, ids, tq, valid, weight_mode_index(weight_mode),
                                           float(temperature), float(log_ratio_clip)))


def _rkl_setup(ctx, inputs, output):
    _, _, _, temperature = inputs
    loss, pbar, log_ratio = output
    ctx.save_for_backward(pbar, log_ratio, loss)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(pbar, log_ratio)


def _rkl_backward(ctx, grad_loss, *_):
    pbar, log_ratio, loss = ctx.saved_tensors
    grad = _ops.renorm_kl_bwd(grad_loss, pbar, log_ratio, loss, ctx.temperature)
    return grad, None, None, None


torch.library.register_autograd("opdcore::renorm_kl_fwd", _rkl_backward, setup_context=_rkl_setup)


def renorm_topk_kl(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                   valid: Optional[torch.Tensor] = None, *, temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(pbar || qbar) with both distributions renormalised over the valid set (METHOD.md 2.4).

    Exact gradient; the full-vocabulary normaliser cancels, so only the K set logits are read.
    """
    check_devices(student_logits=student_logits, ids=ids, teacher_logprobs=teacher_logprobs, valid=valid)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    ids, tq, valid = prepare_set(ids, teacher_logprobs, valid, student_logits.shape[0])
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= student_logits.shape[1]):
        raise ValueError(f"ids holds an id outside [0, vocab={student_logits.shape[1]})")
    set_logits = student_logits.gather(1, ids)
    return _ops.renorm_kl_fwd(set_logits, tq, valid, float(temperature))[0]


# ---- fused with the LM head: hidden [N, H], weight [V, H]; [N, V] logits never exist --------------------------

class _LinearOPDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, tq, valid, mode, temperature, clip, chunk):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        state = StreamState(hidden.shape[0], 0, ids, dtype=acc, device=hidden.device, temperature=temperature)
        with torch.no_grad():
            for off, logits in iter_head_chunks(hidden, weight, chunk):
                state.update(logits, off)
        res = state.finalize()
        slp = res.target_logprobs
        rewards, loss = _ops.opd_rewards(slp, tq, valid, mode, clip)
        ctx.save_for_backward(hidden, weight, res.lse, ids, rewards)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(rewards, slp, res.lse)
        return loss, rewards, slp, res.lse

    @staticmethod
    def backward(ctx, grad_loss, *_):
        hidden, weight, lse, ids, rewards = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_loss = grad_loss.contiguous()
        with torch.no_grad():
            for off, work in iter_head_chunks(hidden, weight, ctx.chunk):
                # the logits workspace becomes d loss / d logits for this vocabulary chunk, in place
                _ops.opd_topk_loss_bwd_chunk_(work, off, grad_loss, lse, ids, rewards, ctx.temperature)
                n = work.shape[1]
                if need_h:
                    grad_h += (work @ weight[off:off + n]).to(acc)
                if need_w:
                    torch.matmul(work.T, hidden, out=grad_w[off:off + n])
        return (grad_h.to(hidden.dtype) if need_h else None), grad_w, None, None, None, None, None, None, None


def opd_topk_loss_linear(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                         teacher_logprobs: torch.Tensor, valid: Optional[torch.Tensor] = None, *,
                         weight_mode: str = "student_p", temperature: float = 1.0, log_ratio_clip: float = 0.0,
                         chunk_size: Optional[int] = None) -> OPDLoss:
    """opd_topk_loss on logits = hidden @ weight.T, computed chunk by chunk over the vocabulary.

    Peak extra memory is O(N * chunk_size) instead of O(N * V); gradients flow to hidden and weight.
    """
    check_devices(hidden=hidden, weight=weight, ids=ids, teacher_logprobs=teacher_logprobs, valid=valid)
    chunk = check_linear(hidden, weight, chunk_size)
    ids, tq, valid = prepare_set(ids, teacher_logprobs, valid, hidden.shape[0])
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
        raise ValueError(f"ids holds an id outside [0, vocab={weight.shape[0]})")
    if log_ratio_clip < 0:
        raise ValueError(f"log_ratio_clip must be >= 0 (0: off), got {log_ratio_clip}")
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = _LinearOPDLoss.apply(hidden, weight, ids.contiguous(), tq.to(acc).contiguous(), valid.contiguous(),
                               weight_mode_index(weight_mode), float(temperature), float(log_ratio_clip), chunk)
    return OPDLoss(*out)


def renorm_topk_kl_linear(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                          teacher_logprobs: torch.Tensor, valid: Optional[torch.Tensor] = None, *,
                          temperature: float = 1.0, max_block_elements: int = 1 << 22) -> torch.Tensor:
    """renorm_topk_kl on logits = hidden @ weight.T: only K dot products per token, the K head rows gathered
    for at most max_block_elements / (K * H) rows at a time (a cache-sized workspace: 16 MiB in float32)."""
    check_devices(hidden=hidden, weight=weight, ids=ids, teacher_logprobs=teacher_logprobs, valid=valid)
    check_linear(hidden, weight, None)
    ids, tq, valid = prepare_set(ids, teacher_logprobs, valid, hidden.shape[0])
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
        raise ValueError(f"ids holds an id outside [0, vocab={weight.shape[0]})")
    if max_block_elements < 1:
        raise ValueError(f"max_block_elements must be >= 1, got {max_block_elements}")
    rows = max(1, max_block_elements // max(1, ids.shape[1] * hidden.shape[1]))
    set_logits = SetLogits.apply(hidden, weight, ids.contiguous(), rows)
    return _ops.renorm_kl_fwd(set_logits, tq, valid, float(temperature))[0]


# A set that is a sizeable part of a small vocabulary (V <= 16 K, the synthetic pair's 100 ids with K = 16): a row
# block's whole logits (one GEMM) and a gather cost less than gathering K head rows per token.
WHOLE_HEAD_FACTOR = 16


def whole_head(vocab: int, k: int) -> bool:
    return vocab <= WHOLE_HEAD_FACTOR * k


class SetLogits(torch.autograd.Function):
    """z[n, k] = hidden[n] . weight[ids[n, k]]: the K set logits per row, with the LM-head rows gathered one row
    block at a time into one reused workspace, so at most [rows, K, H] of gathered weights exist (not [N, K, H])
    in either pass, and fresh memory is not faulted in for every block. On a small vocabulary (whole_head) a row
    block's whole logits are formed instead, and the gradient goes through them."""

    @staticmethod
    def _blocks(weight, ids, rows):
        """Yield (r0, r1, gathered head rows [r1 - r0, K, H]) over row blocks, reusing one buffer."""
        K, H = ids.shape[1], weight.shape[1]
        buf = torch.empty(min(rows, ids.shape[0]) * K, H, dtype=weight.dtype, device=weight.device)
        for r0 in range(0, ids.shape[0], rows):
            r1 = min(ids.shape[0], r0 + rows)
            out = buf[:(r1 - r0) * K]
            torch.index_select(weight, 0, ids[r0:r1].reshape(-1), out=out)
            yield r0, r1, out.view(r1 - r0, K, H)

    @staticmethod
    def forward(ctx, hidden, weight, ids, rows_per_block):
        z = torch.empty(ids.shape, dtype=hidden.dtype, device=hidden.device)
        ctx.whole = whole_head(weight.shape[0], ids.shape[1])
        if ctx.whole:
            for r0 in range(0, ids.shape[0], rows_per_block):
                r1 = min(ids.shape[0], r0 + rows_per_block)
                torch.gather(hidden[r0:r1] @ weight.T, 1, ids[r0:r1], out=z[r0:r1])
        else:
            for r0, r1, w_rows in SetLogits._blocks(weight, ids, rows_per_block):
                torch.bmm(w_rows, hidden[r0:r1].unsqueeze(2), out=z[r0:r1].unsqueeze(2))
        ctx.save_for_backward(hidden, weight, ids)
        ctx.rows = rows_per_block
        return z

    @staticmethod
    def _whole_backward(ctx, g, hidden, weight, ids, acc):
        """The gradients through each row block's whole logits: d logits = g scattered onto the set's columns
        (summed where an id repeats), then two GEMMs."""
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for r0 in range(0, ids.shape[0], ctx.rows):
            r1 = min(ids.shape[0], r0 + ctx.rows)
            d = torch.zeros(r1 - r0, weight.shape[0], dtype=acc, device=g.device)
            d = d.scatter_add_(1, ids[r0:r1], g[r0:r1].to(acc)).to(hidden.dtype)
            if need_h:
                torch.matmul(d, weight, out=grad_h[r0:r1])
            if need_w:
                grad_w += (d.T @ hidden[r0:r1]).to(acc)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None

    @staticmethod
    def backward(ctx, grad_z):
        hidden, weight, ids = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        g = grad_z.to(hidden.dtype)
        if ctx.whole:
            return SetLogits._whole_backward(ctx, g, hidden, weight, ids, acc)
        grad_w = None
        if need_w:  # d weight[ids[n, k]] += g[n, k] hidden[n], accumulated in float32
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            for r0 in range(0, ids.shape[0], ctx.rows):
                r1 = min(ids.shape[0], r0 + ctx.rows)
                rows = (g[r0:r1].unsqueeze(2) * hidden[r0:r1].unsqueeze(1)).to(acc)
                grad_w.index_add_(0, ids[r0:r1].reshape(-1), rows.reshape(-1, hidden.shape[1]))
            grad_w = grad_w.to(weight.dtype)
        grad_h = None
        if need_h:  # d hidden[n] = sum_k g[n, k] weight[ids[n, k]]
            grad_h = torch.empty_like(hidden)
            for r0, r1, w_rows in SetLogits._blocks(weight, ids, ctx.rows):
                torch.bmm(g[r0:r1].unsqueeze(1), w_rows, out=grad_h[r0:r1].unsqueeze(1))
        return grad_h, grad_w, None, None


# ---- fused with the LM head, reduced with known per-token weights: gradients formed in the forward ------------

class OPDRule:
    """The set-loss rule of the reward-weighted OPD loss: rewards r = -w (log p - log q) from the set log-probs.

    A rule turns a block of rows [r0, r1) into (loss, coefficients, set log-probs, lse) from its logits
    (from_logits) or into (loss, coefficients) from its merged set log-probs (from_logprobs, the
    vocabulary-parallel path); the coefficients feed the one-pass backward kernel (its `rewards`)."""

    def __init__(self, ids, tq, valid, mode: int, temperature: float, clip: float):
        self.ids, self.tq, self.valid = ids, tq, valid
        self.mode, self.temperature, self.clip = mode, temperature, clip

    def from_logits(self, logits, r0: int, r1: int):
        return _ops.opd_topk_loss_fwd(logits, self.ids[r0:r1], self.tq[r0:r1], self.valid[r0:r1], self.mode,
                                      self.temperature, self.clip)

    def from_logprobs(self, slp, r0: int, r1: int):
        rewards, loss = _ops.opd_rewards(slp, self.tq[r0:r1], self.valid[r0:r1], self.mode, self.clip)
        return loss, rewards


class SetLossFunction(torch.autograd.Function):
    """A set loss of full logits [N, V] under a rule (see OPDRule): (loss, coefficients, set log-probs, lse);
    the backward is the one-pass kernel with the rule's coefficients."""

    @staticmethod
    def forward(ctx, logits, rule):
        with torch.no_grad():
            loss, coef, slp, lse = rule.from_logits(logits, 0, logits.shape[0])
        ctx.save_for_backward(logits, lse, coef)
        ctx.rule = rule
        ctx.mark_non_differentiable(coef, slp, lse)
        return loss, coef, slp, lse

    @staticmethod
    def backward(ctx, grad_loss, *_):
        logits, lse, coef = ctx.saved_tensors
        grad = _ops.opd_topk_loss_bwd(grad_loss.contiguous(), logits, lse, ctx.rule.ids, coef, ctx.rule.temperature)
        return grad, None


class WeightedLinearSetLoss(torch.autograd.Function):
    """sum_t token_weights[t] * loss_t of a set loss (its rule) on logits = hidden @ weight.T, with the gradient
    computed in the forward pass.

    Rows are processed in blocks whose [rows, V] logits fit the budget: each block's logits give the loss and,
    once its log-sum-exp is known, its logits gradient in place, then d hidden and d weight. Three matmuls in
    all, against four for the vocabulary-chunked per-token version, which must finish the log-sum-exp over the
    whole vocabulary before it can form any gradient. backward() only scales the stored gradients.

    A 16-bit head is the exception: summing d weight over row blocks needs a float32 accumulator, and a 16-bit
    GEMM cannot add into one, so every block's product would be a float32 GEMM (several times slower than the
    16-bit one on CPUs with bfloat16 units). There d weight comes from a second pass over vocabulary chunks
    instead, once the log-sum-exp of every row is known: the chunk's logits again, their gradient, and one 16-bit
    GEMM over all rows (float32 accumulation inside it, rounded once). Four matmuls, all at the 16-bit rate.
    """

    @staticmethod
    def forward(ctx, hidden, weight, token_weights, rule, budget):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w_by_vocab = need_w and weight.dtype in (torch.bfloat16, torch.float16)
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = None
        if need_w:
            grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if w_by_vocab else \
                torch.zeros(weight.shape, dtype=acc, device=weight.device)
        (N, V), ids = (hidden.shape[0], weight.shape[0]), rule.ids
        loss = torch.empty(N, dtype=acc, device=hidden.device)
        coef = torch.empty(ids.shape, dtype=acc, device=hidden.device)
        slp = torch.empty(ids.shape, dtype=acc, device=hidden.device)
        lse = torch.empty(N, dtype=acc, device=hidden.device)
        rows = max(1, min(N, budget // V))
        cols = max(1, min(V, budget // N))
        # one workspace for every block's logits: a fresh block per iteration would fault its pages in again and
        # briefly hold two blocks (the next is allocated before the last is freed)
        work = torch.empty(max(rows * V, N * cols if w_by_vocab else 0), dtype=hidden.dtype, device=hidden.device)
        with torch.no_grad():
            for r0 in range(0, N, rows):
                r1 = min(N, r0 + rows)
                h = hidden[r0:r1]
                z = torch.matmul(h, weight.T, out=work[:(r1 - r0) * V].view(r1 - r0, V))
                out = rule.from_logits(z, r0, r1)
                loss[r0:r1], coef[r0:r1], slp[r0:r1], lse[r0:r1] = out
                if need_h or (need_w and not w_by_vocab):
                    _ops.opd_topk_loss_bwd_chunk_(z, 0, token_weights[r0:r1], out[3], ids[r0:r1], out[1],
                                                  rule.temperature)
                    if need_h:
                        torch.matmul(z, weight, out=grad_h[r0:r1])
                    if need_w and not w_by_vocab:
                        grad_w.addmm_(z.T, h)
            if w_by_vocab:
                for v0 in range(0, V, cols):
                    v1 = min(V, v0 + cols)
                    z = torch.matmul(hidden, weight[v0:v1].T, out=work[:N * (v1 - v0)].view(N, v1 - v0))
                    _ops.opd_topk_loss_bwd_chunk_(z, v0, token_weights, lse, ids, coef, rule.temperature)
                    torch.matmul(z.T, hidden, out=grad_w[v0:v1])
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        ctx.mark_non_differentiable(loss, coef, slp, lse)
        return (loss.to(token_weights.dtype) * token_weights).sum(), loss, coef, slp, lse

    @staticmethod
    def backward(ctx, grad_total, *_):
        return scaled_saved_grads(ctx, grad_total, 5)

    @staticmethod
    def run(hidden, weight, rule, token_weights, max_block_elements: int):
        """Checks token_weights and the block budget, then applies: (total, loss, coefficients, slp, lse)."""
        check_weighted(hidden, token_weights, max_block_elements)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        return WeightedLinearSetLoss.apply(hidden, weight, token_weights.detach().to(acc).contiguous(), rule,
                                           max_block_elements)


def opd_topk_loss_linear_weighted(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                                  teacher_logprobs: torch.Tensor, token_weights: torch.Tensor,
                                  valid: Optional[torch.Tensor] = None, *, weight_mode: str = "student_p",
                                  temperature: float = 1.0, log_ratio_clip: float = 0.0,
                                  max_block_elements: int = DEFAULT_BLOCK_ELEMENTS, check_logprobs: bool = True):
    """(sum_t token_weights[t] * loss_t, OPDLoss) on logits = hidden @ weight.T, never holding [N, V].

    For trainers that know each token's weight in the final loss before the forward (token-mean: 1/N_tok):
    the gradient is formed during the forward, so the head matmul runs three times instead of four. Peak extra
    memory is one [rows, V] block of at most max_block_elements logits.
    """
    check_devices(hidden=hidden, weight=weight, ids=ids,
                  teacher_logprobs=teacher_logprobs, token_weights=token_weights, valid=valid)
    check_linear(hidden, weight, None)
    ids, tq, valid = prepare_set(ids, teacher_logprobs, valid, hidden.shape[0], logprobs=check_logprobs)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
        raise ValueError(f"ids holds an id outside [0, vocab={weight.shape[0]})")
    if log_ratio_clip < 0:
        raise ValueError(f"log_ratio_clip must be >= 0 (0: off), got {log_ratio_clip}")
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rule = OPDRule(ids.contiguous(), tq.to(acc).contiguous(), valid.contiguous(), weight_mode_index(weight_mode),
                    float(temperature), float(log_ratio_clip))
    total, *out = WeightedLinearSetLoss.run(hidden, weight, rule, token_weights, max_block_elements)
    return total, OPDLoss(*out)
