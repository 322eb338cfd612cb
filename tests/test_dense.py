"""Dense divergences (forward KL, reverse KL, JSD): the kernel against reference.py on random inputs, float64
gradcheck of the one-pass backward, and every error path."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import opdcore
from opdcore import reference as ref
from opdcore.ops import DIVERGENCES

from helpers import DTYPES, make_logits


def _pair(n, v, dtype, seed, masked):
    """Student and teacher logits; masked entries (-inf) are shared, as with a common vocabulary mask."""
    s = make_logits(n, v, torch.float64, seed, neg_inf_frac=0.2 if masked else 0.0)
    t = make_logits(n, v, torch.float64, seed + 1) * 0.7
    t = t.masked_fill(torch.isinf(s), float("-inf"))
    return s.to(dtype), t.to(dtype)


@given(n=st.integers(1, 9), v=st.integers(1, 3000), dtype=st.sampled_from(DTYPES),
       kind=st.sampled_from(DIVERGENCES), beta=st.sampled_from([0.1, 0.5, 0.9]),
       temperature=st.sampled_from([1.0, 0.6, 2.0]), masked=st.booleans(), seed=st.integers(0, 2**31))
def test_matches_reference(n, v, dtype, kind, beta, temperature, masked, seed):
    s, t = _pair(n, v, dtype, seed, masked)
    got = opdcore.dense_divergence(s, t, kind, beta=beta, temperature=temperature)
    want = ref.dense_divergence(s, t, kind, beta, temperature)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(got, want, **tol)
    assert bool((got >= -1e-5).all())


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(kind, masked):
    s, t = _pair(3, 37, torch.float64, 11, masked)
    torch.autograd.gradcheck(lambda x: opdcore.dense_divergence(x, t, kind, beta=0.3, temperature=0.8),
                             (s.clone().requires_grad_(True),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradient_matches_autograd_reference(dtype, kind):
    s, t = _pair(6, 2049, dtype, 3, True)
    x = s.clone().requires_grad_(True)
    w = torch.linspace(0.2, 2.0, 6)
    (opdcore.dense_divergence(x, t, kind, beta=0.4, temperature=1.3) * w).sum().backward()
    y = s.float().clone().requires_grad_(True)
    (ref.dense_divergence(y, t.float(), kind, 0.4, 1.3) * w).sum().backward()
    finite = torch.isfinite(s)
    assert x.grad.dtype == dtype and bool((x.grad[~finite] == 0).all())
    tol = dict(rtol=1e-4, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(x.grad.float()[finite], y.grad[finite], **tol)


def test_supports_mismatch_gives_inf_kl_but_finite_jsd():
    s = torch.tensor([[0.0, float("-inf"), 1.0]])
    t = torch.tensor([[0.0, 2.0, 1.0]])
    assert torch.isinf(opdcore.dense_divergence(s, t, "forward_kl")).all()  # q has mass where p has none
    assert torch.isfinite(opdcore.dense_divergence(s, t, "reverse_kl")).all()
    assert torch.isinf(opdcore.dense_divergence(t, s, "reverse_kl")).all()
    torch.testing.assert_close(opdcore.dense_divergence(s, t, "jsd", beta=0.5),
                               ref.dense_divergence(s, t, "jsd", 0.5))


def test_identical_distributions_give_zero():
    x = make_logits(4, 500, torch.float32, 1)
    for kind in DIVERGENCES:
        torch.testing.assert_close(opdcore.dense_divergence(x, x.clone(), kind), torch.zeros(4), atol=2e-6, rtol=0)


def test_strided_and_noncontiguous():
    s, t = _pair(8, 700, torch.float32, 5, True)
    want = opdcore.dense_divergence(s, t, "jsd")
    torch.testing.assert_close(opdcore.dense_divergence(s[::2], t[::2], "jsd"), want[::2])
    st_ = s.t().contiguous().t()  # column-strided: the glue makes it unit-stride
    torch.testing.assert_close(opdcore.dense_divergence(st_, t, "jsd"), want)


def test_errors():
    s, t = _pair(3, 50, torch.float32, 0, False)
    with pytest.raises(RuntimeError, match="vocabulary mismatch: student_logits has 50 columns but teacher_logits"):
        opdcore.dense_divergence(s, t[:, :49])
    with pytest.raises(RuntimeError, match="student_logits has 3 rows but teacher_logits has 2"):
        opdcore.dense_divergence(s, t[:2])
    with pytest.raises(RuntimeError, match="must share a dtype"):
        opdcore.dense_divergence(s, t.double())
    with pytest.raises(RuntimeError, match="student_logits has no rows"):
        opdcore.dense_divergence(s[:0], t[:0])
    with pytest.raises(RuntimeError, match="beta must lie in"):
        opdcore.dense_divergence(s, t, "jsd", beta=1.0)
    with pytest.raises(RuntimeError, match="temperature"):
        opdcore.dense_divergence(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="divergence must be one of"):
        opdcore.dense_divergence(s, t, "kl")
    with pytest.raises(RuntimeError, match="divergence kind must be"):
        torch.ops.opdcore.dense_divergence_fwd(s, t, 3, 0.5, 1.0)
    bad = s.clone()
    bad[2, 7] = float("nan")
    bad[1, 3] = float("inf")
    with pytest.raises(RuntimeError, match=r"student_logits contains NaN or \+inf \(row 1\)"):
        opdcore.dense_divergence(bad, t)
    with pytest.raises(RuntimeError, match=r"teacher_logits contains NaN or \+inf \(row 1\)"):
        opdcore.dense_divergence(t, bad)
    allneg = t.clone()
    allneg[2] = float("-inf")
    with pytest.raises(RuntimeError, match="teacher_logits row 2 is entirely -inf"):
        opdcore.dense_divergence(s, allneg)
    with pytest.raises(RuntimeError, match="student_logits row 2 is entirely -inf"):
        opdcore.dense_divergence(allneg, s)


def test_opcheck():
    s, t = _pair(4, 90, torch.float32, 2, True)
    for kind in range(3):
        torch.library.opcheck(torch.ops.opdcore.dense_divergence_fwd.default,
                              (s.clone().requires_grad_(True), t, kind, 0.3, 0.9))
    loss, ls, lt, aux = torch.ops.opdcore.dense_divergence_fwd(s, t, 2, 0.3, 0.9)
    torch.library.opcheck(torch.ops.opdcore.dense_divergence_bwd.default, (torch.rand(4), s, t, ls, lt, aux, 2, 0.3, 0.9))


@given(n=st.integers(1, 12), v=st.integers(2, 300), h=st.integers(1, 12), ht=st.integers(1, 12),
       block=st.integers(1, 2000), kind=st.sampled_from(DIVERGENCES), scale=st.sampled_from([1.0, 1.25]),
       seed=st.integers(0, 2**31))
def test_linear_weighted_matches_unfused(n, v, h, ht, block, kind, scale, seed):
    """The fused row-block version (gradient formed in the forward) equals the unfused op through autograd."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    xt, wt = torch.randn(n, ht, generator=g, dtype=torch.float64), torch.randn(v, ht, generator=g, dtype=torch.float64)
    tw = torch.rand(n, generator=g, dtype=torch.float64)
    total, per = opdcore.ops.dense_divergence_linear_weighted(x, w, xt, wt, tw, kind, beta=0.3, temperature=0.9,
                                                              teacher_logit_scale=scale, max_block_elements=block)
    got = torch.autograd.grad(2.0 * total, (x, w))
    ref_per = opdcore.dense_divergence(x @ w.T, (xt @ wt.T) * scale, kind, beta=0.3, temperature=0.9)
    want = torch.autograd.grad(2.0 * (ref_per * tw).sum(), (x, w))
    torch.testing.assert_close(per, ref_per.detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_linear_weighted_errors():
    x, w = torch.randn(4, 8), torch.randn(30, 8)
    tw = torch.ones(4)
    f = opdcore.ops.dense_divergence_linear_weighted
    with pytest.raises(ValueError, match="vocabulary mismatch: weight has 30 rows but teacher_weight has 29"):
        f(x, w, torch.randn(4, 5), torch.randn(29, 5), tw)
    with pytest.raises(ValueError, match="teacher_hidden has 3 rows but hidden has 4"):
        f(x, w, torch.randn(3, 5), torch.randn(30, 5), tw)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        f(x, torch.randn(30, 7), torch.randn(4, 5), torch.randn(30, 5), tw)
    with pytest.raises(ValueError, match="token_weights must be a floating"):
        f(x, w, torch.randn(4, 5), torch.randn(30, 5), torch.ones(4, dtype=torch.long))


@given(n=st.integers(1, 6), v=st.integers(2, 2500), cut=st.floats(0.05, 0.95), dtype=st.sampled_from(DTYPES),
       kind=st.sampled_from(DIVERGENCES), masked=st.booleans(), seed=st.integers(0, 2**31))
def test_known_normalisers_give_shares_that_add_up(n, v, cut, dtype, kind, masked, seed):
    """With the full rows' log-sum-exps given, each column range returns its share of loss and aux."""
    s, t = _pair(n, v, dtype, seed, masked)
    loss, ls, lt, aux = torch.ops.opdcore.dense_divergence_fwd(s, t, DIVERGENCES.index(kind), 0.3, 0.9)
    c = max(1, min(v - 1, int(cut * v)))
    parts = [torch.ops.opdcore.dense_divergence_fwd(s[:, a:b], t[:, a:b], DIVERGENCES.index(kind), 0.3, 0.9, ls, lt)
             for a, b in ((0, c), (c, v))]
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(parts[0][0] + parts[1][0], loss, **tol)
    torch.testing.assert_close(parts[0][3] + parts[1][3], aux, **tol)
    assert torch.equal(parts[0][1], ls) and torch.equal(parts[1][2], lt)


def test_known_normalisers_errors():
    s, t = _pair(3, 40, torch.float32, 0, False)
    _, ls, lt, _ = torch.ops.opdcore.dense_divergence_fwd(s, t, 1, 0.5, 1.0)
    with pytest.raises(RuntimeError, match="lse_s and lse_t must be given together"):
        torch.ops.opdcore.dense_divergence_fwd(s, t, 1, 0.5, 1.0, ls, None)
    with pytest.raises(RuntimeError, match=r"lse_s and lse_t must be \[3\] Float"):
        torch.ops.opdcore.dense_divergence_fwd(s, t, 1, 0.5, 1.0, ls.double(), lt.double())
    bad = s.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match=r"student_logits contains NaN or \+inf \(row 1\)"):
        torch.ops.opdcore.dense_divergence_fwd(bad, t, 1, 0.5, 1.0, ls, lt)
