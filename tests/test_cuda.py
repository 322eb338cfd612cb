"""CUDA kernels against the CPU kernels (and python/opdcore/reference.py) on fresh random inputs.

The device under test (tests/cuda_backend.py): the GPU when one is visible (tests marked `cuda`; they skip unless
opdcore was built with its CUDA kernels), else the same kernels and glue in the CPU emulator of csrc/cuda_emu.
Top-k ids must match the CPU exactly (the scaled logits are computed with the same IEEE rounding, and ties go to
the lower id on both); log-probs, log-sum-exp, entropy and gradients match to floating-point tolerance (the GPU's
exp differs from the CPU polynomial by a few ulp). Error paths must raise the CPU's exact message, which names the
first bad row.
"""
from __future__ import annotations

import contextlib
import itertools
import os

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from opdcore import reference as ref
from opdcore.ops import StreamState, linear_topk, logprobs_at, opd_topk_loss, opd_topk_loss_linear, topk_logprobs
from opdcore.ops import opd_topk_loss_linear_weighted, renorm_topk_kl, renorm_topk_kl_linear
from opdcore.ops import DIVERGENCES, dense_divergence
from opdcore.ops.loss import WEIGHT_MODES
from opdcore.packing import from_padded, to_padded

from cuda_backend import DEV, MODE, device_ops, on_dev, ops, to_dev
import cuda_backend

pytestmark = [pytest.mark.skipif(not cuda_backend.AVAILABLE, reason="needs opdcore built with CUDA kernels")]
if MODE == "cuda":
    pytestmark.append(pytest.mark.cuda)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# d loss / d logits = p - (set terms) with O(1) terms: the device's __expf (a few ulps at |x| ~ 10) moves a
# float32 log-sum-exp by ~1e-6, and every p of the row with it.
F32_GRAD_ATOL = 1e-5


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=5e-5)


def _stored(dtype, rtol, atol):
    """Tolerance for a result stored in `dtype`: at least one ulp, since a last-bit difference in the float32
    math may round the stored value the other way."""
    return dict(rtol=max(rtol, torch.finfo(dtype).eps), atol=atol)


def _close(a, b, dtype, what, **over):
    kw = {**_tol(dtype), **over}
    torch.testing.assert_close(a.cpu(), b.cpu(), msg=lambda m: f"{what}: {m}", **kw)


