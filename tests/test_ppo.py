"""The clipped (PPO) surrogate on a token set: against the reference through autograd, gradcheck, the link to the
OPD loss at ratio 1, the clip semantics, fused / vocabulary-parallel variants and every error path."""
import pytest
import torch
from hypothesis import given, strategies as st

import opdcore
from opdcore import reference as ref
from opdcore.ops import ppo_topk_loss, ppo_topk_loss_linear_weighted
from opdcore.parallel import shard_range, vocab_parallel_ppo_topk_loss, vocab_parallel_ppo_topk_loss_linear_weighted
from gloo_workers import spawn
from helpers import DTYPES
from test_loss import make_case


def _old_away_from_kinks(slp, seed, clip_low, clip_high, dual):
    """Rollout-time log-probs whose ratios exp(slp - old) spread over [0.3, 4] but stay clear of the clip
    boundaries (where the surrogate has a kink and a last-bit difference could flip the active branch)."""
    g = torch.Generator().manual_seed(seed)
    ratio = torch.exp(torch.empty(slp.shape, dtype=torch.float64).uniform_(-1.2, 1.4, generator=g))
    for b in (1 - clip_low, 1 + clip_high, dual):
        near = (ratio - b).abs() < 0.02
        ratio = torch.where(near, ratio * 1.05, ratio)
    return (slp.double() - ratio.log()).clamp(max=0.0)


@given(n=st.integers(1, 8), v=st.integers(2, 2000), kk=st.integers(1, 16), dtype=st.sampled_from(DTYPES),
       temperature=st.sampled_from([1.0, 0.7, 1.3]), clip=st.sampled_from([(0.2, None, 3.0), (0.2, 0.28, 0.0),
                                                                           (0.1, 0.5, 1.5), (0.0, 0.0, 2.0)]),
       neg_inf=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**31))
def test_ppo_loss_matches_reference(n, v, kk, dtype, temperature, clip, neg_inf, seed):
    x, ids, _, valid = make_case(n, v, kk, dtype, seed, neg_inf)
    lo, hi, dual = clip
    slp = ref.logprobs_at(x.double(), ids, temperature)[0]
    old = _old_away_from_kinks(slp, seed, lo, lo if hi is None else hi, dual)
    adv = torch.randn(n, kk, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    adv[torch.rand(n, kk, generator=torch.Generator().manual_seed(seed + 3)) < 0.1] = 0.0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xa = x.clone().requires_grad_(True)
    out = ppo_topk_loss(xa, ids, old.to(acc), adv.to(acc), valid, temperature=temperature, clip_low=lo, clip_high=hi,
                        dual_clip=dual)
    g = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    (out.loss * g.to(out.loss.dtype)).sum().backward()

    xr = x.clone().double().requires_grad_(True)
    loss_r = ref.ppo_topk_loss(xr, ids, old.to(acc).double(), adv.to(acc).double(), valid, temperature, lo, hi, dual)
    (loss_r * g).sum().backward()
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out.loss.double(), loss_r.detach(), **tol)
    gtol = tol if dtype in (torch.float64, torch.float32) else dict(atol=1e-2, rtol=1e-2)  # grad stored in bf16/fp16
    torch.testing.assert_close(xa.grad.double(), xr.grad, **gtol)
    assert xa.grad.dtype == dtype and out.loss.dtype == acc and out.coefficients.shape == ids.shape
    assert torch.all(out.coefficients[~valid] == 0)


def test_ratio_one_gives_the_opd_gradient():
    """One update per batch: with the rollout-time student's rewards as advantages and its log-probs as the old
    ones, the surrogate's gradient is the OPD loss's (METHOD.md 2.3: PPO clipping is inert)."""
    x, ids, tq, valid = make_case(6, 300, 8, torch.float64, seed=3)
    for mode in opdcore.ops.WEIGHT_MODES:
        xa = x.clone().requires_grad_(True)
        opd = opdcore.opd_topk_loss(xa, ids, tq, valid, weight_mode=mode, log_ratio_clip=5.0)
        opd.loss.sum().backward()
        xb = x.clone().requires_grad_(True)
        ppo = ppo_topk_loss(xb, ids, opd.student_logprobs, opd.rewards, valid)
        ppo.loss.sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(ppo.coefficients, opd.rewards, atol=1e-12, rtol=1e-10)


