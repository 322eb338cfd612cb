"""The sparse top-k OPD loss, its hand-written backward, renorm_kl and the token set, against the reference."""
import pytest
import torch
from hypothesis import given, strategies as st

import opdcore
from opdcore import reference as ref
from opdcore.ops import WEIGHT_MODES, STRATEGIES, STRATEGY_ALIASES
from helpers import DTYPES, make_logits


def make_case(n, v, kk, dtype, seed, neg_inf=0.0, valid_frac=0.8):
    """Logits, a token set of kk ids per row (finite student logits), teacher log-probs, valid mask."""
    g = torch.Generator().manual_seed(seed)
    x = make_logits(n, v, dtype, seed, neg_inf_frac=neg_inf)
    finite = torch.isfinite(x.double())
    ids = torch.stack([torch.multinomial(finite[i].double(), kk, replacement=True, generator=g) for i in range(n)])
    teacher = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    tq = teacher.gather(1, ids).float()
    valid = torch.rand(n, kk, generator=g) < valid_frac
    return x, ids, tq, valid


@given(n=st.integers(1, 8), v=st.integers(2, 2500), kk=st.integers(1, 24), dtype=st.sampled_from(DTYPES),
       mode=st.sampled_from(WEIGHT_MODES), temperature=st.sampled_from([1.0, 0.6, 1.5]),
       clip=st.sampled_from([0.0, 0.5, 5.0]), neg_inf=st.sampled_from([0.0, 0.4]), seed=st.integers(0, 2**31))
def test_loss_forward_backward_match_reference(n, v, kk, dtype, mode, temperature, clip, neg_inf, seed):
    x, ids, tq, valid = make_case(n, v, kk, dtype, seed, neg_inf)
    if dtype == torch.float64:
        tq = tq.double()
    xa = x.clone().requires_grad_(True)
    out = opdcore.opd_topk_loss(xa, ids, tq, valid, weight_mode=mode, temperature=temperature, log_ratio_clip=clip)
    g = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1), dtype=out.loss.dtype)
    (out.loss * g).sum().backward()

    xr = x.clone().double().requires_grad_(True)  # reference in float64 on the same rounded inputs
    loss_r, rew_r = ref.opd_topk_loss(xr, ids, tq.double(), valid, mode, temperature, clip)
    (loss_r * g.double()).sum().backward()

    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out.loss.double(), loss_r.detach(), **tol)
    torch.testing.assert_close(out.rewards.double(), rew_r, **tol)
    gtol = tol if dtype in (torch.float64, torch.float32) else dict(atol=1e-2, rtol=1e-2)  # grad stored in bf16/fp16
    torch.testing.assert_close(xa.grad.double(), xr.grad, **gtol)
    assert xa.grad.dtype == dtype
    torch.testing.assert_close(out.student_logprobs.double(), ref.logprobs_at(xr.detach(), ids, temperature)[0], **tol)


def test_sampled_token_case_is_policy_gradient():
    """K = 1, weight none: loss = -sg(log q - log p) * log p (METHOD.md 2.1)."""
    x, ids, tq, _ = make_case(5, 100, 1, torch.float64, 7)
    out = opdcore.opd_topk_loss(x, ids, tq.double(), weight_mode="none")
    lp = torch.log_softmax(x, -1).gather(1, ids)
    torch.testing.assert_close(out.rewards, tq.double() - lp)
    torch.testing.assert_close(out.loss, (-(tq.double() - lp) * lp).squeeze(1))


def clipped_regime(n, v, kk, seed, dtype=torch.float64):
    """Teacher far below the student so every log ratio is clipped: rewards are constant near this point and
    the surrogate's gradient is the true derivative of the forward value, which gradcheck can verify."""
    x, ids, _, valid = make_case(n, v, kk, dtype, seed)
    tq = torch.log_softmax(x.double(), -1).gather(1, ids) - 30.0
    return x, ids, tq, valid


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck_loss(temperature):
    x, ids, tq, valid = clipped_regime(4, 37, 5, 0)
    x.requires_grad_(True)
    f = lambda z: opdcore.opd_topk_loss(z, ids, tq, valid, weight_mode="none", temperature=temperature,
                                        log_ratio_clip=2.0).loss
    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("mode", WEIGHT_MODES)
