"""One OPD update micro-batch (forward + backward of the top-16 loss through the trainer's model wrapper) on a
Llama-shaped student, in one process with 2 threads against 2 tensor-parallel processes with 1 thread each (the
same cores): time, parameters held per rank, and the peak extra resident memory per rank of one call (its
activations, logits and the gradients it allocates).

Tensor parallelism splits the layers' projections and the LM head (a vocabulary shard per rank, the losses
through opdcore's vocabulary-parallel ops), so weights and the [tokens, vocab] logits shrink by the group size.

  python benchmarks/bench_tensor_parallel.py [--tokens 2048] [--vocab 32000] [--hidden 512] [--layers 4]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness import median_seconds, peak_extra_mib
from opdcore.data.synthetic import tiny_llama
from opdcore.objectives import ObjectiveSpec, Terms, make_objective
from opdcore.parallel import parallelize
from opdcore.trainer.models import OPDModel

K = 16


def _inputs(args):
    g = torch.Generator().manual_seed(0)
    b, t = 4, args.tokens // 4
    ids = torch.randint(0, args.vocab, (b, t), generator=g)
    pred = torch.arange(b * t)
    sets = torch.stack([torch.randperm(args.vocab, generator=g)[:K] for _ in range(b * t)])
    tq = torch.randn(b * t, K, generator=g).log_softmax(1) - 1.0
    terms = Terms(sets, tq, torch.ones(b * t, K, dtype=torch.bool), torch.full((b * t,), 1.0 / (b * t)))
    return ids, torch.ones_like(ids), pred, terms


def _model(args):
    heads = args.hidden // 64
    return tiny_llama(args.vocab, hidden=args.hidden, layers=args.layers, heads=heads, max_positions=args.tokens,
                      seed=0).train()


def _measure(model, args):
    ids, mask, pred, terms = _inputs(args)
    objective = make_objective(ObjectiveSpec(topk=K))

    def step():  # gradients accumulate across calls: the same work every time
        model(ids, mask, pred, lambda head: objective(head, terms)).loss.backward()

    sec = median_seconds(step, repeats=args.repeats, warmup=1)
    model.zero_grad(set_to_none=True)  # the measured call allocates the gradients too
    mib = peak_extra_mib(step)
    params = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters()) / 2**20
    return sec * 1e3, params, mib


def _tp_worker(rank, world, path, args, out):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    model = OPDModel(parallelize(_model(args), mesh), args.vocab, tp_group=mesh.get_group())
    dist.barrier()
    res = _measure(model, args)
    if rank == 0:
        out.put(res)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    for fused, name in ((True, "1 process x 2 threads, fused LM-head loss"),
                        (False, "1 process x 2 threads, logits + opd_topk_loss")):
        rows.append((name, *_measure(OPDModel(_model(args), args.vocab, fused=fused), args)))
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_tp_worker, args=(2, os.path.join(d, "pg"), args, q), nprocs=2, join=True)
    rows.append(("2 tensor-parallel processes x 1 thread", *q.get()))
    base = rows[1][1]
    print(f"tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} layers={args.layers} k={K}, float32, "
          f"median of {args.repeats}")
    print("| setup | ms | vs logits path | params MiB / rank | peak extra MiB / rank |")
    print("|---|---:|---:|---:|---:|")
    for name, ms, params, mib in rows:
        print(f"| {name} | {ms:.0f} | {base / ms:.2f}x | {params:.0f} | {mib:.0f} |")


if __name__ == "__main__":
    main()