def test_clip_semantics():
    """A single set entry per row: which ratios keep their gradient, and the loss values at the caps."""
    V = 5
    x = torch.zeros(6, V, dtype=torch.float64)  # p = 1/5 everywhere
    ids = torch.zeros(6, 1, dtype=torch.long)
    lp = torch.full((6, 1), -torch.log(torch.tensor(5.0, dtype=torch.float64)).item(), dtype=torch.float64)
    ratio = torch.tensor([[1.1], [1.5], [0.5], [0.5], [4.0], [1.5]], dtype=torch.float64)
    adv = torch.tensor([[1.0], [1.0], [1.0], [-1.0], [-1.0], [-1.0]], dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    out = ppo_topk_loss(xa, ids, lp - ratio.log(), adv, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    out.loss.sum().backward()
    active = out.coefficients[:, 0] != 0
    # in range: active; A > 0 above 1 + high: clipped; A > 0 below 1 - low: active (the loss may still fall);
    # A < 0 below 1 - low: clipped; A < 0 with rho > dual: capped at -dual * A; A < 0 above 1 + high: active
    assert active.tolist() == [True, False, True, False, False, True]
    torch.testing.assert_close(out.loss, torch.tensor([-1.1, -1.3, -0.5, 0.8, 3.0, 1.5], dtype=torch.float64))
    assert torch.all(xa.grad[~active] == 0) and torch.all(xa.grad[active].abs().sum(-1) > 0)
    torch.testing.assert_close(out.coefficients[active, 0], (adv * ratio)[active, 0])
    # dual clip off: the A < 0, rho = 4 row keeps its gradient
    off = ppo_topk_loss(x, ids, lp - ratio.log(), adv, clip_low=0.2, clip_high=0.3, dual_clip=0.0)
    assert off.coefficients[4, 0] == -4.0 and off.loss[4] == 4.0


def _ppo_case(n, v, kk, seed, dtype=torch.float64):
    x, ids, _, valid = make_case(n, v, kk, dtype, seed)
    slp = ref.logprobs_at(x.double(), ids)[0]
    old = _old_away_from_kinks(slp, seed, 0.2, 0.2, 3.0)
    adv = torch.randn(n, kk, generator=torch.Generator().manual_seed(seed + 5), dtype=torch.float64)
    return x, ids, old, adv, valid


def test_gradcheck_ppo_loss():
    x, ids, old, adv, valid = _ppo_case(3, 11, 4, seed=1)
    fn = lambda z: ppo_topk_loss(z, ids, old, adv, valid, temperature=0.8).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_gradcheck_ppo_loss_linear_weighted():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 13, (5, 3), generator=g)
    slp = ref.logprobs_at((h @ w.T).detach(), ids, 1.2)[0]
    old = _old_away_from_kinks(slp, 2, 0.2, 0.2, 3.0)
    adv = torch.randn(5, 3, generator=g, dtype=torch.float64)
    tw = torch.rand(5, generator=g, dtype=torch.float64)

    def fn(hh, ww):
        return ppo_topk_loss_linear_weighted(hh, ww, ids, old, adv, tw, temperature=1.2, max_block_elements=26)[0]

    assert torch.autograd.gradcheck(fn, (h, w), eps=1e-6, atol=1e-6)


@given(n=st.integers(1, 9), v=st.integers(2, 300), h=st.integers(1, 12), kk=st.integers(1, 6),
       block=st.integers(1, 4000), seed=st.integers(0, 2**31))
def test_ppo_linear_weighted_matches_unfused(n, v, h, kk, block, seed):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64)
    wt = torch.randn(v, h, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (n, kk), generator=g)
    valid = torch.rand(n, kk, generator=g) < 0.8
    slp = ref.logprobs_at(hid @ wt.T, ids)[0]
    old = _old_away_from_kinks(slp, seed, 0.2, 0.2, 3.0)
    adv = torch.randn(n, kk, generator=g, dtype=torch.float64)
    tw = torch.rand(n, generator=g, dtype=torch.float64)
    ha, wa = hid.clone().requires_grad_(True), wt.clone().requires_grad_(True)
    total, out = ppo_topk_loss_linear_weighted(ha, wa, ids, old, adv, tw, valid, max_block_elements=block)
    total.backward()
    hb, wb = hid.clone().requires_grad_(True), wt.clone().requires_grad_(True)
    want = ppo_topk_loss(hb @ wb.T, ids, old, adv, valid)
    (want.loss * tw).sum().backward()
    tol = dict(atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(total, (want.loss * tw).sum().detach(), **tol)
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b.detach(), **tol)
    torch.testing.assert_close(ha.grad, hb.grad, **tol)
    torch.testing.assert_close(wa.grad, wb.grad, **tol)


