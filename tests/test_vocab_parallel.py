"""Vocabulary-parallel ops on 2-3 real processes (torch.distributed, gloo) against the single-process ops on the
full vocabulary: the same top-k ids, values to rounding, every rank's shard gradient equal to its slice of the
full gradient (whose backward is gradchecked in test_loss.py); and every rank raising, not hanging, on bad input.
"""
from __future__ import annotations

import pytest
import torch

from gloo_workers import spawn
from opdcore.ops import (dense_divergence, linear_topk, logprobs_at, opd_topk_loss, opd_topk_loss_linear_weighted,
                         renorm_topk_kl, tail_topk_kl, tail_topk_kl_linear_weighted, topk_logprobs)
from opdcore.parallel import (shard_range, vocab_parallel_dense_divergence, vocab_parallel_linear_topk,
                              vocab_parallel_opd_topk_loss, vocab_parallel_opd_topk_loss_linear_weighted,
                              vocab_parallel_renorm_topk_kl, vocab_parallel_tail_topk_kl,
                              vocab_parallel_tail_topk_kl_linear_weighted, vocab_parallel_topk_logprobs)


def _logits(n, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    x[::2] = torch.round(x[::2] * 2) / 2  # exact ties across shard boundaries
    x[torch.rand(n, v, generator=g) < 0.05] = float("-inf")
    x[:, 0] = 0.0
    return x.to(dtype)


def _close(a, b, dtype, what):
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(a, b, msg=lambda m: f"{what}: {m}", **tol)


def _set(n, v, K, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(v, generator=g)[:K] for _ in range(n)])
    tq = -torch.rand(n, K, generator=g, dtype=torch.float64) * 6 - 0.1
    valid = torch.rand(n, K, generator=g) > 0.2
    valid[:, 0] = True
    return ids, tq, valid