def test_gradcheck_linear_loss(mode):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(23, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 23, (5, 4), generator=g)
    tq = torch.log_softmax(hidden.detach() @ weight.detach().T, -1).gather(1, ids) - 30.0
    if mode in ("teacher_p", "teacher_p_raw", "none"):  # weights independent of the student: true gradient
        f = lambda h, w: opdcore.opd_topk_loss_linear(h, w, ids, tq, weight_mode=mode, log_ratio_clip=1.0,
                                                      chunk_size=7).loss
        assert torch.autograd.gradcheck(f, (hidden, weight))
    # every mode: the fused gradient equals the unfused kernel's on the materialised logits
    out = opdcore.opd_topk_loss_linear(hidden, weight, ids, tq, weight_mode=mode, log_ratio_clip=1.0, chunk_size=7)
    out.loss.sum().backward()
    h2, w2 = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    out2 = opdcore.opd_topk_loss(h2 @ w2.T, ids, tq, weight_mode=mode, log_ratio_clip=1.0)
    out2.loss.sum().backward()
    torch.testing.assert_close(out.loss, out2.loss)
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


@given(n=st.integers(1, 12), v=st.integers(2, 600), h=st.integers(1, 16), kk=st.integers(1, 12),
       chunk=st.integers(1, 200), mode=st.sampled_from(WEIGHT_MODES), seed=st.integers(0, 2**31))
def test_linear_loss_matches_unfused(n, v, h, kk, chunk, mode, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    ids = torch.randint(0, v, (n, kk), generator=g)
    tq = -torch.rand(n, kk, generator=g) * 8
    valid = torch.rand(n, kk, generator=g) < 0.7
    out = opdcore.opd_topk_loss_linear(hidden, weight, ids, tq, valid, weight_mode=mode, temperature=0.9,
                                       log_ratio_clip=3.0, chunk_size=chunk)
    out.loss.sum().backward()
    h2, w2 = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    loss_r, _ = ref.opd_topk_loss(h2 @ w2.T, ids, tq, valid, mode, 0.9, 3.0)
    loss_r.sum().backward()
    torch.testing.assert_close(out.loss, loss_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hidden.grad, h2.grad, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(weight.grad, w2.grad, atol=1e-4, rtol=1e-3)


def test_linear_loss_frozen_head_and_bf16():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(16, 32, generator=g).bfloat16().requires_grad_(True)
    weight = torch.randn(500, 32, generator=g).bfloat16()  # frozen head: no weight gradient computed
    ids = torch.randint(0, 500, (16, 4), generator=g)
    tq = -torch.rand(16, 4, generator=g) * 5
    out = opdcore.opd_topk_loss_linear(hidden, weight, ids, tq, chunk_size=64)
    out.loss.sum().backward()
    h2 = hidden.detach().float().requires_grad_(True)
    loss_r, _ = ref.opd_topk_loss(h2 @ weight.float().T, ids, tq)
    loss_r.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad is None
    # bf16 logits carry ~0.4% rounding, so compare in norm against the float32 computation
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert rel(out.loss, loss_r) < 0.02
    assert rel(hidden.grad, h2.grad) < 0.03


@given(n=st.integers(1, 8), v=st.integers(2, 400), kk=st.integers(1, 16), dtype=st.sampled_from(DTYPES),
       temperature=st.sampled_from([1.0, 0.5]), seed=st.integers(0, 2**31))
def test_renorm_kl_matches_reference(n, v, kk, dtype, temperature, seed):
    x, ids, tq, valid = make_case(n, v, kk, dtype, seed)
    xa = x.clone().requires_grad_(True)
    loss = opdcore.renorm_topk_kl(xa, ids, tq, valid, temperature=temperature)
    loss.sum().backward()
    xr = x.double().requires_grad_(True)
    loss_r = ref.renorm_topk_kl(xr, ids, tq.double(), valid, temperature)
    loss_r.sum().backward()
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss.double(), loss_r.detach(), **tol)
    gtol = tol if dtype in (torch.float64, torch.float32) else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(xa.grad.double(), xr.grad, **gtol)
    assert (loss >= -1e-6).all()


@pytest.mark.parametrize("whole_factor", [0, 16])  # head rows gathered per token; a block's whole logits (V <= 16 K)
def test_gradcheck_renorm_kl(whole_factor, monkeypatch):
    monkeypatch.setattr(opdcore.ops.loss, "WHOLE_HEAD_FACTOR", whole_factor)
    x, ids, tq, valid = make_case(4, 30, 6, torch.float64, 3)
    ids[1, 2] = ids[1, 4]  # a repeated id: its gradient is summed
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: opdcore.renorm_topk_kl(z, ids, tq.double(), valid, temperature=0.8), (x,))
    g = torch.Generator().manual_seed(4)
    h = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 5, generator=g, dtype=torch.float64, requires_grad=True)
    for block in (1 << 24, 60, 1):  # all rows at once; 2 rows at a time; one row at a time
        f = lambda a, b: opdcore.ops.renorm_topk_kl_linear(a, b, ids, tq.double(), valid,  # noqa: E731
                                                           max_block_elements=block)
        assert torch.autograd.gradcheck(f, (h, w))
        torch.testing.assert_close(f(h, w), ref.renorm_topk_kl(h @ w.T, ids, tq.double(), valid))
    with pytest.raises(ValueError, match="max_block_elements must be >= 1"):
        opdcore.ops.renorm_topk_kl_linear(h, w, ids, tq.double(), valid, max_block_elements=0)