def test_ppo_linear_weighted_frozen_head_and_bf16():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 8, generator=g).to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(40, 8, generator=g).to(torch.bfloat16)  # frozen head: no weight gradient is formed
    ids = torch.randint(0, 40, (6, 3), generator=g)
    slp = ref.logprobs_at((h @ w.T).detach(), ids)[0]
    total, out = ppo_topk_loss_linear_weighted(h, w, ids, slp, torch.ones(6, 3), torch.full((6,), 0.5))
    total.backward()
    assert h.grad is not None and h.grad.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.isfinite(h.grad.float()).all()


def _errors():
    x, ids, old, adv, valid = _ppo_case(3, 20, 4, seed=7, dtype=torch.float32)
    old, adv = old.float(), adv.float()
    nan_old = old.clone()
    nan_old[1, 0] = float("nan")
    valid_all = torch.ones_like(valid)
    inf_adv = adv.clone()
    inf_adv[2, 1] = float("inf")
    h, w = torch.randn(3, 5), torch.randn(20, 5)
    return [
        (lambda: ppo_topk_loss(x, ids, old[:, :2], adv, valid), "old_logprobs must have the shape of ids"),
        (lambda: ppo_topk_loss(x, ids, old, adv[:2], valid), "advantages must have the shape of ids"),
        (lambda: ppo_topk_loss(x, ids, old.long(), adv, valid), "old_logprobs must be a floating tensor"),
        (lambda: ppo_topk_loss(x, ids, nan_old, adv, valid_all), r"old_logprobs is not finite .* \(row 1\)"),
        (lambda: ppo_topk_loss(x, ids, old, inf_adv, valid_all), r"advantages is not finite .* \(row 2\)"),
        (lambda: ppo_topk_loss(x, ids, -old, adv, valid_all), "old_logprobs holds a positive log-prob"),
        (lambda: ppo_topk_loss(x, ids, old, adv, valid[:, :2]), "valid must be a bool tensor"),
        (lambda: ppo_topk_loss(x, ids + 20, old, adv, valid), r"outside \[0, vocab=20\)"),
        (lambda: ppo_topk_loss(x, ids.float(), old, adv, valid), "ids must be an int32 or int64"),
        (lambda: ppo_topk_loss(x[0], ids, old, adv, valid), "student_logits must be"),
        (lambda: ppo_topk_loss(x[:2], ids, old, adv, valid), r"ids must be \[N=2, K\]"),
        (lambda: ppo_topk_loss(x, ids, old, adv, valid, clip_low=1.0), r"clip_low must be in \[0, 1\)"),
        (lambda: ppo_topk_loss(x, ids, old, adv, valid, clip_high=-0.1), "clip_high must be >= 0"),
        (lambda: ppo_topk_loss(x, ids, old, adv, valid, dual_clip=0.5), r"dual_clip must be > 1 \(0: off\)"),
        (lambda: ppo_topk_loss(x, ids, old, adv, valid, temperature=0.0), "temperature must be > 0"),
        (lambda: ppo_topk_loss_linear_weighted(h, w, ids, old, adv, torch.ones(4), valid),
         r"token_weights must be a floating \[N=3\]"),
        (lambda: ppo_topk_loss_linear_weighted(h, w[:, :4], ids, old, adv, torch.ones(3), valid),
         "hidden size mismatch"),
        (lambda: ppo_topk_loss_linear_weighted(h, w[:10], ids, old, adv, torch.ones(3), valid),
         r"outside \[0, vocab=10\)"),
        (lambda: ppo_topk_loss_linear_weighted(h, w, ids, old, adv, torch.ones(3), valid, max_block_elements=0),
         "max_block_elements must be >= 1"),
    ]


