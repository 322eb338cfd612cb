"""Streaming top-k extraction against the plain-PyTorch reference."""
import pytest
import torch
from hypothesis import given, strategies as st

import opdcore
from opdcore import reference as ref
from helpers import ATOL, DTYPES, make_logits

shapes = st.tuples(st.integers(1, 9), st.integers(1, 3000))


def assert_topk_equal(got, want, dtype):
    ids, lp, lse, ent = want
    assert torch.equal(got.ids, ids)
    torch.testing.assert_close(got.logprobs, lp, atol=ATOL[dtype], rtol=1e-5)
    torch.testing.assert_close(got.lse, lse, atol=ATOL[dtype], rtol=1e-5)
    torch.testing.assert_close(got.entropy, ent, atol=1e-4 if dtype != torch.float64 else 1e-9, rtol=1e-4)


@given(shape=shapes, k=st.integers(1, 40), dtype=st.sampled_from(DTYPES), temperature=st.sampled_from([1.0, 0.7, 1.9]),
       ties=st.booleans(), neg_inf=st.sampled_from([0.0, 0.3, 0.97]), seed=st.integers(0, 2**31))
def test_topk_matches_reference(shape, k, dtype, temperature, ties, neg_inf, seed):
    n, v = shape
    k = min(k, v)
    x = make_logits(n, v, dtype, seed, ties=ties, neg_inf_frac=neg_inf)
    got = opdcore.topk_logprobs(x, k, temperature)
    want = ref.topk_logprobs(x, k, temperature)
    assert got.logprobs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_topk_equal(got, want, dtype)


