"""Dense (full-vocabulary) divergences between student and teacher logits (METHOD.md 2.5, GKD-style).

Streamed over the vocabulary: no [N, V] probabilities are formed in the forward, and the backward writes the
gradient to the student logits in one pass (the teacher is a fixed target: no gradient).
"""
from __future__ import annotations

import torch

from opdcore.ops._device import check_device

_ops = torch.ops.opdcore
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def divergence_index(kind: str) -> int:
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")
    return DIVERGENCES.index(kind)


def _setup(ctx, inputs, output):
    student, teacher, kind, beta, temperature = inputs
    _, lse_s, lse_t, aux = output
    ctx.save_for_backward(student, teacher, lse_s, lse_t, aux)
    ctx.args = (kind, beta, temperature)
    ctx.mark_non_differentiable(lse_s, lse_t, aux)


def _backward(ctx, grad_loss, *_):
    student, teacher, lse_s, lse_t, aux = ctx.saved_tensors
    grad = _ops.dense_divergence_bwd(grad_loss, student, teacher, lse_s, lse_t, aux, *ctx.args)
    return grad, None, None, None, None


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
    check_device(student_logits, "student_logits")
    return _ops.dense_divergence_fwd(student_logits, teacher_logits.detach(), divergence_index(divergence),
                                     float(beta), float(temperature))[0]