@pytest.mark.parametrize("i", range(len(_errors())))
def test_errors(i):
    call, match = _errors()[i]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()


def _vocab_parallel(rank, world):
    n, v = 7, 301  # uneven shards
    off, size = shard_range(v, rank, world)
    g = torch.Generator().manual_seed(11)  # the same full inputs on every rank
    for dtype in (torch.float64, torch.float32):
        x, ids, old, adv, valid = _ppo_case(n, v, 5, seed=12, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        old, adv = old.to(acc), adv.to(acc)
        xs = x[:, off:off + size].clone().requires_grad_(True)
        got = vocab_parallel_ppo_topk_loss(xs, ids, old, adv, valid, temperature=0.9, clip_high=0.3)
        got.loss.sum().backward()
        xf = x.clone().requires_grad_(True)
        want = ppo_topk_loss(xf, ids, old, adv, valid, temperature=0.9, clip_high=0.3)
        want.loss.sum().backward()
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(got.loss, want.loss.detach(), **tol)
        torch.testing.assert_close(got.coefficients, want.coefficients, **tol)
        torch.testing.assert_close(xs.grad, xf.grad[:, off:off + size], **tol)

    h = torch.randn(9, 16, generator=g, dtype=torch.float64)
    wt = torch.randn(v, 16, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (9, 4), generator=g)
    old = _old_away_from_kinks(ref.logprobs_at(h @ wt.T, ids, 0.8)[0], 13, 0.2, 0.2, 3.0)
    adv = torch.randn(9, 4, generator=g, dtype=torch.float64)
    tw = torch.rand(9, generator=g, dtype=torch.float64)
    hs, ws = h.clone().requires_grad_(True), wt[off:off + size].clone().requires_grad_(True)
    total, out = vocab_parallel_ppo_topk_loss_linear_weighted(hs, ws, ids, old, adv, tw, temperature=0.8,
                                                              max_block_elements=4 * size)
    (2.0 * total).backward()
    hf, wf = h.clone().requires_grad_(True), wt.clone().requires_grad_(True)
    want_total, want = ppo_topk_loss_linear_weighted(hf, wf, ids, old, adv, tw, temperature=0.8)
    (2.0 * want_total).backward()
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(total, want_total, **tol)
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(hs.grad, hf.grad, **tol)
    torch.testing.assert_close(ws.grad, wf.grad[off:off + size], **tol)

    # a bad input on one rank raises on every rank (no rank waits in a collective)
    bad_old = old.clone()
    if rank == world - 1:
        bad_old[3, 1] = float("nan")
    with pytest.raises(RuntimeError, match=rf"rank {world - 1}: ValueError: old_logprobs is not finite"):
        vocab_parallel_ppo_topk_loss_linear_weighted(h, wt[off:off + size], ids, bad_old, adv, tw)
    with pytest.raises(RuntimeError, match=rf"rank {rank}: ValueError: dual_clip must be > 1"):
        vocab_parallel_ppo_topk_loss(x[:, off:off + size], ids[:n], old[:n], adv[:n], dual_clip=0.9)


def test_vocab_parallel_ppo_matches_single_process(tmp_path):
    spawn(_vocab_parallel, 3, tmp_path)
