"""The tail-aware top-k KL (METHOD.md 2.4: the reverse KL of the set's ids plus one rest-of-vocabulary bin) against
its plain-PyTorch twin, gradchecked unfused and fused with the LM head, its identities, what it does that the
renormalised KL cannot, and its errors. The vocabulary-parallel forms are in test_vocab_parallel.py."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import opdcore
from opdcore import reference as ref
from opdcore.ops import tail_topk_kl, tail_topk_kl_linear_weighted
from helpers import DTYPES, make_logits


def make_case(n, v, kk, dtype, seed, neg_inf=0.0, valid_frac=0.8, ties=False):
    """Logits, kk distinct ids per row (finite student logits where possible), teacher log-probs, valid mask."""
    g = torch.Generator().manual_seed(seed)
    x = make_logits(n, v, dtype, seed, neg_inf_frac=neg_inf, ties=ties)
    finite = torch.isfinite(x.double())
    kk = min(kk, v)
    ids = torch.stack([torch.multinomial(finite[i].double() + 1e-9, kk, replacement=False, generator=g)
                       for i in range(n)])
    teacher = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    tq = teacher.gather(1, ids)
    valid = (torch.rand(n, kk, generator=g) < valid_frac) & finite.gather(1, ids)
    return x, ids, tq, valid


@given(n=st.integers(1, 8), v=st.integers(2, 2500), kk=st.integers(1, 24), dtype=st.sampled_from(DTYPES),
       temperature=st.sampled_from([1.0, 0.6, 1.5]), neg_inf=st.sampled_from([0.0, 0.4]),
       ties=st.booleans(), seed=st.integers(0, 2**31))
def test_matches_reference(n, v, kk, dtype, temperature, neg_inf, ties, seed):
    x, ids, tq, valid = make_case(n, v, kk, dtype, seed, neg_inf, ties=ties)
    tq = tq if dtype == torch.float64 else tq.float()
    xa = x.clone().requires_grad_(True)
    out = tail_topk_kl(xa, ids, tq, valid, temperature=temperature)
    g = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1), dtype=out.loss.dtype)
    (out.loss * g).sum().backward()
    xr = x.clone().double().requires_grad_(True)  # the twin in float64 on the same rounded inputs
    want = ref.tail_topk_kl(xr, ids, tq.double(), valid, temperature)
    (want * g.double()).sum().backward()
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=3e-4, rtol=3e-4)
    torch.testing.assert_close(out.loss.double(), want.detach(), **tol)
    gtol = tol if dtype in (torch.float64, torch.float32) else dict(atol=1e-2, rtol=1e-2)  # grad stored in bf16/fp16
    torch.testing.assert_close(xa.grad.double(), xr.grad, **gtol)
    assert xa.grad.dtype == dtype
    assert (out.loss >= -1e-5).all()  # a KL
    assert (out.coefficients[~valid] == 0).all()


def test_gradcheck():
    x, ids, tq, valid = make_case(4, 30, 6, torch.float64, 3)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: tail_topk_kl(z, ids, tq, valid, temperature=0.8).loss, (x,))
    g = torch.Generator().manual_seed(4)
    h = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tw = torch.rand(4, generator=g, dtype=torch.float64)
    for block in (1 << 24, 60, 1):  # all rows at once; two rows per block; one row at a time
        f = lambda a, b: tail_topk_kl_linear_weighted(a, b, ids, tq, tw, valid, temperature=0.8,  # noqa: E731
                                                      max_block_elements=block)[0]
        assert torch.autograd.gradcheck(f, (h, w))
        torch.testing.assert_close(f(h, w), (ref.tail_topk_kl(h @ w.T, ids, tq, valid, 0.8) * tw).sum())


@given(n=st.integers(1, 12), v=st.integers(2, 500), h=st.integers(1, 16), kk=st.integers(1, 10),
       block=st.integers(1, 3000), seed=st.integers(0, 2**31))
def test_fused_matches_unfused(n, v, h, kk, block, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    _, ids, tq, valid = make_case(n, v, kk, torch.float64, seed)
    w = torch.rand(n, generator=g, dtype=torch.float64)
    total, out = tail_topk_kl_linear_weighted(hidden, weight, ids, tq, w, valid, temperature=0.8,
                                              max_block_elements=block)
    (3.0 * total).backward()
    z = (hidden.detach() @ weight.detach().T).requires_grad_(True)
    plain = tail_topk_kl(z, ids, tq, valid, temperature=0.8)
    torch.testing.assert_close(out.loss, plain.loss.detach())
    torch.testing.assert_close(out.coefficients, plain.coefficients)
    h2, w2 = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    (3.0 * (ref.tail_topk_kl(h2 @ w2.T, ids, tq, valid, 0.8) * w).sum()).backward()
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


def test_chain_rule_and_whole_vocabulary():
    """KL of the k+1 bins = P KL(pbar || qbar) + the two-bin KL of (P, 1 - P) against (Q, 1 - Q), to float64
    precision; with the whole vocabulary as the set it is the dense reverse KL."""
    x, ids, tq, valid = make_case(6, 40, 8, torch.float64, 11, valid_frac=1.0)
    got = tail_topk_kl(x, ids, tq, valid).loss
    slp = torch.log_softmax(x, -1).gather(1, ids)
    P, Q = slp.exp().sum(-1), tq.exp().sum(-1)
    two_bin = P * torch.log(P / Q) + (1 - P) * torch.log((1 - P) / (1 - Q))
    torch.testing.assert_close(got, P * opdcore.renorm_topk_kl(x, ids, tq, valid) + two_bin, rtol=1e-12, atol=1e-14)
    teacher = torch.log_softmax(torch.randn(6, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1)
    every = torch.arange(40).expand(6, 40)
    whole = tail_topk_kl(x, every, teacher, None).loss
    torch.testing.assert_close(whole, opdcore.dense_divergence(x, teacher, "reverse_kl"), rtol=1e-10, atol=1e-12)


def test_pulls_up_the_teachers_token_outside_the_set():
    """The teacher's best token lies outside the student's set: the renormalised KL gives its logit no gradient,
    the tail-aware KL raises it, and a step moves the set's mass P toward the teacher's Q."""
    v = 20
    x = torch.zeros(1, v, dtype=torch.float64)
    x[0, :4] = 3.0  # the student's set: ids 0-3, P ~ 0.84
    ids = torch.arange(4).unsqueeze(0)
    teacher = torch.full((1, v), -3.0, dtype=torch.float64)
    teacher[0, 10] = 4.0  # the teacher's best token: id 10, outside the set
    tq = torch.log_softmax(teacher, -1).gather(1, ids)
    valid = torch.ones(1, 4, dtype=torch.bool)
    z = x.clone().requires_grad_(True)
    opdcore.renorm_topk_kl(z, ids, tq, valid).sum().backward()
    assert z.grad[0, 10] == 0
    z = x.clone().requires_grad_(True)
    tail_topk_kl(z, ids, tq, valid).loss.sum().backward()
    assert z.grad[0, 10] < 0  # descent raises it
    P = lambda logits: torch.softmax(logits, -1)[0, :4].sum().item()  # noqa: E731
    Q = tq.exp().sum().item()
    stepped = x - 0.5 * z.grad
    assert abs(P(stepped) - Q) < abs(P(x) - Q)


def test_edge_cases():
    x, ids, tq, valid = make_case(3, 50, 4, torch.float32, 9, valid_frac=1.0)
    valid[1] = False  # an empty set: nothing to compare, no gradient
    xa = x.clone().requires_grad_(True)
    out = tail_topk_kl(xa, ids, tq, valid)
    out.loss.sum().backward()
    assert out.loss[1] == 0 and (xa.grad[1] == 0).all()
    # a student whose set holds all of its mass (the rest bin rounds to empty): finite loss and gradient
    peaked = torch.full((2, 50), -200.0)
    peaked[:, :4] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    z = peaked.clone().requires_grad_(True)
    ids4 = torch.arange(4).expand(2, 4)
    out = tail_topk_kl(z, ids4, tq[:2], None)
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(z.grad).all()
    # a teacher that gives a set token no probability: the KL is infinite; a clip keeps the gradient finite
    tq_inf = tq.clone()
    tq_inf[0, 0] = float("-inf")
    assert math.isinf(float(tail_topk_kl(x, ids, tq_inf, None).loss[0]))
    z = x.clone().requires_grad_(True)
    tail_topk_kl(z, ids, tq_inf, None, log_ratio_clip=5.0).coefficients.sum()
    out = tail_topk_kl(z, ids, tq_inf, None, log_ratio_clip=5.0)
    assert torch.isfinite(out.coefficients).all()


@pytest.mark.parametrize("call,match", [
    (lambda x, i, t, v: tail_topk_kl(x, i, t[:, :2], v), "teacher_logprobs must have the shape of ids"),
    (lambda x, i, t, v: tail_topk_kl(x, i.float(), t, v), "ids must be an int32 or int64"),
    (lambda x, i, t, v: tail_topk_kl(x, i + 100, t, v), "ids holds an id outside"),
    (lambda x, i, t, v: tail_topk_kl(x, i[:2], t[:2], v[:2]), r"ids must be \[N=3"),
    (lambda x, i, t, v: tail_topk_kl(x, i, t.fill_(float("nan")), v), "teacher_logprobs is NaN"),
    (lambda x, i, t, v: tail_topk_kl(x, i, t + 5.0, v), "positive log-prob"),
    (lambda x, i, t, v: tail_topk_kl(x, i[:, [0, 0, 1, 2]], t, v), "ids holds a valid id twice in row 0"),
    (lambda x, i, t, v: tail_topk_kl(x, i, t, v, log_ratio_clip=-1.0), "log_ratio_clip must be >= 0"),
    (lambda x, i, t, v: tail_topk_kl(x, i, t, v, temperature=0.0), "temperature must be > 0"),
    (lambda x, i, t, v: tail_topk_kl(x[0], i, t, v), r"student_logits must be \[N, V\]"),
    (lambda x, i, t, v: tail_topk_kl(x, i, t, v.int()), "valid must be a bool tensor"),
    (lambda x, i, t, v: tail_topk_kl_linear_weighted(x[:, :8], torch.randn(40, 8), i, t, torch.ones(2), v),
     "token_weights"),
    (lambda x, i, t, v: tail_topk_kl_linear_weighted(x[:, :8], torch.randn(40, 9), i, t, torch.ones(3), v),
     "hidden size mismatch"),
])
def test_errors(call, match):
    x, ids, tq, valid = make_case(3, 40, 4, torch.float32, 0, valid_frac=1.0)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        call(x, ids, tq.float(), valid)


def test_repeated_id_masked_is_fine():
    x, ids, tq, valid = make_case(2, 40, 4, torch.float64, 2, valid_frac=1.0)
    ids[:, 3] = ids[:, 0]
    valid[:, 3] = False
    torch.testing.assert_close(tail_topk_kl(x, ids, tq, valid).loss, ref.tail_topk_kl(x, ids, tq, valid))
