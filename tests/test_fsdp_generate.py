"""Generation with the FSDP-sharded student itself (rollout.hf_generate_sharded), on 2 gloo processes: the same
tokens as the unsharded model, one all-gather per FSDP unit for a whole generate call, shards restored after."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from gloo_workers import spawn
from opdcore.data.synthetic import tiny_llama
from opdcore.trainer.models import GenerateThroughRoot, OPDModel, shard

V = 48


def _count_all_gathers(fn):
    calls = [0]
    orig = dist.all_gather_single  # what FSDP2 calls per unit

    def counting(*a, **kw):
        calls[0] += 1
        return orig(*a, **kw)

    dist.all_gather_single = counting
    try:
        out = fn()
    finally:
        dist.all_gather_single = orig
    return out, calls[0]


def _generate_sharded(rank, world):
    full = tiny_llama(V, hidden=64, layers=2, heads=2, seed=3)
    plain = OPDModel(tiny_llama(V, hidden=64, layers=2, heads=2, seed=3), V).eval()
    model = shard(OPDModel(full, V)).eval()
    prompt = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(rank))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, synced_gpus=True)
    want = GenerateThroughRoot(plain).generate(prompt, torch.ones_like(prompt), **kw)
    once, n_once = _count_all_gathers(lambda: GenerateThroughRoot(model, gather_once=True).generate(
        prompt, torch.ones_like(prompt), **kw))
    per_step, n_step = _count_all_gathers(lambda: GenerateThroughRoot(model).generate(
        prompt, torch.ones_like(prompt), **kw))
    assert torch.equal(once, want) and torch.equal(per_step, want)
    assert 0 < n_once <= 3 < n_step, (n_once, n_step)  # 3 units (2 layers + root): once each, vs every step
    assert all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in model.parameters())


def test_generate_with_the_sharded_student(tmp_path):
    spawn(_generate_sharded, 2, tmp_path)