def _matches_single_process(rank, world):
    n, v = 7, 1001  # uneven shards
    off, size = shard_range(v, rank, world)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = _logits(n, v, dtype, seed=1)
        shard = x[:, off:off + size]
        tids = torch.randint(0, v, (n, 5), generator=torch.Generator().manual_seed(2))
        for k in (1, 16, 400):  # 400 > a shard: every rank's heap is partly empty before the merge
            got = vocab_parallel_topk_logprobs(shard, k, ids=tids, temperature=0.8)
            want = topk_logprobs(x, k, 0.8)
            assert torch.equal(got.ids, want.ids), (dtype, k)
            _close(got.logprobs, want.logprobs, dtype, "logprobs")
            _close(got.lse, want.lse, dtype, "lse")
            _close(got.entropy, want.entropy, dtype, "entropy")
            _close(got.target_logprobs, logprobs_at(x, tids, 0.8)[0], dtype, "target log-probs")

        ids, tq, valid = _set(n, v, 6, seed=3)
        g = torch.Generator().manual_seed(7)  # the same full logits on every rank
        x = x.scatter(1, ids, torch.randn(n, 6, generator=g, dtype=torch.float64).to(dtype))  # finite on the set
        w = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
        xs = x[:, off:off + size].clone().requires_grad_(True)
        out = vocab_parallel_opd_topk_loss(xs, ids, tq, valid, weight_mode="student_p", temperature=0.9,
                                           log_ratio_clip=4.0)
        (out.loss * w.to(out.loss.dtype)).sum().backward()
        xf = x.clone().requires_grad_(True)
        ref = opd_topk_loss(xf, ids, tq, valid, weight_mode="student_p", temperature=0.9, log_ratio_clip=4.0)
        (ref.loss * w.to(ref.loss.dtype)).sum().backward()
        _close(out.loss, ref.loss, dtype, "loss")
        _close(out.rewards, ref.rewards, dtype, "rewards")
        _close(xs.grad.double(), xf.grad[:, off:off + size].double(), dtype, "loss gradient of the shard")

        xs.grad = None
        xf.grad = None
        vocab_parallel_renorm_topk_kl(xs, ids, tq, valid, temperature=1.1).sum().backward()
        rkl = renorm_topk_kl(xf, ids, tq, valid, temperature=1.1)
        rkl.sum().backward()
        _close(vocab_parallel_renorm_topk_kl(xs.detach(), ids, tq, valid, temperature=1.1), rkl.detach(), dtype,
               "renorm kl")
        _close(xs.grad.double(), xf.grad[:, off:off + size].double(), dtype, "renorm kl gradient of the shard")

        xs.grad = None
        xf.grad = None
        tkl = vocab_parallel_tail_topk_kl(xs, ids, tq, valid, temperature=0.9)
        (tkl.loss * w.to(tkl.loss.dtype)).sum().backward()
        want_tkl = tail_topk_kl(xf, ids, tq, valid, temperature=0.9)
        (want_tkl.loss * w.to(want_tkl.loss.dtype)).sum().backward()
        _close(tkl.loss, want_tkl.loss, dtype, "tail kl")
        _close(xs.grad.double(), xf.grad[:, off:off + size].double(), dtype, "tail kl gradient of the shard")

        teacher = _logits(n, v, dtype, seed=9)
        mask = torch.isinf(x) | torch.isinf(teacher)  # one vocabulary mask for both (finite KLs)
        mask[3, : v // 2] = True  # a row whose first ranks' shards are all -inf
        teacher, xd = teacher.masked_fill(mask, float("-inf")), x.masked_fill(mask, float("-inf"))
        for kind in ("forward_kl", "reverse_kl", "jsd"):
            xs = xd[:, off:off + size].clone().requires_grad_(True)
            got = vocab_parallel_dense_divergence(xs, teacher[:, off:off + size], kind, beta=0.3, temperature=0.9)
            (got * w.to(got.dtype)).sum().backward()
            xf = xd.clone().requires_grad_(True)
            want = dense_divergence(xf, teacher, kind, beta=0.3, temperature=0.9)
            (want * w.to(want.dtype)).sum().backward()
            tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
            torch.testing.assert_close(got, want.detach(), msg=lambda m: f"dense {kind}: {m}", **tol)
            torch.testing.assert_close(xs.grad.double(), xf.grad[:, off:off + size].double(),
                                       msg=lambda m: f"dense {kind} gradient of the shard: {m}", **tol)

    g = torch.Generator().manual_seed(8)  # the same full inputs on every rank
    h = torch.randn(9, 16, generator=g, dtype=torch.float64)
    wt = torch.randn(v, 16, generator=g, dtype=torch.float64)
    tids = torch.randint(0, v, (9, 3), generator=torch.Generator().manual_seed(4))
    got = vocab_parallel_linear_topk(h, wt[off:off + size], 16, ids=tids, chunk_size=100)
    want = linear_topk(h, wt, 16, ids=tids, chunk_size=100)
    assert torch.equal(got.ids, want.ids)
    _close(got.lse, want.lse, torch.float64, "linear lse")
    _close(got.target_logprobs, want.target_logprobs, torch.float64, "linear targets")

    # the loss fused with the head shard, gradients formed in the forward, in blocks of 4 rows
    ids, tq, valid = _set(9, v, 5, seed=10)
    tw = torch.rand(9, generator=g, dtype=torch.float64)
    for mode, clip in (("student_p", 0.0), ("teacher_p", 2.0), ("none", 0.0)):
        hs, ws = h.clone().requires_grad_(True), wt[off:off + size].clone().requires_grad_(True)
        total, out = vocab_parallel_opd_topk_loss_linear_weighted(hs, ws, ids, tq, tw, valid, weight_mode=mode,
                                                                  temperature=0.8, log_ratio_clip=clip,
                                                                  max_block_elements=4 * size)
        (2.0 * total).backward()
        hf, wf = h.clone().requires_grad_(True), wt.clone().requires_grad_(True)
        want_total, want = opd_topk_loss_linear_weighted(hf, wf, ids, tq, tw, valid, weight_mode=mode,
                                                         temperature=0.8, log_ratio_clip=clip)
        (2.0 * want_total).backward()
        _close(total, want_total, torch.float64, f"weighted total {mode}")
        for name, a, b in zip(("loss", "rewards", "student_logprobs", "lse"), out, want):
            _close(a, b, torch.float64, f"weighted {name} {mode}")
        _close(hs.grad, hf.grad, torch.float64, f"weighted d hidden {mode}")
        _close(ws.grad, wf.grad[off:off + size], torch.float64, f"weighted d weight shard {mode}")

    hs, ws = h.clone().requires_grad_(True), wt[off:off + size].clone().requires_grad_(True)
    total, out = vocab_parallel_tail_topk_kl_linear_weighted(hs, ws, ids, tq, tw, valid, temperature=0.8,
                                                             max_block_elements=4 * size)
    total.backward()
    hf, wf = h.clone().requires_grad_(True), wt.clone().requires_grad_(True)
    want_total, want = tail_topk_kl_linear_weighted(hf, wf, ids, tq, tw, valid, temperature=0.8)
    want_total.backward()
    for name, a, b in zip(("total", "loss", "coefficients"), (total, out.loss, out.coefficients),
                          (want_total, want.loss, want.coefficients)):
        _close(a, b, torch.float64, f"weighted tail kl {name}")
    _close(hs.grad, hf.grad, torch.float64, "weighted tail kl d hidden")
    _close(ws.grad, wf.grad[off:off + size], torch.float64, "weighted tail kl d weight shard")


def test_vocab_parallel_matches_single_process(tmp_path):
    spawn(_matches_single_process, 3, tmp_path)


def _errors_on_every_rank(rank, world):
    n, v = 4, 300
    off, size = shard_range(v, rank, world)
    x = _logits(n, v, torch.float32, seed=5)
    bad = x.clone()
    bad[2, v - 1] = float("nan")  # in the last rank's shard only
    with pytest.raises(RuntimeError, match=rf"rank {world - 1}: RuntimeError: .*NaN or \+inf \(row 2\)"):
        vocab_parallel_topk_logprobs(bad[:, off:off + size], 4)
    tids = torch.tensor([[0], [1], [2], [v]])  # id v is outside every shard
    with pytest.raises(RuntimeError, match=rf"outside \[0, vocab={v}\)"):
        vocab_parallel_topk_logprobs(x[:, off:off + size], 4, ids=tids)
    with pytest.raises(RuntimeError, match="disagree on the number of rows"):
        vocab_parallel_topk_logprobs(x[: n - rank, off:off + size], 4)
    with pytest.raises(RuntimeError, match=f"rank {rank}: TypeError: ids must be an int32 or int64"):
        vocab_parallel_topk_logprobs(x[:, off:off + size], 4, ids=torch.zeros(n, 1))
    ids, tq, valid = _set(n, v, 3, seed=6)
    with pytest.raises(RuntimeError, match=rf"k must be in \[0, vocab={v}\]"):
        vocab_parallel_topk_logprobs(x[:, off:off + size], v + 1)
    tq_bad = tq.clone()
    tq_bad[1, 0] = float("nan")
    with pytest.raises(RuntimeError, match="teacher"):
        vocab_parallel_opd_topk_loss(x[:, off:off + size], ids, tq_bad, valid)
    t_bad = x.clone()
    t_bad[0, 0] = float("inf")  # in rank 0's shard
    with pytest.raises(RuntimeError, match=r"rank 0: RuntimeError: teacher_shard: .*NaN or \+inf \(row 0\)"):
        vocab_parallel_dense_divergence(x[:, off:off + size], t_bad[:, off:off + size], "jsd")
    h = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    w = torch.randn(v, 8, generator=torch.Generator().manual_seed(1))
    w_bad = w.clone()
    w_bad[v - 1, 0] = float("nan")  # a NaN logit column in the last rank's shard
    with pytest.raises(RuntimeError, match=rf"rank {world - 1}: RuntimeError: .*NaN or \+inf"):
        vocab_parallel_opd_topk_loss_linear_weighted(h, w_bad[off:off + size], ids, tq, torch.ones(n), valid)
    with pytest.raises(RuntimeError, match=rf"rank {rank}: ValueError: token_weights must be a floating"):
        vocab_parallel_opd_topk_loss_linear_weighted(h, w[off:off + size], ids, tq, torch.ones(n + 1), valid)
    dead = x.clone()
    dead[1] = float("-inf")
    with pytest.raises(RuntimeError, match="student logits row 1 is entirely -inf over the whole vocabulary"):
        vocab_parallel_dense_divergence(dead[:, off:off + size], x[:, off:off + size])
    # arguments that differ between ranks: the same clear error everywhere, not a gloo abort on one rank and a
    # misleading message on the other
    with pytest.raises(RuntimeError, match=r"ranks disagree on k \(rank by rank: \[4, 5\]\)"):
        vocab_parallel_topk_logprobs(x[:, off:off + size], 4 + rank)
    with pytest.raises(RuntimeError, match=r"ranks disagree on ids_columns \(rank by rank: \[3, 2\]\)"):
        vocab_parallel_opd_topk_loss(x[:, off:off + size], ids[:, :3 - rank], tq[:, :3 - rank], valid[:, :3 - rank])
    with pytest.raises(RuntimeError, match=r"ranks disagree on ids_columns"):
        vocab_parallel_tail_topk_kl(x[:, off:off + size], ids[:, :3 - rank], tq[:, :3 - rank], valid[:, :3 - rank])
    with pytest.raises(RuntimeError, match=rf"rank {rank}: ValueError: teacher_logprobs is NaN"):
        vocab_parallel_tail_topk_kl_linear_weighted(h, w[off:off + size], ids, tq_bad, torch.ones(n), valid)
    with pytest.raises(RuntimeError, match=r"ranks disagree on ids_columns"):
        vocab_parallel_renorm_topk_kl(x[:, off:off + size], ids[:, :3 - rank], tq[:, :3 - rank], valid[:, :3 - rank])
    with pytest.raises(RuntimeError, match=r"ranks disagree on ids_columns"):
        vocab_parallel_opd_topk_loss_linear_weighted(h, w[off:off + size], ids[:, :3 - rank], tq[:, :3 - rank],
                                                     torch.ones(n), valid[:, :3 - rank])
    as_rank = (torch.float32, torch.float64)[rank]
    with pytest.raises(RuntimeError, match=r"ranks disagree on dtype \(rank by rank: \['torch.float32', "
                                           r"'torch.float64'\]\)"):
        vocab_parallel_topk_logprobs(x[:, off:off + size].to(as_rank), 4)
    with pytest.raises(RuntimeError, match=r"ranks disagree on dtype"):
        vocab_parallel_dense_divergence(x[:, off:off + size].to(as_rank), x[:, off:off + size].to(as_rank))
    # the process group is still usable afterwards
    got = vocab_parallel_topk_logprobs(x[:, off:off + size], 4)
    assert torch.equal(got.ids, topk_logprobs(x, 4).ids)


def test_vocab_parallel_errors_raise_on_every_rank(tmp_path):
    spawn(_errors_on_every_rank, 2, tmp_path)


def test_shard_range():
    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    with pytest.raises(ValueError, match="cannot split"):
        shard_range(2, 0, 3)
