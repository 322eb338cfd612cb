"""Shared autograd pieces of the ops."""


def scaled_saved_grads(ctx, grad_total, n_inputs: int):
    """backward() of a Function whose forward formed the gradients of its first two inputs (hidden, weight) and
    saved them: those times d total, None for the other inputs."""
    grad_h, grad_w = ctx.saved_tensors
    scale = lambda g: None if g is None else g * grad_total.to(g.dtype)  # noqa: E731
    return (scale(grad_h), scale(grad_w)) + (None,) * (n_inputs - 2)