@given(n=st.integers(1, 6), k=st.integers(1, 8), v=st.integers(8, 30), seed=st.integers(0, 2**31),
       strategy=st.sampled_from(STRATEGIES + tuple(STRATEGY_ALIASES)))
def test_token_set_matches_reference(n, k, v, seed, strategy):
    g = torch.Generator().manual_seed(seed)
    s_ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    t_ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    ts = opdcore.build_token_set(s_ids, t_ids, strategy, torch.rand(n, k, generator=g), torch.rand(n, k, generator=g))
    ids, valid = ref.build_token_set(s_ids, t_ids, strategy)
    assert torch.equal(ts.ids, ids) and torch.equal(ts.valid, valid)
    assert ts.teacher_logprobs.shape == ids.shape
    # each id of the set is counted once
    for row_ids, row_valid in zip(ts.ids, ts.valid):
        chosen = row_ids[row_valid].tolist()
        assert len(chosen) == len(set(chosen))


def test_token_set_semantics():
    S, T = torch.tensor([[1, 2, 3]]), torch.tensor([[3, 4, 1]])
    sets = {s: set(opdcore.build_token_set(S, T, s).ids[0][opdcore.build_token_set(S, T, s).valid[0]].tolist())
            for s in STRATEGIES}
    assert sets == {"student": {1, 2, 3}, "teacher": {3, 4, 1}, "intersection": {1, 3}, "union": {1, 2, 3, 4},
                    "symmetric_difference": {2, 4}}


def test_empty_set_row_contributes_nothing():
    x, ids, tq, _ = make_case(3, 50, 4, torch.float32, 9)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[1] = False
    xa = x.clone().requires_grad_(True)
    out = opdcore.opd_topk_loss(xa, ids, tq, valid)
    out.loss.sum().backward()
    assert out.loss[1] == 0 and (xa.grad[1] == 0).all() and (out.rewards[1] == 0).all()
    assert opdcore.renorm_topk_kl(x, ids, tq, valid)[1] == 0


def test_teacher_neg_inf_allowed_only_with_clip():
    x, ids, tq, valid = make_case(2, 40, 3, torch.float32, 5, valid_frac=1.0)
    tq[0, 1] = float("-inf")
    with pytest.raises(RuntimeError, match=r"teacher_logprobs is NaN, \+inf or -inf at a valid id \(row 0\)"):
        opdcore.opd_topk_loss(x, ids, tq, valid)
    out = opdcore.opd_topk_loss(x, ids, tq, valid, log_ratio_clip=5.0)
    assert torch.isfinite(out.loss).all()
    valid[0, 1] = False
    assert torch.isfinite(opdcore.opd_topk_loss(x, ids, tq, valid).loss).all()


