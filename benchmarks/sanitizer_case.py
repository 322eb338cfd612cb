"""Every CUDA op once on small inputs, for compute-sanitizer (memcheck / racecheck / synccheck).

Covers: the one-block and several-blocks-per-row paths, k = 0 / small / large tier / > kMaxTopK, unaligned and
strided rows, bf16 / fp32 / fp64, the streaming state, the loss forward + backward (also in place), renorm_kl,
the dense divergences, pad / unpad of packed sequences (aligned and unaligned), and an error path (the status word).
"""
import torch

import opdcore
from opdcore.ops import StreamState, linear_topk, logprobs_at, opd_topk_loss, opd_topk_loss_linear
from opdcore.ops import dense_divergence, renorm_topk_kl, topk_logprobs
from opdcore.packing import from_padded, to_padded

assert torch.cuda.is_available() and opdcore.build_info()["cuda_compiled"]
torch.manual_seed(0)
for dt in (torch.bfloat16, torch.float32, torch.float64):
    for n, v in ((5, 1037), (2, 40_000)):
        x = (torch.randn(n, v + 1, device="cuda") * 3).to(dt)[:, 1:]  # unaligned rows
        for k in (1, 16, 100, 150):
            topk_logprobs(x, k)
        topk_logprobs(x.t().contiguous().t(), 8)  # strided columns
        ids = torch.randint(0, v, (n, 6), device="cuda")
        logprobs_at(x, ids)
        st = StreamState(n, 16, ids, dtype=torch.float64 if dt == torch.float64 else torch.float32, device="cuda")
        st.update(x[:, : v // 2], 0).update(x[:, v // 2:], v // 2)
        st.finalize()
        xr = x.detach().clone().requires_grad_(True)
        out = opd_topk_loss(xr, ids, -torch.rand(n, 6, device="cuda"), None)
        out.loss.sum().backward()
        renorm_topk_kl(xr, ids, -torch.rand(n, 6, device="cuda")).sum().backward()
    h = torch.randn(7, 32, device="cuda").to(dt).requires_grad_(True)
    w = torch.randn(999, 32, device="cuda").to(dt).requires_grad_(True)
    linear_topk(h.detach(), w.detach(), 16, chunk_size=300)
    ids = torch.randint(0, 999, (7, 4), device="cuda")
    opd_topk_loss_linear(h, w, ids, -torch.rand(7, 4, device="cuda"), chunk_size=300).loss.sum().backward()
# The tiled fused-head kernels: SIMT everywhere, CUTLASS's sm_90a one on Hopper (row and column tails, 3 splits).
tiled = ["simt"] + (["sm90"] if opdcore.build_info().get("cutlass_sm90")
                    and torch.cuda.get_device_capability()[0] == 9 else [])
for kernel in tiled:
    h = torch.randn(130, 64, device="cuda").to(torch.bfloat16)
    w = torch.randn(700, 64, device="cuda").to(torch.bfloat16)
    linear_topk(h, w, 16, kernel=kernel)
for dt in (torch.bfloat16, torch.float32, torch.float64):
    s_ = (torch.randn(5, 5001, device="cuda") * 2).to(dt)[:, 1:].requires_grad_(True)  # unaligned rows
    t_ = (torch.randn(5, 5001, device="cuda") * 2).to(dt)[:, 1:]
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        dense_divergence(s_, t_, kind, beta=0.3).sum().backward()
cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32, device="cuda")
for dt in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
    flat = torch.randint(0, 2, (10 * 5 + 1,), device="cuda").to(dt)
    for packed in (flat[:50].view(10, 5), flat[1:].view(10, 5), flat[:10]):  # aligned, unaligned, one per row
        padded = to_padded(packed, cu, 8)
        assert torch.equal(from_padded(padded, cu), packed)
bad = torch.randn(3, 100, device="cuda")
bad[1, 5] = float("nan")
try:
    topk_logprobs(bad, 4)
    raise SystemExit("expected an error")
except RuntimeError as e:
    assert "row 1" in str(e), e
torch.cuda.synchronize()
print("sanitizer case done")
