"""The pieces the public ops are built from, for variants built outside ops (opdcore.parallel's
vocabulary-parallel ops): argument checks that return the checked inputs (or the loss's rule), the LM-head
streaming loop, the autograd helper of the row-block losses, and the registered kernels themselves
(`kernels`, i.e. torch.ops.opdcore: *_fwd / *_bwd / *_chunk_ entry points on one vocabulary range)."""
import torch

from opdcore.ops._autograd import scaled_saved_grads
from opdcore.ops.dense import divergence_index
from opdcore.ops.loss import OPDRule, prepare_set
from opdcore.ops.policy import prepare_ppo
from opdcore.ops.tail_kl import prepare_tail_kl
from opdcore.ops.topk import DEFAULT_BLOCK_ELEMENTS, as_long, check_linear, check_weighted, iter_head_chunks

kernels = torch.ops.opdcore

__all__ = ["DEFAULT_BLOCK_ELEMENTS", "OPDRule", "as_long", "check_linear", "check_weighted", "divergence_index", "iter_head_chunks",
           "kernels", "prepare_ppo", "prepare_set", "prepare_tail_kl", "scaled_saved_grads"]
