"""Vocabulary-parallel top-k extraction on 2 processes (gloo, 1 thread each): opdcore's state all-gather against
gathering the logits shards into [N, V] on every rank and extracting there (PyTorch log_softmax + topk, or
opdcore's topk_logprobs on the gathered logits).

Per rank: median time of 5 calls after a warm-up, the bytes each rank receives, the peak extra resident memory.

  python benchmarks/bench_vocab_parallel.py [--n 2048] [--v 32000] [--k 16]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness import median_seconds, peak_extra_mib
from opdcore.ops import topk_logprobs
from opdcore.parallel import shard_range, vocab_parallel_topk_logprobs


def _gather_full(shard, world):
    parts = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(parts, shard.contiguous())
    return torch.cat(parts, 1)


def _worker(rank, world, path, n, v, k, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    off, size = shard_range(v, rank, world)
    g = torch.Generator().manual_seed(0)
    shard = (torch.randn(n, v, generator=g) * 3)[:, off:off + size].to(torch.bfloat16).contiguous()
    k_ = k

    def torch_way():
        lp = torch.log_softmax(_gather_full(shard, world).float(), dim=-1)
        return lp.topk(k_, dim=-1)

    cases = {
        "opdcore vocab_parallel_topk_logprobs": (lambda: vocab_parallel_topk_logprobs(shard, k_),
                                                 (world - 1) * n * (3 * 4 + k_ * 12)),
        "all_gather logits + opdcore topk": (lambda: topk_logprobs(_gather_full(shard, world), k_),
                                             (world - 1) * n * size * 2),
        "all_gather logits + torch log_softmax/topk": (torch_way, (world - 1) * n * size * 2),
    }
    rows = []
    for name, (fn, received) in cases.items():
        dist.barrier()
        sec = median_seconds(fn, repeats=5, warmup=1)
        dist.barrier()
        mib = peak_extra_mib(fn)
        rows.append((name, sec * 1e3, received / 2**20, mib))
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--k", type=int, default=16)
    args = p.parse_args()
    world = 2
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "pg"), args.n, args.v, args.k, q), nprocs=world)
    rows = q.get()
    base = rows[-1][1]
    print(f"N={args.n} V={args.v} k={args.k} bf16 logits, {world} ranks (gloo, 1 thread each), rank 0")
    print(f"| {'implementation':<44} | {'ms':>8} | {'vs torch':>8} | {'received MiB':>12} | {'peak extra MiB':>14} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 14}|{'-' * 16}|")
    for name, ms, recv, mib in rows:
        print(f"| {name:<44} | {ms:8.1f} | {base / ms:7.2f}x | {recv:12.2f} | {mib:14.1f} |")


if __name__ == "__main__":
    main()
