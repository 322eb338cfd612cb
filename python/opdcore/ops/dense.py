"""Dense (full-vocabulary) divergences between student and teacher logits (METHOD.md 2.5, GKD-style).

Streamed over the vocabulary: no [N, V] probabilities are formed in the forward, and the backward writes the
gradient to the student logits in one pass (the teacher is a fixed target: no gradient).
"""
from __future__ import annotations

import torch

from opdcore.ops._autograd import scaled_saved_grads
from opdcore.ops._device import check_device, check_devices
from opdcore.ops.topk import DEFAULT_BLOCK_ELEMENTS, check_weighted

_ops = torch.ops.opdcore
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def divergence_index(kind: str) -> int:
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")
    return DIVERGENCES.index(kind)


def _setup(ctx, inputs, output):
    student, teacher, kind, beta, temperature = inputs[:5]
    _, lse_s, lse_t, aux = output
    ctx.save_for_backward(student, teacher, lse_s, lse_t, aux)
    ctx.args = (kind, beta, temperature)
    ctx.mark_non_differentiable(lse_s, lse_t, aux)


def _backward(ctx, grad_loss, *_):
    student, teacher, lse_s, lse_t, aux = ctx.saved_tensors
    grad = _ops.dense_divergence_bwd(grad_loss, student, teacher, lse_s, lse_t, aux, *ctx.args)
    return grad, None, None, None, None, None, None


torch.library.register_autograd("opdcore::dense_divergence_fwd", _backward, setup_context=_setup)


def dense_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str = "reverse_kl",
                     *, beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Per-token divergence [N] between p = softmax(student_logits / T) and q = softmax(teacher_logits / T).

    divergence: "forward_kl" KL(q || p), "reverse_kl" KL(p || q) (what on-policy distillation minimises in
    expectation), or "jsd": beta * KL(q || m) + (1 - beta) * KL(p || m) with m = (1 - beta) p + beta q, 0 < beta < 1
    (GKD's generalised JSD; TRL's convention for beta). Both logits [N, V] in one dtype (float32, bfloat16,
    float16, float64; float32 accumulation, float64 for float64). Differentiable to the student logits; the
    teacher logits are treated as constants. -inf entries are masked tokens; KL is +inf where one side puts mass
    the other cannot reach (JSD stays finite).
    """
    check_devices(student_logits=student_logits, teacher_logits=teacher_logits)
    return _ops.dense_divergence_fwd(student_logits, teacher_logits.detach(), divergence_index(divergence),
                                     float(beta), float(temperature))[0]


# ---- fused with the LM heads, reduced with known per-token weights: gradients formed in the forward ----------

class _WeightedLinearDense(torch.autograd.Function):
    """sum_t token_weights[t] * D(p_t, q_t) with p from hidden @ weight.T, q from teacher_hidden @ teacher_weight.T,
    over row blocks: each block's two [rows, V] logits give the loss and (the weights being known) the student
    logits' gradient at once, then d hidden and d weight. backward() only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, token_weights, kind, beta, temperature, t_scale, rows):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        loss = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        with torch.no_grad():
            for r0 in range(0, hidden.shape[0], rows):
                r1 = min(hidden.shape[0], r0 + rows)
                h = hidden[r0:r1]
                z, zt = h @ weight.T, (t_hidden[r0:r1] @ t_weight.T) * t_scale
                out = _ops.dense_divergence_fwd(z, zt.to(z.dtype), kind, beta, temperature)
                loss[r0:r1] = out[0]
                if need_h or need_w:
                    gz = _ops.dense_divergence_bwd(token_weights[r0:r1], z, zt.to(z.dtype), *out[1:], kind, beta,
                                                   temperature)
                    if need_h:
                        torch.matmul(gz, weight, out=grad_h[r0:r1])
                    if need_w:
                        grad_w.addmm_(gz.T.to(acc), h.to(acc))
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        ctx.mark_non_differentiable(loss)
        return (loss.to(token_weights.dtype) * token_weights).sum(), loss

    @staticmethod
    def backward(ctx, grad_total, _):
        return scaled_saved_grads(ctx, grad_total, 10)


def dense_divergence_linear_weighted(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                                     teacher_weight: torch.Tensor, token_weights: torch.Tensor,
                                     divergence: str = "reverse_kl", *, beta: float = 0.5, temperature: float = 1.0,
                                     teacher_logit_scale: float = 1.0, max_block_elements: int = DEFAULT_BLOCK_ELEMENTS):
    """(sum_t token_weights[t] * D_t, per-token D [N]) for student logits hidden @ weight.T and teacher logits
    (teacher_hidden @ teacher_weight.T) * teacher_logit_scale, never holding more than one [rows, V] block of
    each (rows = max_block_elements // V). For trainers that know each token's weight in the final loss up front
    (token-mean): the gradient to hidden and weight is formed during the forward. The teacher is a constant."""
    check_devices(hidden=hidden, weight=weight, teacher_hidden=teacher_hidden,
                  teacher_weight=teacher_weight, token_weights=token_weights)
    for name, t, ref in (("hidden", hidden, 2), ("teacher_hidden", teacher_hidden, 2), ("weight", weight, 2),
                         ("teacher_weight", teacher_weight, 2)):
        if t.dim() != ref:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if hidden.shape[1] != weight.shape[1] or teacher_hidden.shape[1] != teacher_weight.shape[1]:
        raise ValueError("hidden size mismatch between a model's hidden states and its LM head: "
                         f"student {hidden.shape[1]} vs {weight.shape[1]}, teacher {teacher_hidden.shape[1]} vs "
                         f"{teacher_weight.shape[1]}")
    if teacher_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} rows but hidden has {hidden.shape[0]}")
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"vocabulary mismatch: weight has {weight.shape[0]} rows but teacher_weight has "
                         f"{teacher_weight.shape[0]} (slice both LM heads to one vocabulary)")
    check_weighted(hidden, token_weights, max_block_elements)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows = max(1, min(hidden.shape[0], max_block_elements // weight.shape[0]))
    return _WeightedLinearDense.apply(hidden, weight, teacher_hidden.detach(), teacher_weight.detach(),
                                      token_weights.detach().to(acc).contiguous(), divergence_index(divergence),
                                      float(beta), float(temperature), float(teacher_logit_scale), rows)