@pytest.mark.parametrize("call,match", [
    (lambda x, i, t, v: opdcore.opd_topk_loss(x, i, t[:, :2], v), "teacher_logprobs must have the shape of ids"),
    (lambda x, i, t, v: opdcore.opd_topk_loss(x, i, t, v.int()), "valid must be bool"),
    (lambda x, i, t, v: opdcore.opd_topk_loss(x, i, t, v[:, :2]), "valid must have the shape of ids"),
    (lambda x, i, t, v: opdcore.opd_topk_loss(x, i.float(), t, v), "ids must be an int32 or int64"),
    (lambda x, i, t, v: opdcore.opd_topk_loss(x, i[:2], t[:2], v[:2]), r"ids must be \[N=3"),
    (lambda x, i, t, v: opdcore.opd_topk_loss(x, i + 100, t, v), "ids row 0 holds an id outside"),
    (lambda x, i, t, v: opdcore.opd_topk_loss(x, i, t, v, weight_mode="student"), "weight_mode must be one of"),
    (lambda x, i, t, v: opdcore.opd_topk_loss(x, i, t, v, log_ratio_clip=-1.0), "log_ratio_clip must be >= 0"),
    (lambda x, i, t, v: opdcore.opd_topk_loss(x, i, t, v, temperature=-1.0), "temperature"),
    (lambda x, i, t, v: opdcore.opd_topk_loss(x.long(), i, t, v), "student_logits must be float32"),
    (lambda x, i, t, v: opdcore.opd_topk_loss(x[:0], i[:0], t[:0], v[:0]), "no rows"),
    (lambda x, i, t, v: opdcore.opd_topk_loss(x, i, t.fill_(float("nan")), v), "teacher_logprobs is NaN"),
    (lambda x, i, t, v: opdcore.opd_topk_loss(x.index_fill(1, i[0, :1], float("-inf")), i, t, v),
     "student log-prob is -inf or NaN at a valid id"),
    (lambda x, i, t, v: opdcore.opd_topk_loss(x.index_fill(1, i[0, :1], float("nan")), i, t, v), "NaN or"),
    (lambda x, i, t, v: opdcore.renorm_topk_kl(x, i + 100, t, v), "ids holds an id outside"),
    (lambda x, i, t, v: opdcore.renorm_topk_kl(x, i, t.fill_(float("-inf")), v), "teacher_logprobs is NaN"),
    (lambda x, i, t, v: opdcore.opd_topk_loss_linear(x, torch.randn(7, 40), i, t, v), "ids holds an id outside"),
    (lambda x, i, t, v: opdcore.opd_topk_loss_linear(x, torch.randn(70, 41), i, t, v), "hidden size mismatch"),
    (lambda x, i, t, v: opdcore.build_token_set(i, i, "best"), "strategy must be one of"),
    (lambda x, i, t, v: opdcore.build_token_set(i, None, "union"), "needs teacher_ids"),
    (lambda x, i, t, v: opdcore.build_token_set(i, i[:2], "union"), "teacher_ids must be"),
    (lambda x, i, t, v: opdcore.build_token_set(i, i, "union", t[:, :1]), "teacher_logprobs_on_student must have"),
])
def test_errors(call, match):
    x, ids, tq, valid = make_case(3, 40, 4, torch.float32, 0, valid_frac=1.0)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        call(x, ids, tq, valid)


def test_opcheck():
    x, ids, tq, valid = make_case(4, 90, 5, torch.float32, 1)
    for mode in range(len(WEIGHT_MODES)):
        torch.library.opcheck(torch.ops.opdcore.opd_topk_loss_fwd.default, (x.requires_grad_(True), ids, tq, valid, mode, 0.9, 2.0))
    out = opdcore.opd_topk_loss(x.detach(), ids, tq, valid)
    g = torch.rand(4)
    torch.library.opcheck(torch.ops.opdcore.opd_topk_loss_bwd.default, (g, x.detach(), out.lse, ids, out.rewards, 1.0))
    torch.library.opcheck(torch.ops.opdcore.opd_topk_loss_bwd_chunk_.default,
                          (x.detach()[:, 10:50].clone(), 10, g, out.lse, ids, out.rewards, 1.0))
    torch.library.opcheck(torch.ops.opdcore.opd_rewards.default, (out.student_logprobs, tq, valid, 0, 0.0))
    z = x.detach().gather(1, ids).requires_grad_(True)
    torch.library.opcheck(torch.ops.opdcore.renorm_kl_fwd.default, (z, tq, valid, 1.0))