def make_logits(n, v, dtype, *, seed=0, neg_inf_frac=0.05, ties=True, scale=3.0):
    """Random logits with -inf entries, exact ties (quantised rows) and one row that is mostly -inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    if ties and n > 1:
        x[::2] = torch.round(x[::2] * 2) / 2  # many exact ties in every other row
    if neg_inf_frac > 0:
        x[torch.rand(n, v, generator=g) < neg_inf_frac] = float("-inf")
    if n > 2 and v > 3:
        x[1, 3:] = float("-inf")  # a row with only 3 finite entries
    x[:, 0] = torch.where(torch.isinf(x[:, 0]), torch.zeros_like(x[:, 0]), x[:, 0])  # every row has a finite value
    return x.to(dtype)


def both(fn, *tensors):
    """fn on the device under test and on the CPU, each on its own copies of the tensors."""
    return on_dev(fn, *[to_dev(t) for t in tensors]), fn(*[t.clone() for t in tensors])


# ---- topk_logprobs / logprobs_at ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,k", [(1, 1), (7, 3), (33, 16), (257, 16), (1000, 64), (4099, 100), (3001, 200)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_topk_matches_cpu(dtype, v, k, temperature):
    x = make_logits(9, v, dtype, seed=v + k)
    g, c = both(lambda t: topk_logprobs(t, k, temperature), x)
    assert torch.equal(g.ids.cpu(), c.ids), "top-k ids (order and ties) differ from the CPU"
    _close(g.logprobs, c.logprobs, dtype, "logprobs")
    _close(g.lse, c.lse, dtype, "lse")
    _close(g.entropy, c.entropy, dtype, "entropy", atol=1e-4 if dtype != torch.float64 else 1e-10)
    rid, rlp, rlse, rent = ref.topk_logprobs(x, k, temperature)
    assert torch.equal(g.ids.cpu(), rid)
    _close(g.logprobs, rlp, dtype, "logprobs vs reference", rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [5, 16, 150])
def test_topk_split_rows(dtype, k):
    """Few long rows: several blocks per row and a merge kernel."""
    x = make_logits(3, 50_021, dtype, seed=k)
    g, c = both(lambda t: topk_logprobs(t, k), x)
    assert torch.equal(g.ids.cpu(), c.ids)
    _close(g.logprobs, c.logprobs, dtype, "logprobs")
    _close(g.lse, c.lse, dtype, "lse")
    _close(g.entropy, c.entropy, dtype, "entropy", atol=1e-4 if dtype != torch.float64 else 1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row_offset", "padded_rows", "col_strided", "odd_rows"])
def test_topk_noncontiguous(dtype, layout):
    base = make_logits(12, 1203, dtype, seed=3)
    if layout == "row_offset":  # every row starts 1 element past a 16-byte boundary
        x = to_dev(torch.cat([base[:, :1], base], 1))[:, 1:]
    elif layout == "padded_rows":
        x = to_dev(torch.cat([base, base[:, :5]], 1))[:, :1203]
    elif layout == "col_strided":
        x = to_dev(base.t().contiguous()).t()
    else:
        x = to_dev(base)[::3]
        base = base[::3]
    g = on_dev(topk_logprobs, x, 16, 0.9)
    c = topk_logprobs(base.cpu().contiguous(), 16, 0.9)
    assert torch.equal(g.ids.cpu(), c.ids)
    _close(g.logprobs, c.logprobs, dtype, "logprobs")
    _close(g.lse, c.lse, dtype, "lse")


def test_topk_all_ties_and_signed_zero():
    x = torch.zeros(4, 300)
    x[1] = -0.0
    x[2, ::2] = -0.0  # -0 and +0 are equal: ties go to the lower id
    x[3] = 1.0
    for dt in DTYPES:
        g, c = both(lambda t: topk_logprobs(t, 20), x.to(dt))
        assert torch.equal(g.ids.cpu(), c.ids)
        assert torch.equal(c.ids, torch.arange(20).expand(4, 20))


def test_topk_sorted_ascending_rows():
    """Every element beats the last: the worst case of the candidate filter."""
    x = torch.arange(20_000, dtype=torch.float32).repeat(3, 1) / 100
    g, c = both(lambda t: topk_logprobs(t, 64), x)
    assert torch.equal(g.ids.cpu(), c.ids)
    _close(g.logprobs, c.logprobs, torch.float32, "logprobs")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,m", [(9, 37, 5), (5, 4099, 32), (2, 40_000, 17)])
def test_logprobs_at(dtype, n, v, m):
    x = make_logits(n, v, dtype, seed=m)
    ids = torch.randint(0, v, (n, m))
    ids[:, 0] = 0
    (glp, glse), (clp, clse) = both(lambda t, i: logprobs_at(t, i, 1.3), x, ids)
    _close(glp, clp, dtype, "logprobs_at")
    _close(glse, clse, dtype, "lse")


# ---- streaming state -------------------------------------------------------------------------------------------


def _stream(x, k, tids, chunks, device, temperature=1.0, order=None):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    st = StreamState(x.shape[0], k, tids.to(device, copy=True), dtype=acc, device=device, temperature=temperature)
    bounds = list(zip(chunks[:-1], chunks[1:]))
    for lo, hi in (bounds if order is None else [bounds[i] for i in order]):
        st.update(x[:, lo:hi].to(device, copy=True), lo)
    return st


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [0, 1, 16, 100, 140])
def test_stream_chunks_match_cpu(dtype, k):
    n, v = 7, 5003
    x = make_logits(n, v, dtype, seed=k)
    tids = torch.randint(0, v, (n, 6))
    chunks = [0, 1, 1000, 1001, 2049, 4096, v]
    order = [3, 0, 5, 1, 4, 2]  # any order
    g = on_dev(lambda: _stream(x, k, tids, chunks, DEV, 0.8, order).finalize())
    c = _stream(x, k, tids, chunks, "cpu", 0.8, order).finalize()
    assert torch.equal(g.ids.cpu(), c.ids)
    _close(g.logprobs, c.logprobs, dtype, "logprobs")
    _close(g.lse, c.lse, dtype, "lse")
    _close(g.entropy, c.entropy, dtype, "entropy", atol=1e-4 if dtype != torch.float64 else 1e-10)
    _close(g.target_logprobs, c.target_logprobs, dtype, "target_logprobs")


@pytest.mark.parametrize("k", [8, 130])
def test_stream_state_interop_and_merge(k):
    """A state updated on CUDA continues on CPU (valid heap layout) and merges like the CPU's."""
    n, v = 6, 3000
    x = make_logits(n, v, torch.float32, seed=11)
    tids = torch.randint(0, v, (n, 4))
    a_gpu = on_dev(_stream, x, k, tids, [0, 1500], DEV)
    a_cpu = StreamState(n, k, tids, dtype=torch.float32)
    for name in ("max", "sumexp", "ent", "heap_vals", "heap_ids", "target_vals"):
        getattr(a_cpu, name).copy_(getattr(a_gpu, name).cpu())
    a_cpu.update(x[:, 1500:], 1500)
    c = _stream(x, k, tids, [0, 1500, v], "cpu").finalize()
    r = a_cpu.finalize()
    assert torch.equal(r.ids, c.ids)
    # merge of two CUDA states over disjoint ranges
    b_gpu = on_dev(_stream, x, k, tids, [1500, v], DEV)
    m = on_dev(lambda: a_gpu.merge(b_gpu).finalize())
    assert torch.equal(m.ids.cpu(), c.ids)
    _close(m.lse, c.lse, torch.float32, "merged lse")
    _close(m.entropy, c.entropy, torch.float32, "merged entropy", atol=1e-4)
    _close(m.target_logprobs, c.target_logprobs, torch.float32, "merged targets")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_split_rows(dtype):
    x = make_logits(2, 70_000, dtype, seed=5)
    tids = torch.randint(0, 70_000, (2, 3))
    g = on_dev(lambda: _stream(x, 16, tids, [0, 33_333, 70_000], DEV).finalize())
    c = _stream(x, 16, tids, [0, 33_333, 70_000], "cpu").finalize()
    assert torch.equal(g.ids.cpu(), c.ids)
    _close(g.lse, c.lse, dtype, "lse")
    _close(g.target_logprobs, c.target_logprobs, dtype, "targets")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_linear_topk(dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(33, 64, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(1001, 64, generator=g, dtype=torch.float64).to(dtype)
    ids = torch.randint(0, 1001, (33, 3))
    rg = on_dev(linear_topk, to_dev(h), to_dev(w), 16, 1.0, chunk_size=300, ids=to_dev(ids))
    rc = linear_topk(h, w, 16, 1.0, chunk_size=300, ids=ids)
    # the matmul differs between devices, so values may differ in the last bits: compare values, and ids where
    # the top-k values are well separated
    _close(rg.lse, rc.lse, dtype, "lse", rtol=2e-2, atol=2e-2)
    _close(rg.target_logprobs, rc.target_logprobs, dtype, "targets", rtol=2e-2, atol=2e-2)
    if dtype == torch.float64:
        assert torch.equal(rg.ids.cpu(), rc.ids)


# ---- fused LM-head top-k, tiled kernels (head_epilogue.cuh) ----------------------------------------------------
# Integer-valued hidden and weight make every product exact in float32 whatever the summation order, so the
# tiled kernels (float32 accumulators in registers) must give the CPU's top-k on the float32 logits exactly,
# ties to the lower id included. On a GPU without Hopper only the SIMT mainloop runs; on Hopper both.
TILED = ["simt"] + (["sm90"] if MODE == "cuda" and torch.cuda.is_available()
                    and torch.cuda.get_device_capability()[0] == 9 else [])


def _head(n, v, h, dtype, seed, *, ints=True):
    g = torch.Generator().manual_seed(seed)
    if ints:
        hid, w = torch.randint(-3, 4, (n, h), generator=g), torch.randint(-3, 4, (v, h), generator=g)
    else:
        hid, w = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    return hid.to(dtype), w.to(dtype)


@pytest.mark.parametrize("kernel", TILED)
@given(n=st.sampled_from([1, 5, 127, 128, 129, 300]), v=st.sampled_from([1, 3, 127, 128, 1000, 5003]),
       h=st.sampled_from([8, 16, 24, 64]), k=st.integers(1, 32), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       temperature=st.sampled_from([1.0, 0.7]), seed=st.integers(0, 2**31))
def test_property_linear_topk_tiled(kernel, n, v, h, k, dtype, temperature, seed):
    k = min(k, v)
    hid, w = _head(n, v, h, dtype, seed)
    r = on_dev(linear_topk, to_dev(hid), to_dev(w), k, temperature, kernel=kernel)
    c = topk_logprobs(hid.float() @ w.float().T, k, temperature)
    assert torch.equal(r.ids.cpu(), c.ids), "top-k ids (order and ties) differ from the CPU"
    _close(r.logprobs, c.logprobs, torch.float32, "logprobs")
    _close(r.lse, c.lse, torch.float32, "lse")
    _close(r.entropy, c.entropy, torch.float32, "entropy", atol=1e-4)
    assert r.target_logprobs.shape == (n, 0)


@pytest.mark.parametrize("kernel", TILED)
def test_linear_topk_tiled_real_values(kernel):
    """Random normal inputs (the rounding of float32 sums decides near-ties): values against float64."""
    hid, w = _head(70, 3000, 64, torch.bfloat16, 5, ints=False)
    r = on_dev(linear_topk, to_dev(hid), to_dev(w), 16, 1.0, kernel=kernel)
    x = hid.double() @ w.double().T
    rid, rlp, rlse, rent = (t.float() if t.is_floating_point() else t for t in ref.topk_logprobs(x, 16, 1.0))
    _close(r.lse, rlse, torch.float32, "lse", rtol=1e-5, atol=1e-5)
    _close(r.entropy, rent, torch.float32, "entropy", rtol=1e-4, atol=1e-4)
    _close(r.logprobs, rlp, torch.float32, "logprobs", rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.gather(1, r.ids.cpu()), x.gather(1, rid), rtol=0, atol=1e-4)  # same values


@pytest.mark.parametrize("kernel", TILED)
def test_linear_topk_tiled_float32_and_stream_agree(kernel):
    if kernel == "sm90":
        pytest.skip("float32 inputs: simt only")
    hid, w = _head(40, 2000, 32, torch.float32, 6)
    r = on_dev(linear_topk, to_dev(hid), to_dev(w), 8, 1.0, kernel=kernel)
    s = on_dev(linear_topk, to_dev(hid), to_dev(w), 8, 1.0)
    assert torch.equal(r.ids.cpu(), s.ids.cpu())
    _close(r.logprobs, s.logprobs, torch.float32, "logprobs")


@pytest.mark.parametrize("kernel", TILED)
def test_linear_topk_tiled_nonfinite_names_row(kernel):
    hid, w = _head(300, 1000, 16, torch.bfloat16, 7)
    hid[201, 3] = float("nan")
    hid[250, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"NaN or \+inf \(row 201\)"), device_ops():
        linear_topk(to_dev(hid), to_dev(w), 4, kernel=kernel)


def test_linear_topk_tiled_errors():
    hid, w = _head(4, 50, 16, torch.bfloat16, 8)
    d = to_dev
    cases = [
        (lambda: linear_topk(d(hid), d(w), 33, kernel="simt"), RuntimeError, "k must be in"),
        (lambda: linear_topk(d(hid), d(w[:20]), 21, kernel="simt"), RuntimeError, "k must be in"),
        (lambda: linear_topk(d(hid), d(w[:, :8]), 4, kernel="simt"), RuntimeError, "hidden size mismatch"),
        (lambda: linear_topk(d(hid), d(w.half()), 4, kernel="simt"), RuntimeError, "must share a dtype"),
        (lambda: linear_topk(d(hid.double()), d(w.double()), 4, kernel="simt"), RuntimeError, "bfloat16 or float16"),
        (lambda: linear_topk(d(hid[:0]), d(w), 4, kernel="simt"), RuntimeError, "empty batch"),
        (lambda: linear_topk(d(hid), d(w), 4, 0.0, kernel="simt"), RuntimeError, "temperature"),
        (lambda: linear_topk(d(hid), d(w), 4, kernel="simt", ids=d(torch.zeros(4, 1, dtype=torch.long))),
         ValueError, "takes no ids"),
        (lambda: linear_topk(d(hid), d(w), 4, kernel="tiles"), ValueError, "kernel must be one of"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg), device_ops():
            fn()
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        linear_topk(hid, w, 4, kernel="sm90")  # outside device_ops: the CPU build's namespace


# ---- error paths: the CPU's message (first bad row) -------------------------------------------------------------


def _same_error(fn, *tensors):
    msgs = []
    for on_device in (True, False):
        with pytest.raises(RuntimeError) as e, (device_ops() if on_device else contextlib.nullcontext()):
            fn(*[to_dev(t) if on_device else t.clone() for t in tensors])
        msgs.append(str(e.value).splitlines()[0])
    assert msgs[0] == msgs[1], msgs


@pytest.mark.parametrize("dtype", DTYPES)
def test_errors_match_cpu(dtype):
    x = make_logits(8, 300, dtype, seed=1)
    bad = x.clone()
    bad[5, 17] = float("nan")
    bad[3, 200] = float("inf")
    _same_error(lambda t: topk_logprobs(t, 4), bad)
    allneg = x.clone()
    allneg[6] = float("-inf")
    allneg[7, 3] = float("nan")
    _same_error(lambda t: topk_logprobs(t, 4), allneg)
    ids = torch.randint(0, 300, (8, 3))
    ids[4, 1] = 300
    ids[6, 0] = -1
    _same_error(lambda t, i: logprobs_at(t, i), x, ids)
    # several splits per row
    big = make_logits(2, 60_000, dtype, seed=2)
    big[1, 45_000] = float("nan")
    _same_error(lambda t: topk_logprobs(t, 4), big)


def test_stream_errors_match_cpu():
    x = make_logits(4, 100, torch.float32, seed=2)
    tids = torch.tensor([[1], [2], [3], [150]])
    # heap not full: k larger than the columns streamed
    _same_error(lambda t, i: _stream(t, 64, i, [0, 50], t.device.type).finalize(), x, tids)
    # target 150 never streamed
    _same_error(lambda t, i: _stream(t, 4, i, [0, 100], t.device.type).finalize(), x, tids)
    bad = x.clone()
    bad[2, 7] = float("nan")
    _same_error(lambda t, i: _stream(t, 4, i, [0, 100], t.device.type), bad, tids)


def test_stream_update_nonfinite_names_row():
    x = make_logits(3, 200, torch.float32, seed=3)
    st = StreamState(3, 4, dtype=torch.float32, device=DEV)
    on_dev(st.update, to_dev(x[:, :100]), 0)
    bad = x[:, 100:].clone()
    bad[1, 5] = float("nan")
    with pytest.raises(RuntimeError, match=r"NaN or \+inf \(row 1\)"), device_ops():
        st.update(to_dev(bad), 100)


def test_cuda_errors_name_arguments():
    x = torch.randn(4, 50, device=DEV)
    with pytest.raises(RuntimeError, match="k must be in"), device_ops():
        topk_logprobs(x, 51)
    if DEV == "cuda":
        with pytest.raises(RuntimeError, match="is on"):
            logprobs_at(x, torch.zeros(4, 1, dtype=torch.long))  # ids left on the CPU
    with pytest.raises(RuntimeError, match="temperature"), device_ops():
        topk_logprobs(x, 3, 0.0)


# ---- OPD loss ------------------------------------------------------------------------------------------------


def make_set(n, v, K, *, seed=0, dup=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(v, generator=g)[:K] for _ in range(n)])
    if dup and K > 2:
        ids[:, -1] = ids[:, 0]  # a duplicate id (union layout marks it invalid)
    tq = -torch.rand(n, K, generator=g, dtype=torch.float64) * 8 - 0.1
    valid = torch.rand(n, K, generator=g) > 0.2
    valid[:, 0] = True
    if dup and K > 2:
        valid[:, -1] = False
    return ids, tq, valid


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", WEIGHT_MODES)
@pytest.mark.parametrize("clip", [0.0, 5.0])
def test_loss_forward_backward(dtype, mode, clip):
    n, v, K = 11, 1037, 9
    x = make_logits(n, v, dtype, seed=7, neg_inf_frac=0.02)
    ids, tq, valid = make_set(n, v, K, seed=3)
    # ids must have finite student logits
    x = x.scatter(1, ids, torch.randn(n, K, dtype=torch.float64).to(dtype))
    if clip:
        tq[2, 1] = float("-inf")  # accepted with clipping
        valid[2, 1] = True

    def run(device):
        xs = x.to(device, copy=True).requires_grad_(True)
        out = opd_topk_loss(xs, ids.to(device), tq.to(device), valid.to(device), weight_mode=mode,
                            temperature=0.9, log_ratio_clip=clip)
        w = torch.linspace(0.5, 1.5, n, dtype=out.loss.dtype, device=device)
        (out.loss * w).sum().backward()
        return out, xs.grad

    (og, gg), (oc, gc) = on_dev(run, DEV), run("cpu")
    _close(og.loss, oc.loss, dtype, "loss", rtol=1e-4, atol=1e-5)
    _close(og.rewards, oc.rewards, dtype, "rewards", rtol=1e-4, atol=1e-5)
    _close(og.student_logprobs, oc.student_logprobs, dtype, "student_logprobs")
    _close(og.lse, oc.lse, dtype, "lse")
    lp_tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else (
        dict(rtol=1e-4, atol=F32_GRAD_ATOL) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-4))
    _close(gg.float(), gc.float(), dtype, "grad", **lp_tol)
    rl, rr = ref.opd_topk_loss(x.cpu(), ids, tq, valid, mode, 0.9, clip)
    _close(og.loss.double(), rl.double(), torch.float32, "loss vs reference", rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_split_rows(dtype):
    n, v, K = 2, 60_001, 16
    x = make_logits(n, v, dtype, seed=8, neg_inf_frac=0.0)
    ids, tq, valid = make_set(n, v, K, seed=4)
    (og, oc) = both(lambda t, i, q, m: opd_topk_loss(t, i, q, m), x, ids, tq, valid)
    _close(og.loss, oc.loss, dtype, "loss", rtol=1e-4, atol=1e-5)
    _close(og.student_logprobs, oc.student_logprobs, dtype, "student_logprobs")


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_backward_chunk_inplace(dtype):
    """The in-place chunk backward (grad aliases the logits), with an odd chunk width and offset."""
    n, v, K = 5, 997, 7
    x = make_logits(n, v, dtype, seed=9, neg_inf_frac=0.0)
    ids, tq, valid = make_set(n, v, K, seed=5)
    x = x.scatter(1, ids, torch.randn(n, K, dtype=torch.float64).to(dtype))  # finite student logits on the set
    out = opd_topk_loss(x, ids, tq, valid)
    g = torch.rand(n, dtype=out.lse.dtype)
    for off, width in [(0, 333), (333, 1), (334, 663)]:
        res = []
        for on_device in (True, False):
            dev = DEV if on_device else "cpu"
            work = torch.empty(n, 672, dtype=dtype, device=dev)  # padded rows, like iter_head_chunks
            chunk = work[:, :width]
            chunk.copy_(x[:, off:off + width].to(dev))
            with device_ops() if on_device else contextlib.nullcontext():
                ops().opd_topk_loss_bwd_chunk_(chunk, off, g.to(dev), out.lse.to(dev), ids.to(dev),
                                               out.rewards.to(dev), 1.0)
            res.append(chunk.float().cpu())
        _close(res[0], res[1], dtype, f"chunk {off}",
               **_stored(dtype, 1e-10 if dtype == torch.float64 else 1e-4, 1e-12 if dtype == torch.float64 else F32_GRAD_ATOL))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["student_p", "none"])
def test_loss_linear_gradients(dtype, mode):
    n, H, v, K = 17, 32, 1003, 6
    gen = torch.Generator().manual_seed(1)
    h = (torch.randn(n, H, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    w = (torch.randn(v, H, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    ids, tq, valid = make_set(n, v, K, seed=6)

    def run(device):
        hs, ws = h.to(device, copy=True).requires_grad_(True), w.to(device, copy=True).requires_grad_(True)
        out = opd_topk_loss_linear(hs, ws, ids.to(device), tq.to(device), valid.to(device), weight_mode=mode,
                                   chunk_size=257)
        out.loss.sum().backward()
        return out.loss, hs.grad, ws.grad

    (lg, hg, wg), (lc, hc, wc) = on_dev(run, DEV), run("cpu")
    tol = dict(rtol=1e-8, atol=1e-10) if dtype == torch.float64 else (
        dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2))
    _close(lg.float(), lc.float(), dtype, "loss", **tol)
    _close(hg.float(), hc.float(), dtype, "grad hidden", **tol)
    _close(wg.float(), wc.float(), dtype, "grad weight", **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_loss_linear_weighted_and_renorm_linear(dtype):
    """The fused losses the trainer calls: gradient formed in the forward (row blocks), and renorm_kl on K rows."""
    n, H, v, K = 19, 24, 1501, 5
    gen = torch.Generator().manual_seed(2)
    h = (torch.randn(n, H, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    w = (torch.randn(v, H, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    ids, tq, valid = make_set(n, v, K, seed=9, dup=False)
    tw = torch.rand(n, dtype=torch.float64, generator=gen)

    def run(device):
        hs, ws = h.to(device, copy=True).requires_grad_(True), w.to(device, copy=True).requires_grad_(True)
        total, out = opd_topk_loss_linear_weighted(hs, ws, ids.to(device), tq.to(device), tw.to(device),
                                                   valid.to(device), max_block_elements=4 * v)  # 4-row blocks
        rkl = renorm_topk_kl_linear(hs, ws, ids.to(device), tq.to(device), valid.to(device), temperature=1.1)
        (total + (rkl * tw.to(device, rkl.dtype)).sum()).backward()
        return total, out.loss, hs.grad, ws.grad

    tol = dict(rtol=1e-8, atol=1e-10) if dtype == torch.float64 else (
        dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2))
    for name, a, b in zip(("total", "loss", "grad hidden", "grad weight"), on_dev(run, DEV), run("cpu")):
        _close(a.float(), b.float(), dtype, name, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ppo_losses(dtype):
    """The PPO surrogate of several updates per batch (log-probs at ids + the loss backward with its
    coefficients), unfused and fused with the LM head, on the device against the CPU."""
    from opdcore import reference
    from opdcore.ops import ppo_topk_loss, ppo_topk_loss_linear_weighted
    from test_ppo import _old_away_from_kinks

    n, H, v, K = 19, 24, 1501, 5
    gen = torch.Generator().manual_seed(3)
    h = (torch.randn(n, H, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    w = (torch.randn(v, H, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    ids, _, valid = make_set(n, v, K, seed=10, dup=False)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    old = _old_away_from_kinks(reference.logprobs_at((h @ w.T).double(), ids, 0.9)[0], 3, 0.2, 0.28, 3.0).to(acc)
    adv = torch.randn(n, K, generator=gen, dtype=torch.float64).to(acc)
    tw = torch.rand(n, dtype=torch.float64, generator=gen)

    def run(device):
        hs, ws = h.to(device, copy=True).requires_grad_(True), w.to(device, copy=True).requires_grad_(True)
        args = (ids.to(device), old.to(device), adv.to(device))
        opts = dict(temperature=0.9, clip_high=0.28)
        total, out = ppo_topk_loss_linear_weighted(hs, ws, *args, tw.to(device), valid.to(device),
                                                   max_block_elements=4 * v, **opts)  # 4-row blocks
        plain = ppo_topk_loss(hs @ ws.T, *args, valid.to(device), **opts)
        (total + (plain.loss * tw.to(device, plain.loss.dtype)).sum()).backward()
        return total, out.loss, out.coefficients, plain.loss, hs.grad, ws.grad

    tol = dict(rtol=1e-8, atol=1e-10) if dtype == torch.float64 else (
        dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2))
    names = ("total", "loss", "coefficients", "unfused loss", "grad hidden", "grad weight")
    for name, a, b in zip(names, on_dev(run, DEV), run("cpu")):
        _close(a.float(), b.float(), dtype, name, **tol)


@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", range(len(WEIGHT_MODES)))
def test_opd_rewards(acc, mode):
    n, K = 40, 12
    gen = torch.Generator().manual_seed(mode)
    slp = (-torch.rand(n, K, generator=gen, dtype=torch.float64) * 10).to(acc)
    tlp = (-torch.rand(n, K, generator=gen, dtype=torch.float64) * 10).to(acc)
    valid = torch.rand(n, K, generator=gen) > 0.3
    valid[5] = False  # an empty set
    for clip in (0.0, 2.0):
        (rg, lg), (rc, lc) = both(lambda s, t, v: ops().opd_rewards(s, t, v, mode, clip), slp, tlp, valid)
        _close(rg, rc, acc, "rewards", rtol=1e-5 if acc == torch.float32 else 1e-12)
        _close(lg, lc, acc, "loss", rtol=1e-5 if acc == torch.float32 else 1e-12)
    bad = slp.clone()
    bad[7, 3] = float("-inf")
    valid2 = valid.clone()
    valid2[7, 3] = True
    badt = tlp.clone()
    badt[3, 0] = float("nan")
    valid2[3, 0] = True
    _same_error(lambda s, t, v: ops().opd_rewards(s, t, v, mode, 0.0), bad, badt, valid2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_renorm_kl(dtype):
    n, v, K = 13, 500, 8
    x = make_logits(n, v, dtype, seed=12, neg_inf_frac=0.0)
    ids, tq, valid = make_set(n, v, K, seed=8, dup=False)
    valid[4] = False  # empty set: loss 0

    def run(device):
        xs = x.to(device, copy=True).requires_grad_(True)
        loss = renorm_topk_kl(xs, ids.to(device), tq.to(device), valid.to(device), temperature=1.2)
        loss.sum().backward()
        return loss, xs.grad

    (lg, gg), (lc, gc) = on_dev(run, DEV), run("cpu")
    _close(lg, lc, dtype, "loss", rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-6)
    _close(gg.float(), gc.float(), dtype, "grad", **_stored(dtype, 1e-4 if dtype != torch.float64 else 1e-10, 1e-5))
    badq = tq.clone()
    badq[2, 0] = float("nan")  # (+inf is refused earlier, in Python, as logits passed for log-probs)
    _same_error(lambda t, i, q, m: renorm_topk_kl(t, i, q, m), x, ids, badq, valid)


@pytest.mark.skipif(MODE != "cuda", reason="CUDA graphs")
def test_ops_under_no_sync_capture():
    """Inside CUDA graph capture the glue skips the status check (no host sync): the op must still capture."""
    x = torch.randn(64, 4096, device=DEV)
    topk_logprobs(x, 16)  # warm-up (workspace, allocator) outside the graph
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph, stream=s):
            out = topk_logprobs(x, 16)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.ids.cpu(), topk_logprobs(x.cpu(), 16).ids)


def _unchecked(fn, bad, good):
    """fn(*bad) on the device with the status check skipped, as under CUDA graph capture: on a GPU it is captured
    (after a warm-up on `good`, which must pass) and replayed; in the emulator OPDCORE_EMU_UNCHECKED=1 stands in."""
    bad = [to_dev(t) for t in bad]
    if MODE == "emu":
        os.environ["OPDCORE_EMU_UNCHECKED"] = "1"
        try:
            return on_dev(fn, *bad)
        finally:
            del os.environ["OPDCORE_EMU_UNCHECKED"]
    fn(*[to_dev(t) for t in good])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        out = fn(*bad)
    graph.replay()
    torch.cuda.synchronize()
    return out


def _rows_nan(t, bad_rows, what):
    t = t.cpu()
    for r in range(t.shape[0]):
        assert bool(t[r].isnan().all()) == (r in bad_rows), f"{what}: row {r}: {t[r]}"


@pytest.mark.skipif(MODE == "cpu", reason="needs the CUDA glue (GPU or emulator)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unchecked_bad_rows_read_nan(dtype):
    """With the status check skipped (graph capture) a bad row's outputs are NaN, never stale memory, and the
    other rows are unchanged; a chunk rejected by a streaming update poisons the row's state for good."""
    n, v, K = 6, 3000, 5
    ids, tq, valid = make_set(n, v, K, seed=2, dup=False)
    x = make_logits(n, v, dtype, seed=4, neg_inf_frac=0.0)
    x = x.scatter(1, ids, torch.randn(n, K, dtype=torch.float64).to(dtype))  # finite student logits on the set
    bad = x.clone()
    bad[1, 7] = float("nan")
    bad[4, :] = float("-inf")
    ref = topk_logprobs(x, 8)
    out = _unchecked(lambda t: topk_logprobs(t, 8), [bad], [x])
    _rows_nan(out.lse, {1, 4}, "topk lse")
    assert (out.ids.cpu()[[1, 4]] == -1).all()
    assert torch.equal(out.ids.cpu()[[0, 2, 3, 5]], ref.ids[[0, 2, 3, 5]])
    lse = _unchecked(lambda t, i: logprobs_at(t, i)[1], [bad, ids], [x, ids])
    _rows_nan(lse, {1, 4}, "logprobs_at lse")

    loss = _unchecked(lambda t, i, q, m: opd_topk_loss(t, i, q, m).loss, [bad, ids, tq, valid], [x, ids, tq, valid])
    _rows_nan(loss, {1, 4}, "loss")
    _close(loss.cpu()[[0, 2, 3, 5]], opd_topk_loss(x, ids, tq, valid).loss[[0, 2, 3, 5]], dtype, "good rows")
    badq = tq.clone()
    badq[3, 0] = float("nan")
    valid2 = valid.clone()
    valid2[3, 0] = True
    loss = _unchecked(lambda t, i, q, m: opd_topk_loss(t, i, q, m).loss, [x, ids, badq, valid2], [x, ids, tq, valid2])
    _rows_nan(loss, {3}, "loss (bad teacher log-prob)")
    loss = _unchecked(lambda t, i, q, m: renorm_topk_kl(t, i, q, m), [x, ids, badq, valid2], [x, ids, tq, valid2])
    _rows_nan(loss, {3}, "renorm_kl")
    loss = _unchecked(lambda s_, t: dense_divergence(s_, t, "jsd"), [x, bad], [x, x])
    _rows_nan(loss, {1, 4}, "dense jsd")

    def stream(*chunks):  # chunk 1 (row 1 holds a NaN) rejected, then more chunks, a merge, finalize
        a = StreamState(n, 4, dtype=torch.float32, device=chunks[0].device)
        a.update(chunks[0], 0).update(chunks[1], 1000)
        b = StreamState(n, 4, dtype=torch.float32, device=chunks[0].device).update(chunks[2], 2000)
        return b.merge(a).finalize().lse

    parts = [bad[:, :1000], bad[:, 1000:2000], bad[:, 2000:]]
    parts[0][4] = x[4, :1000]  # only row 1 is bad here
    lse = _unchecked(stream, [p.contiguous() for p in parts], [x[:, :1000], x[:, 1000:2000], x[:, 2000:]])
    _rows_nan(lse, {1}, "streamed lse")


def test_combinations_smoke():
    """A quick sweep of shapes around the vector width and the block size."""
    for dtype, v, k in itertools.product([torch.float32, torch.bfloat16], [8, 9, 15, 16, 17, 255, 256, 257], [1, 8]):
        if k > v:
            continue
        x = make_logits(3, v, dtype, seed=v)
        g, c = both(lambda t: topk_logprobs(t, k), x)
        assert torch.equal(g.ids.cpu(), c.ids), (dtype, v, k)
        _close(g.lse, c.lse, dtype, f"lse {dtype} {v}")


# ---- property tests: random shapes, dtypes, layouts, -inf, ties (device against CPU) ----------------------------

# Row lengths around the vector width and block size, and long rows that take the split-row path (few rows).
_widths = st.one_of(st.integers(1, 300), st.integers(300, 5000), st.integers(16_384, 40_000))


def _layout(x, layout):
    """x on the device side in a given memory layout (the same values)."""
    if layout == "offset":  # rows start off the 16-byte boundary
        return to_dev(torch.cat([x[:, :1], x], 1))[:, 1:]
    if layout == "col_strided":
        return to_dev(x.t().contiguous()).t()
    return to_dev(x)


@given(n=st.integers(1, 6), v=_widths, k=st.integers(0, 130), dtype=st.sampled_from(DTYPES),
       temperature=st.sampled_from([1.0, 0.6, 2.5]), layout=st.sampled_from(["contig", "offset", "col_strided"]),
       neg_inf=st.sampled_from([0.0, 0.3]), ties=st.booleans(), m=st.integers(0, 4), seed=st.integers(0, 2**31))
def test_property_topk_and_targets(n, v, k, dtype, temperature, layout, neg_inf, ties, m, seed):
    assume(layout != "col_strided" or v <= 5000)
    k = min(max(k, 1), v)
    x = make_logits(n, v, dtype, seed=seed, neg_inf_frac=neg_inf, ties=ties)
    xd = _layout(x, layout)
    g, c = on_dev(topk_logprobs, xd, k, temperature), topk_logprobs(x, k, temperature)
    assert torch.equal(g.ids.cpu(), c.ids), "top-k ids differ from the CPU"
    _close(g.logprobs, c.logprobs, dtype, "logprobs")
    _close(g.lse, c.lse, dtype, "lse")
    _close(g.entropy, c.entropy, dtype, "entropy", atol=1e-4 if dtype != torch.float64 else 1e-10)
    if m:
        ids = torch.randint(0, v, (n, m), generator=torch.Generator().manual_seed(seed))
        (glp, glse), (clp, clse) = on_dev(logprobs_at, xd, to_dev(ids), temperature), logprobs_at(x, ids, temperature)
        _close(glp, clp, dtype, "logprobs_at")


@given(n=st.integers(1, 5), v=st.one_of(st.integers(2, 3000), st.integers(16_384, 30_000)), k=st.integers(0, 140),
       n_chunks=st.integers(1, 6), dtype=st.sampled_from(DTYPES), m=st.integers(0, 4), seed=st.integers(0, 2**31))
def test_property_stream_chunks(n, v, k, n_chunks, dtype, m, seed):
    """Random chunk boundaries fed in a random order, half of them merged in from a second state."""
    k = min(k, v)
    gen = torch.Generator().manual_seed(seed)
    x = make_logits(n, v, dtype, seed=seed)
    tids = torch.randint(0, v, (n, m), generator=gen)
    cuts = sorted(set([0, v] + torch.randint(0, v + 1, (n_chunks - 1,), generator=gen).tolist()))
    order = torch.randperm(len(cuts) - 1, generator=gen).tolist()

    def run(device):
        half = max(1, len(order) // 2)
        a = _stream(x, k, tids, cuts, device, 0.9, order[:half])
        if len(order) > half:
            a.merge(_stream(x, k, tids, cuts, device, 0.9, order[half:]))
        return a.finalize()

    g, c = on_dev(run, DEV), run("cpu")
    assert torch.equal(g.ids.cpu(), c.ids)
    _close(g.logprobs, c.logprobs, dtype, "logprobs")
    _close(g.lse, c.lse, dtype, "lse")
    _close(g.entropy, c.entropy, dtype, "entropy", atol=1e-4 if dtype != torch.float64 else 1e-10)
    _close(g.target_logprobs, c.target_logprobs, dtype, "target_logprobs")


@given(n=st.integers(1, 6), v=st.one_of(st.integers(4, 2000), st.integers(16_384, 25_000)), K=st.integers(1, 20),
       dtype=st.sampled_from(DTYPES), mode=st.sampled_from(WEIGHT_MODES), clip=st.sampled_from([0.0, 3.0]),
       temperature=st.sampled_from([1.0, 0.8]), seed=st.integers(0, 2**31))
def test_property_loss(n, v, K, dtype, mode, clip, temperature, seed):
    K = min(K, v)
    x = make_logits(n, v, dtype, seed=seed, neg_inf_frac=0.02)
    ids, tq, valid = make_set(n, v, K, seed=seed, dup=K > 2)
    x = x.scatter(1, ids, torch.randn(n, K, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype))

    def run(device):
        xs = x.to(device, copy=True).requires_grad_(True)
        out = opd_topk_loss(xs, ids.to(device), tq.to(device), valid.to(device), weight_mode=mode,
                            temperature=temperature, log_ratio_clip=clip)
        out.loss.sum().backward()
        return out, xs.grad

    (og, gg), (oc, gc) = on_dev(run, DEV), run("cpu")
    _close(og.loss, oc.loss, dtype, "loss", rtol=1e-4, atol=1e-5)
    _close(og.rewards, oc.rewards, dtype, "rewards", rtol=1e-4, atol=1e-5)
    _close(og.student_logprobs, oc.student_logprobs, dtype, "student_logprobs")
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else (
        dict(rtol=1e-4, atol=F32_GRAD_ATOL) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-4))
    _close(gg.float(), gc.float(), dtype, "grad", **tol)


# ---- packed sequences: pad / unpad ------------------------------------------------------------------------------

_PACK_DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool, torch.uint8,
                torch.complex128]


@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=9), extra=st.integers(0, 3),
       tail=st.sampled_from([(), (1,), (3,), (16,), (2, 5)]), dtype=st.sampled_from(_PACK_DTYPES),
       offset=st.booleans(), seed=st.integers(0, 2**31))
@example(lengths=[4, 0, 2], extra=1, tail=(16,), dtype=torch.float32, offset=True, seed=0)  # 64-byte rows, 4-byte offset
@example(lengths=[5, 3], extra=0, tail=(2, 5), dtype=torch.bfloat16, offset=True, seed=1)
def test_property_pad_unpad(lengths, extra, tail, dtype, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    n = int(cu[-1])
    row = int(torch.tensor(tail).prod()) if tail else 1
    flat = torch.randint(0, 100, (n * row + 1,), generator=gen)
    flat = (flat > 50) if dtype == torch.bool else flat.to(dtype)
    # offset: a view that starts one element in, so the wide copy units must fall back to narrower ones
    def view(t):
        return t[int(offset):int(offset) + n * row].view(n, *tail)

    packed, packed_dev = view(flat), view(to_dev(flat))
    T = max(lengths) + extra
    pad_value = 0.0 if dtype == torch.bool else 7.0
    g, c = on_dev(to_padded, packed_dev, to_dev(cu), T, pad_value), to_padded(packed, cu, T, pad_value)
    assert torch.equal(g.cpu(), c)
    padded_dev = to_dev(c)
    if offset and c.numel():  # the padded input one element off alignment too
        padded_dev = to_dev(torch.cat([c.flatten()[:1], c.flatten()]))[1:].view(c.shape)
    back = on_dev(from_padded, padded_dev, to_dev(cu))
    assert torch.equal(back.cpu(), packed)


def test_pad_unpad_autograd_and_errors():
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    x = torch.randn(7, 4, dtype=torch.float64)

    def run():
        xs = to_dev(x).requires_grad_(True)
        y = to_padded(xs, to_dev(cu), 5)
        (y * torch.arange(20, dtype=y.dtype, device=y.device).view(1, 5, 4)).sum().backward()
        return y, xs.grad

    (yg, gg), (yc, gc) = on_dev(run), run()
    assert torch.equal(yg.cpu(), yc) and torch.equal(gg.cpu(), gc)
    _same_error(lambda p, c: ops().pad_packed(p, c, 3), x, cu)  # max_seqlen shorter than a sequence
    _same_error(lambda p, c: ops().pad_packed(p, c, 5), x, torch.tensor([0, 4, 3, 7], dtype=torch.int32))
    _same_error(lambda p, c: ops().unpad_packed(p, c), torch.zeros(2, 5, 4), cu)


# ---- dense divergences -------------------------------------------------------------------------------------------


@given(n=st.integers(1, 6), v=st.one_of(st.integers(1, 600), st.integers(4000, 9000)), dtype=st.sampled_from(DTYPES),
       kind=st.sampled_from(DIVERGENCES), beta=st.sampled_from([0.2, 0.5]), temperature=st.sampled_from([1.0, 0.7]),
       masked=st.booleans(), layout=st.sampled_from(["contig", "offset", "col_strided"]),
       t_layout=st.sampled_from(["same", "contig"]), seed=st.integers(0, 2**31))
def test_property_dense_divergence(n, v, dtype, kind, beta, temperature, masked, layout, t_layout, seed):
    s = make_logits(n, v, dtype, seed=seed, neg_inf_frac=0.1 if masked else 0.0, ties=False)
    t = make_logits(n, v, dtype, seed=seed + 1, neg_inf_frac=0.0, ties=False)
    t = t.masked_fill(torch.isinf(s), float("-inf"))  # a shared vocabulary mask

    def run(ss, tt):
        xs = ss.detach().requires_grad_(True)
        loss = dense_divergence(xs, tt, kind, beta=beta, temperature=temperature)
        (loss * torch.linspace(0.5, 1.5, n, dtype=loss.dtype, device=loss.device)).sum().backward()
        return loss, xs.grad

    # t_layout "contig" with an offset student: the rows sit at different 16-byte offsets (the scalar path)
    t_dev = _layout(t, layout if t_layout == "same" else "contig")
    (lg, gg), (lc, gc) = on_dev(run, _layout(s, layout), t_dev), run(s.clone(), t.clone())
    _close(lg, lc, dtype, "loss", rtol=1e-4 if dtype != torch.float64 else 1e-10, atol=1e-5)
    # float32: the GPU's exp is a few ulp off, so a near-zero gradient (p = q) differs by ~1e-5 of the weight
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else (
        dict(rtol=1e-3, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4))
    _close(gg.float(), gc.float(), dtype, "grad", **tol)


def test_dense_divergence_errors_match_cpu():
    s = make_logits(5, 300, torch.float32, seed=1, ties=False)
    t = make_logits(5, 300, torch.float32, seed=2, ties=False)
    bad = s.clone()
    bad[3, 7] = float("nan")
    _same_error(lambda a, b: dense_divergence(a, b, "jsd"), bad, t)
    _same_error(lambda a, b: dense_divergence(a, b, "forward_kl"), s, bad)
    allneg = t.clone()
    allneg[4] = float("-inf")
    _same_error(lambda a, b: dense_divergence(a, b), s, allneg)
    _same_error(lambda a, b: dense_divergence(a, b), s, t[:, :299])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_divergence_known_normalisers(dtype):
    """The vocabulary-parallel building block: a column range's share of the sums under given log-sum-exps."""
    s = make_logits(5, 3001, dtype, seed=4, ties=False)
    t = make_logits(5, 3001, dtype, seed=5, ties=False)
    _, ls, lt, _ = ops().dense_divergence_fwd(s, t, 2, 0.3, 1.0)  # CPU normalisers for both sides
    for kind in range(3):
        g, c = both(lambda a, b, x, y: ops().dense_divergence_fwd(a[:, 7:2000], b[:, 7:2000], kind, 0.3, 1.0, x, y),
                    s, t, ls, lt)
        _close(g[0], c[0], dtype, f"share of the loss ({kind})", rtol=1e-4, atol=1e-5)
        _close(g[3], c[3], dtype, f"share of aux ({kind})", rtol=1e-4, atol=1e-5)
