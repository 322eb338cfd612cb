"""Shared autograd pieces of the ops."""


def scaled_saved_grads(ctx, grad_total, n_inputs: int):
    """backward() of a Function whose forward formed the gradients of its first two inputs (hidden, weight) and
    saved them: those times d total, None for the other inputs.

    d total = 1 (a loss.backward() on the total, the trainer's case) returns the saved tensors themselves: the
    engine releases the graph's references before the gradients reach .grad, so a [V, H] weight gradient is not
    copied (a product would hold it twice at the peak). Scaling in place instead would corrupt a retained graph.
    """
    grad_h, grad_w = ctx.saved_tensors
    if grad_total.numel() == 1 and float(grad_total) == 1.0:
        return (grad_h, grad_w) + (None,) * (n_inputs - 2)
    scale = lambda g: None if g is None else g * grad_total.to(g.dtype)  # noqa: E731
    return (scale(grad_h), scale(grad_w)) + (None,) * (n_inputs - 2)
