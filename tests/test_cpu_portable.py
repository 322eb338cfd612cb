"""The CPU extraction kernel and the loss backward built twice, for a baseline x86-64 (the portable loops of
row_stream.h and opd_loss.cpp) and for this CPU (the AVX-512 passes of row_simd.h where it has AVX-512), agree with
themselves, the extension and the reference.
The extension is built for this CPU, so without this test the portable loops would go untested here."""
import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import opdcore
from opdcore import reference as ref
from helpers import ATOL, make_logits

ROOT = Path(__file__).resolve().parents[1]
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
pytestmark = pytest.mark.skipif(shutil.which("g++") is None or platform.machine() != "x86_64",
                                reason="needs g++ on x86_64")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("native")
    libs = {}
    for name, arch in (("portable", "x86-64-v2"), ("native", "native")):
        so = out / f"topk_{name}.so"
        subprocess.run(["g++", "-O2", "-fno-math-errno", f"-march={arch}", "-fopenmp", "-std=c++17", "-shared", "-fPIC",
                        f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc/cpu'}", str(ROOT / "tests/native/topk_capi.cpp"),
                        str(ROOT / "csrc/cpu/topk_stream.cpp"), str(ROOT / "csrc/cpu/opd_loss.cpp"), "-o",
                        str(so)], check=True, capture_output=True)
        lib = ctypes.CDLL(str(so))
        lib.opdcore_test_topk.restype = ctypes.c_int
        lib.opdcore_test_topk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_double,
                                          ctypes.c_int64] + [ctypes.c_void_p] * 4
        lib.opdcore_test_loss_backward.restype = None
        lib.opdcore_test_loss_backward.argtypes = ([ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                                    ctypes.c_double] + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
                                                   + [ctypes.c_void_p] * 2)
        libs[name] = lib
    return libs


def run(lib, x, k, temperature):
    n, v = x.shape
    ids = torch.empty(n, k, dtype=torch.int64)
    lp = torch.empty(n, k)
    lse, ent = torch.empty(n), torch.empty(n)
    code = lib.opdcore_test_topk(DTYPE_CODE[x.dtype], x.data_ptr(), n, v, temperature, k, ids.data_ptr(), lp.data_ptr(),
                                 lse.data_ptr(), ent.data_ptr())
    return code, (ids, lp, lse, ent)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5), v=st.integers(1, 5000), k=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), temperature=st.sampled_from([1.0, 0.7]),
       ties=st.booleans(), neg_inf=st.sampled_from([0.0, 0.5, 0.999]), seed=st.integers(0, 2**31))
def test_portable_and_native_builds_agree(builds, n, v, k, dtype, temperature, ties, neg_inf, seed):
    k = min(k, v)
    x = make_logits(n, v, dtype, seed, ties=ties, neg_inf_frac=neg_inf)
    want = ref.topk_logprobs(x, k, temperature)
    ext = opdcore.topk_logprobs(x, k, temperature)
    results = {name: run(lib, x, k, temperature) for name, lib in builds.items()}
    for name, (code, (ids, lp, lse, ent)) in results.items():
        assert code == 0, name
        assert torch.equal(ids, want[0]) and torch.equal(ids, ext.ids), name
        torch.testing.assert_close(lp, want[1].float(), atol=ATOL[dtype], rtol=1e-5)
        torch.testing.assert_close(lse, want[2].float(), atol=ATOL[dtype], rtol=1e-5)
        torch.testing.assert_close(ent, want[3].float(), atol=1e-4, rtol=1e-4)


def test_portable_build_reports_non_finite_rows(builds):
    x = torch.randn(3, 2000)
    x[1, 1500] = float("nan")
    for name, lib in builds.items():
        assert run(lib, x, 4, 1.0)[0] == 1, name  # Status::kNonFinite
        x[1, 1500] = float("inf")
        assert run(lib, x, 4, 1.0)[0] == 1, name
        x[1, 1500] = float("nan")


@pytest.mark.parametrize("k", [16, 17, 40])
def test_builds_agree_on_sorted_rows(builds, k):
    x = torch.stack([torch.arange(3000.0), torch.arange(3000.0).flip(0)]) / 64
    want = ref.topk_logprobs(x, k)
    for name, lib in builds.items():
        code, (ids, lp, _, _) = run(lib, x, k, 1.0)
        assert code == 0 and torch.equal(ids, want[0]), name


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), v=st.integers(1, 3000), K=st.integers(1, 8),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), temperature=st.sampled_from([1.0, 0.7]),
       neg_inf=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 2**31))
def test_loss_backward_builds_agree(builds, n, v, K, dtype, temperature, neg_inf, seed):
    """d loss / d logits = g/T (sum_q r_q p - sum_q r_q onehot(id_q)), repeated ids summed, against float64."""
    x = make_logits(n, v, dtype, seed, neg_inf_frac=neg_inf)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (n, K), generator=g)
    rewards = torch.randn(n, K, generator=g)
    grad_loss = torch.rand(n, generator=g) + 0.5
    lse = torch.logsumexp(x.float() / temperature, 1)
    coef = grad_loss.double() / temperature
    want = (coef * rewards.double().sum(1))[:, None] * torch.exp(x.double() / temperature - lse.double()[:, None])
    want.scatter_add_(1, ids, -coef[:, None] * rewards.double())
    ext = torch.ops.opdcore.opd_topk_loss_bwd(grad_loss, x, lse, ids, rewards, temperature)
    for name, lib in builds.items():
        grad = torch.empty_like(x)
        lib.opdcore_test_loss_backward(DTYPE_CODE[dtype], x.data_ptr(), n, v, temperature, lse.data_ptr(),
                                       ids.data_ptr(), rewards.data_ptr(), K, grad_loss.data_ptr(), grad.data_ptr())
        tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=1e-2)
        torch.testing.assert_close(grad.double(), want, **tol, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(grad, ext, **tol, msg=lambda m: f"{name} vs the extension: {m}")
        if dtype != torch.float32:  # the same float math on the same values, then rounded to nearest even
            wide, xf = torch.empty(n, v), x.float()  # xf held: a temporary's data_ptr would dangle
            lib.opdcore_test_loss_backward(0, xf.data_ptr(), n, v, temperature, lse.data_ptr(), ids.data_ptr(),
                                           rewards.data_ptr(), K, grad_loss.data_ptr(), wide.data_ptr())
            assert torch.equal(grad, wide.to(dtype)), f"{name}: the {dtype} gradient is not its float32 one rounded"