@pytest.mark.parametrize("k", [1, 15, 16, 17, 40])
@pytest.mark.parametrize("order", ["ascending", "descending", "one_block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_sorted_rows(k, order, dtype):
    # Monotone rows put a block's whole top-k in its last (or first) 16 values: the kernel may skip values below
    # the smallest of its 16 lanes' maxima only while k <= 16.
    v = 3000
    x = torch.arange(v, dtype=torch.float32) / 64  # bfloat16 rounds the larger ones into ties
    if order == "descending":
        x = x.flip(0)
    elif order == "one_block":
        x = torch.full((v,), -5.0)
        x[1024:2048] = torch.arange(1024, dtype=torch.float32) / 64
    x = torch.stack([x, x.roll(7)]).to(dtype)
    assert_topk_equal(opdcore.topk_logprobs(x, k), ref.topk_logprobs(x, k), dtype)


@pytest.mark.parametrize("layout", ["transposed", "row_slice", "col_slice"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_non_contiguous(layout, dtype):
    base = make_logits(6, 1500, dtype, 3)
    if layout == "transposed":
        x = base.t().contiguous().t()
    elif layout == "row_slice":
        x = make_logits(12, 1700, dtype, 4)[::2, 100:1600]
    else:
        x = make_logits(6, 3000, dtype, 5)[:, ::2]
    assert not x.is_contiguous()
    assert_topk_equal(opdcore.topk_logprobs(x, 7), ref.topk_logprobs(x, 7), dtype)


@given(shape=shapes, m=st.integers(1, 20), dtype=st.sampled_from(DTYPES), temperature=st.sampled_from([1.0, 0.5]),
       neg_inf=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 2**31))
def test_logprobs_at_matches_reference(shape, m, dtype, temperature, neg_inf, seed):
    n, v = shape
    x = make_logits(n, v, dtype, seed, neg_inf_frac=neg_inf)
    ids = torch.randint(0, v, (n, m), generator=torch.Generator().manual_seed(seed))
    lp, lse = opdcore.logprobs_at(x, ids, temperature)
    want_lp, want_lse = ref.logprobs_at(x, ids, temperature)
    torch.testing.assert_close(lp, want_lp, atol=ATOL[dtype], rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=ATOL[dtype], rtol=1e-5)
    lp32, _ = opdcore.logprobs_at(x, ids.int(), temperature)  # int32 ids are accepted
    torch.testing.assert_close(lp32, lp)


@given(shape=shapes, k=st.integers(0, 20), n_chunks=st.integers(1, 7), dtype=st.sampled_from(DTYPES),
       ties=st.booleans(), neg_inf=st.sampled_from([0.0, 0.6]), m=st.integers(0, 5), seed=st.integers(0, 2**31))
def test_stream_chunks_any_order_and_merge(shape, k, n_chunks, dtype, ties, neg_inf, m, seed):
    """Chunks fed in random order, split across two states and merged, equal the one-shot kernel."""
    n, v = shape
    k = min(k, v)
    g = torch.Generator().manual_seed(seed)
    x = make_logits(n, v, dtype, seed, ties=ties, neg_inf_frac=neg_inf)
    targets = torch.randint(0, v, (n, m), generator=g)
    cuts = sorted(set([0, v] + torch.randint(0, v + 1, (n_chunks - 1,), generator=g).tolist()))
    chunks = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    order = torch.randperm(len(chunks), generator=g).tolist()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    halves = [opdcore.StreamState(n, k, targets, dtype=acc, temperature=0.8) for _ in range(2)]
    for i, c in enumerate(order):
        a, b = chunks[c]
        halves[i % 2].update(x[:, a:b], a)
    out = halves[1].merge(halves[0]).finalize()
    want = ref.topk_logprobs(x, k, 0.8)
    assert torch.equal(out.ids, want[0])
    torch.testing.assert_close(out.logprobs, want[1], atol=ATOL[dtype], rtol=1e-5)
    torch.testing.assert_close(out.lse, want[2], atol=ATOL[dtype], rtol=1e-5)
    torch.testing.assert_close(out.entropy, want[3], atol=1e-4 if dtype != torch.float64 else 1e-9, rtol=1e-4)
    torch.testing.assert_close(out.target_logprobs, ref.logprobs_at(x, targets, 0.8)[0], atol=ATOL[dtype], rtol=1e-5)


@given(n=st.integers(1, 20), v=st.integers(1, 700), h=st.integers(1, 24), k=st.integers(1, 10),
       chunk=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_linear_topk_matches_materialised(n, v, h, k, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (n, 3), generator=g)
    k = min(k, v)
    out = opdcore.linear_topk(hidden, weight, k, temperature=1.3, chunk_size=chunk, ids=ids)
    want = ref.topk_logprobs(hidden @ weight.T, k, 1.3)
    assert torch.equal(out.ids, want[0])
    torch.testing.assert_close(out.logprobs, want[1], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out.entropy, want[3], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out.target_logprobs, ref.logprobs_at(hidden @ weight.T, ids, 1.3)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_topk_low_precision(dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(33, 64, generator=g).to(dtype)
    weight = torch.randn(1001, 64, generator=g).to(dtype)
    out = opdcore.linear_topk(hidden, weight, 8, chunk_size=128)
    want = ref.topk_logprobs(hidden @ weight.T, 8)
    torch.testing.assert_close(out.lse, want[2], atol=0.05 if dtype == torch.bfloat16 else 1e-4, rtol=0)
    overlap = (out.ids.unsqueeze(2) == want[0].unsqueeze(1)).any(2).float().mean()
    assert overlap > 0.95  # chunked vs full matmul may round differently, which can swap near-ties


def test_entropy_extremes():
    x = torch.full((2, 50), float("-inf"))
    x[0, 3] = 1.0  # one-hot: entropy 0
    x[1] = 0.0  # uniform: entropy log(50)
    out = opdcore.topk_logprobs(x, 2)
    torch.testing.assert_close(out.entropy, torch.tensor([0.0, torch.log(torch.tensor(50.0)).item()]))
    assert out.ids[0].tolist() == [3, 0] and out.logprobs[0, 1] == float("-inf")
    assert out.ids[1].tolist() == [0, 1]


# ---- errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda: opdcore.topk_logprobs(torch.randn(10), 2), "logits must be 2-D"),
    (lambda: opdcore.topk_logprobs(torch.ones(2, 5, dtype=torch.int64), 2), "logits must be float32"),
    (lambda: opdcore.topk_logprobs(torch.randn(0, 5), 2), "no rows"),
    (lambda: opdcore.topk_logprobs(torch.randn(3, 0), 1), "empty vocabulary"),
    (lambda: opdcore.topk_logprobs(torch.randn(2, 5), 0), "k must be in"),
    (lambda: opdcore.topk_logprobs(torch.randn(2, 5), 6), "k must be in"),
    (lambda: opdcore.topk_logprobs(torch.randn(2, 5), 2, 0.0), "temperature"),
    (lambda: opdcore.topk_logprobs(torch.randn(2, 5), 2, float("nan")), "temperature"),
    (lambda: opdcore.topk_logprobs(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), 1), r"NaN or \+inf \(row 1\)"),
    (lambda: opdcore.topk_logprobs(torch.tensor([[float("inf"), 1.0]]), 1), r"NaN or \+inf"),
    (lambda: opdcore.topk_logprobs(torch.tensor([[0.0], [float("-inf")]]), 1), "row 1 is entirely -inf"),
    (lambda: opdcore.logprobs_at(torch.randn(2, 5), torch.tensor([[0], [5]])), "ids row 1 holds an id outside"),
    (lambda: opdcore.logprobs_at(torch.randn(2, 5), torch.tensor([[0], [-1]])), "ids row 1 holds an id outside"),
    (lambda: opdcore.logprobs_at(torch.randn(2, 5), torch.tensor([0, 1])), r"ids must be \[2, m\]"),
    (lambda: opdcore.logprobs_at(torch.randn(2, 5), torch.zeros(2, 1)), "ids must be an int32 or int64"),
    (lambda: opdcore.StreamState(0, 3), "empty batch"),
    (lambda: opdcore.StreamState(2, 3, dtype=torch.bfloat16), "accumulator"),
    (lambda: opdcore.StreamState(2, 3, torch.zeros(3, 1, dtype=torch.long)), "target_ids must be"),
    (lambda: opdcore.StreamState(2, 3).update(torch.randn(3, 4), 0), "chunk has 3 rows but the state has 2"),
    (lambda: opdcore.StreamState(2, 3).update(torch.randn(2, 4, dtype=torch.float64), 0), "accumulator dtype"),
    (lambda: opdcore.StreamState(2, 3).update(torch.randn(2, 4), -1), "vocab_offset"),
    (lambda: opdcore.StreamState(2, 5).update(torch.randn(2, 4), 0).finalize(), "k is larger"),
    (lambda: opdcore.StreamState(1, 1, torch.tensor([[9]])).update(torch.randn(1, 4), 0).finalize(), "no streamed chunk"),
    (lambda: opdcore.StreamState(2, 1).merge(opdcore.StreamState(2, 2)), "differ"),
    (lambda: opdcore.linear_topk(torch.randn(2, 3), torch.randn(5, 4), 2), "hidden size mismatch"),
    (lambda: opdcore.linear_topk(torch.randn(2, 3), torch.randn(5, 3, dtype=torch.float64), 2), "share a dtype"),
    (lambda: opdcore.linear_topk(torch.randn(2, 3), torch.randn(5, 3), 2, chunk_size=0), "chunk_size"),
    (lambda: opdcore.linear_topk(torch.randn(2, 3), torch.randn(5, 3), 2, ids=torch.tensor([[5], [0]])), "ids holds an id"),
    (lambda: opdcore.linear_topk(torch.randn(0, 3), torch.randn(5, 3), 2), "empty batch"),
])
def test_errors(call, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        call()


def test_opcheck():
    x = make_logits(4, 300, torch.float32, 0, neg_inf_frac=0.2)
    ids = torch.randint(0, 300, (4, 3))
    torch.library.opcheck(torch.ops.opdcore.topk_logprobs.default, (x, 5, 1.0))
    torch.library.opcheck(torch.ops.opdcore.logprobs_at.default, (x, ids, 0.5))
    st_ = opdcore.StreamState(4, 5, ids)
    torch.library.opcheck(torch.ops.opdcore.stream_update.default,
                          (*st_._tensors()[:5], st_.target_ids, st_.target_vals, x, 0, 1.0))
    other = opdcore.StreamState(4, 5, ids).update(x, 0)
    torch.library.opcheck(torch.ops.opdcore.stream_merge.default, (*st_._tensors(), *other._tensors()))
    torch.library.opcheck(torch.ops.opdcore.stream_finalize.default, other._tensors())


def test_torch_compile_traces_ops():
    x = torch.randn(8, 500)
    f = torch.compile(lambda t: opdcore.topk_logprobs(t, 4).logprobs.sum(), backend="eager", fullgraph=True)
    torch.testing.assert_close(f(x), ref.topk_logprobs(x, 4)[1].sum())