@given(n=st.integers(1, 12), v=st.integers(2, 500), h=st.integers(1, 16), kk=st.integers(1, 10),
       block=st.integers(1, 3000), mode=st.sampled_from(WEIGHT_MODES), seed=st.integers(0, 2**31))
def test_weighted_linear_loss_matches_unfused(n, v, h, kk, block, mode, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, v, (n, kk), generator=g)
    tq = -torch.rand(n, kk, generator=g, dtype=torch.float64) * 8
    valid = torch.rand(n, kk, generator=g) < 0.7
    w = torch.rand(n, generator=g, dtype=torch.float64)
    total, out = opdcore.ops.opd_topk_loss_linear_weighted(hidden, weight, ids, tq, w, valid, weight_mode=mode,
                                                           temperature=0.8, log_ratio_clip=2.0,
                                                           max_block_elements=block)
    (3.0 * total).backward()  # a scaled upstream gradient reaches the stored gradients
    h2, w2 = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    loss_r, rew_r = ref.opd_topk_loss(h2 @ w2.T, ids, tq, valid, mode, 0.8, 2.0)
    (3.0 * (loss_r * w).sum()).backward()
    torch.testing.assert_close(total, (loss_r * w).sum().detach())
    torch.testing.assert_close(out.rewards, rew_r)
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [40, 700, 1 << 24])
@pytest.mark.parametrize("upstream", [1.0, 3.0])
def test_weighted_linear_loss_16bit_head_gradient(dtype, block, upstream):
    # a trained 16-bit head takes its gradient from a second pass over vocabulary chunks (block / N columns)
    g = torch.Generator().manual_seed(5)
    n, v, h = 24, 300, 16
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype).requires_grad_(True)
    ids = torch.randint(0, v, (n, 6), generator=g)
    tq = -torch.rand(n, 6, generator=g) * 6
    valid = torch.rand(n, 6, generator=g) < 0.8
    w = torch.rand(n, generator=g)
    total, _ = opdcore.ops.opd_topk_loss_linear_weighted(hidden, weight, ids, tq, w, valid, temperature=0.9,
                                                         max_block_elements=block)
    (upstream * total if upstream != 1.0 else total).backward()
    h2 = hidden.detach().double().requires_grad_(True)
    w2 = weight.detach().double().requires_grad_(True)
    loss_r, _ = ref.opd_topk_loss(h2 @ w2.T, ids, tq.double(), valid, "student_p", 0.9, 0.0)
    (upstream * (loss_r * w.double()).sum()).backward()
    assert weight.grad.dtype == dtype and hidden.grad.dtype == dtype
    scale = w2.grad.abs().max()
    torch.testing.assert_close(weight.grad.double() / scale, w2.grad / scale, atol=1e-2, rtol=0)
    scale = h2.grad.abs().max()
    torch.testing.assert_close(hidden.grad.double() / scale, h2.grad / scale, atol=1e-2, rtol=0)


def test_weighted_linear_loss_errors_and_frozen_head():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(30, 8)
    ids, tq = torch.randint(0, 30, (4, 3)), -torch.rand(4, 3)
    f = opdcore.ops.opd_topk_loss_linear_weighted
    with pytest.raises(ValueError, match="token_weights must be a floating"):
        f(hidden, weight, ids, tq, torch.ones(3))
    with pytest.raises(ValueError, match="max_block_elements"):
        f(hidden, weight, ids, tq, torch.ones(4), max_block_elements=0)
    with pytest.raises(ValueError, match="ids holds an id outside"):
        f(hidden, weight, ids + 30, tq, torch.ones(4))
    total, _ = f(hidden, weight, ids, tq, torch.ones(4), max_block_elements=60)
    total.backward()
    assert hidden.grad is not None and weight.grad is None
