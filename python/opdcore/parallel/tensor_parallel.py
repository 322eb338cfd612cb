"""Tensor parallelism of Hugging Face decoder LMs with PyTorch's DTensor (`parallelize_module`), Megatron-style:
attention q/k/v and MLP gate/up projections column-parallel, o/down row-parallel (one all-reduce each per
layer), the input embedding split by vocabulary rows, and the LM head column-parallel, so each rank holds a contiguous vocabulary shard of the logits and the
opdcore.parallel vocabulary-parallel ops finish the job without ever gathering [tokens, vocab].

Also the gradient-norm clip that FSDP2 and tensor-parallel parameters need (torch's clip_grad_norm_ refuses a
mix of plain and DTensor gradients).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


def _check_divisible(hf_model: nn.Module, tp: int) -> None:
    cfg = hf_model.config
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(cfg, key, None)
        if value is not None and value % tp:
            raise ValueError(f"tensor parallelism over {tp} ranks needs {key} divisible by {tp}; "
                             f"{type(hf_model).__name__} has {key}={value}")


def tensor_parallel_plan(hf_model: nn.Module) -> Dict[str, object]:
    """{module name: ParallelStyle} for a Llama-family decoder (Llama, Qwen2/3, Mistral, ...: the projections
    named q/k/v/o_proj and gate/up/down_proj), plus the LM head. Raises for other layouts."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: Dict[str, object] = {}
    for name, module in hf_model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in COLWISE:
            plan[name] = ColwiseParallel()
        elif isinstance(module, nn.Linear) and leaf in ROWWISE:
            plan[name] = RowwiseParallel()
    if not plan:
        raise ValueError(f"no tensor-parallel plan for {type(hf_model).__name__}: expected attention and MLP "
                         f"projections named {COLWISE + ROWWISE}")
    head = hf_model.get_output_embeddings()
    plan[next(n for n, m in hf_model.named_modules() if m is head)] = ColwiseParallel()  # vocabulary shards
    return plan


def parallelize(hf_model: nn.Module, mesh) -> nn.Module:
    """Shard hf_model over the 1-D DeviceMesh `mesh` in place (see tensor_parallel_plan). The input embedding is
    split by vocabulary rows too (each rank looks up its rows, one all-reduce), so only the norms stay
    replicated; a tied embedding stays tied to the LM head (the same rows on the same rank)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    _check_divisible(hf_model, mesh.size())
    plan = tensor_parallel_plan(hf_model)
    emb, head = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    tied = emb is not None and emb.weight is head.weight
    if isinstance(emb, nn.Embedding):
        plan[next(n for n, m in hf_model.named_modules() if m is emb)] = RowwiseParallel(input_layouts=Replicate())
    parallelize_module(hf_model, mesh, plan)
    if tied:
        head.weight = emb.weight
    return hf_model


def local_vocab(head_weight, vocab: int) -> Tuple[int, int]:
    """(offset, columns) of this rank's shard of a column-parallel LM head (DTensor Shard(0), torch.chunk
    split) within the first `vocab` rows: padded rows past the tokenizer are not tokens."""
    rows = head_weight.shape[0]
    mesh = head_weight.device_mesh
    r, n = mesh.get_local_rank(), mesh.size()
    sizes = [len(c) for c in torch.arange(rows).chunk(n)] + [0] * n  # chunk may give fewer than n pieces
    offset = sum(sizes[:r])
    if head_weight.to_local().shape[0] != sizes[r]:
        raise RuntimeError(f"unexpected LM head shard of {head_weight.to_local().shape[0]} rows on rank {r}")
    cols = max(0, min(sizes[r], vocab - offset))
    if cols == 0:
        raise ValueError(f"tensor-parallel rank {r} holds only padded LM-head rows (vocab {vocab}, {rows} rows, "
                         f"{n} ranks): use fewer ranks")
    return offset, cols


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """The global L2 norm of the parameters' gradients, scaling them to at most max_norm (0: no clipping), like
    torch.nn.utils.clip_grad_norm_. Plain and DTensor gradients may mix (tensor-parallel models keep norms and
    embeddings replicated): a DTensor's local squares are summed over the mesh dimensions it is sharded on,
    replicated dimensions count once."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.zeros((), dtype=torch.float64)
    plain: list = []
    layouts: Dict[tuple, list] = {}
    for g in grads:  # sums stay on the device: one host copy per layout, not one per parameter
        if isinstance(g, DTensor):
            key = (id(g.device_mesh), tuple(g.placements))
            entry = layouts.setdefault(key, [g.device_mesh, g.placements, 0.0])
            entry[2] = entry[2] + g.to_local().detach().double().pow(2).sum()
        else:
            plain.append(g.detach().double().pow(2).sum())
    if plain:
        total = total + torch.stack([x.to(plain[0].device) for x in plain]).sum().cpu()
    for mesh, placements, sq in layouts.values():
        sq = torch.as_tensor(sq, dtype=torch.float64, device=mesh.device_type)
        for dim, p in enumerate(placements):
            if not p.is_replicate():  # Shard, FSDP2's strided shard over tensor-parallel shards, or Partial
                dist.all_reduce(sq, group=mesh.get_group(dim))
        total = total + sq.cpu()
    norm = math.sqrt(float(total))
    if max_norm > 0 and math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return norm
