"""pytest-benchmark suite for the kernels (not part of the test run):

    .venv/bin/python -m pytest benchmarks/test_bench_kernels.py --benchmark-only

Each group times opdcore against the plain PyTorch way on the same inputs; compare within a group.
"""
import pytest
import torch

import opdcore

N, V, K, H = 1024, 32000, 16, 512


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def case(request):
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, request.param)
    logits = (torch.randn(N, V, generator=g) * 3).to(dt)
    ids = opdcore.topk_logprobs(logits, K).ids
    tq = torch.log_softmax(torch.randn(N, K, generator=g), -1) - 2
    hidden = (torch.randn(N, H, generator=g) / H**0.5).to(dt)
    weight = torch.randn(V, H, generator=g).to(dt)
    return dict(logits=logits, ids=ids, tq=tq, hidden=hidden, weight=weight)


@pytest.mark.benchmark(group="extract")
def test_extract_torch(benchmark, case):
    benchmark(lambda: torch.topk(torch.log_softmax(case["logits"].float(), -1), K))


@pytest.mark.benchmark(group="extract")
def test_extract_opdcore(benchmark, case):
    benchmark(lambda: opdcore.topk_logprobs(case["logits"], K))


def _torch_loss(x, ids, tq):
    x = x.detach().requires_grad_(True)
    slp = torch.log_softmax(x.float(), -1).gather(1, ids)
    with torch.no_grad():
        r = -torch.softmax(slp, -1) * (slp - tq)
    (-(r * slp).sum(-1).mean()).backward()


def _opd_loss(x, ids, tq):
    x = x.detach().requires_grad_(True)
    opdcore.opd_topk_loss(x, ids, tq).loss.mean().backward()


@pytest.mark.benchmark(group="loss")
def test_loss_torch(benchmark, case):
    benchmark(lambda: _torch_loss(case["logits"], case["ids"], case["tq"]))


@pytest.mark.benchmark(group="loss")
def test_loss_opdcore(benchmark, case):
    benchmark(lambda: _opd_loss(case["logits"], case["ids"], case["tq"]))


@pytest.mark.benchmark(group="linear")
def test_linear_matmul_then_extract(benchmark, case):
    benchmark(lambda: opdcore.topk_logprobs(case["hidden"] @ case["weight"].T, K))


@pytest.mark.benchmark(group="linear")
def test_linear_fused(benchmark, case):
    benchmark(lambda: opdcore.linear_topk(case["hidden"], case["weight"], K))
