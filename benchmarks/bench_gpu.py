"""GPU benchmark: opdcore's CUDA kernels against plain PyTorch, printed as a table.

Cases (default N=8192 tokens, V=151936, k=16, bf16 logits):
  extract        top-k log-probs + lse + entropy + log-prob of a sampled token, from [N, V] logits
                 (PyTorch: log_softmax in float32 + topk + gather + entropy)
  extract_linear the same from hidden [N, H] and the LM head [V, H] (opdcore.linear_topk streams the vocabulary in
                 chunks; on Hopper also kernel="sm90", CUTLASS's wgmma GEMM with the top-k epilogue in registers;
                 PyTorch materialises the logits)
  loss_fwd_bwd   top-k OPD loss forward + backward to the logits (PyTorch: the reference formula through autograd)
  dense_div      dense JSD(0.5) between student and teacher logits, forward + backward (PyTorch: TRL's GKD
                 generalized_jsd_loss formula through autograd)
  pad / unpad    packed [N, k] float32 payloads <-> padded [B, T, k] (64 sequences of 1..2048 tokens; PyTorch:
                 index_put / advanced indexing with precomputed (sequence, position) indices)

Time: CUDA events around each call, warm-up first, median of the repeats. GB/s: the bytes a kernel must move
(logits read once per pass, gradient written once), against the device-to-device copy bandwidth measured in
the same run (bytes read + written by a large copy). Peak: torch.cuda.max_memory_allocated during the call,
minus what was allocated before it (the inputs).

  python benchmarks/bench_gpu.py [--n 8192] [--v 151936] [--k 16] [--h 4096] [--dtype bf16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

import opdcore
from opdcore.ops import dense_divergence, linear_topk, opd_topk_loss, topk_logprobs
from opdcore.packing import from_padded, to_padded

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fn, warmup=3, reps=10):
    """Median milliseconds over reps (CUDA events) and the peak extra memory (bytes) of one call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return statistics.median(times), peak


def copy_bandwidth():
    """GB/s of a large device-to-device copy, counting bytes read and written."""
    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms, _ = timed(lambda: dst.copy_(src), warmup=3, reps=20)
    del src, dst
    return 2 * n / (ms * 1e-3) / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--h", type=int, default=4096)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--skip-linear", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    assert torch.cuda.is_available() and opdcore.build_info()["cuda_compiled"], "needs a GPU and a CUDA build"
    dt, N, V, k, H = DTYPES[args.dtype], args.n, args.v, args.k, args.h
    esize = torch.finfo(dt).bits // 8
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    torch.manual_seed(0)
    logits = (torch.randn(N, V, device="cuda") * 3).to(dt)
    sampled = torch.randint(0, V, (N, 1), device="cuda")
    rows = []

    def add(case, impl, ms, peak, nbytes, note=""):
        gbs = nbytes / (ms * 1e-3) / 1e9 if nbytes else float("nan")
        rows.append(dict(case=case, impl=impl, ms=ms, gbs=gbs, frac=gbs / bw if nbytes else float("nan"),
                         peak_mib=peak / 2**20, note=note))

    # ---- extraction --------------------------------------------------------------------------------------------
    def ours_extract():
        r = topk_logprobs(logits, k)
        lp = r.logprobs  # noqa: F841
        return opdcore.logprobs_at(logits, sampled)

    def ours_extract_only():
        return topk_logprobs(logits, k)

    def torch_extract():
        lp = torch.log_softmax(logits.float(), dim=-1)
        vals, ids = lp.topk(k, dim=-1)
        ent = -(lp.exp() * lp).sum(-1)
        return vals, ids, lp.gather(1, sampled), ent

    ms, peak = timed(ours_extract_only, reps=args.reps)
    add("extract", "opdcore topk_logprobs", ms, peak, N * V * esize, "top-k + lse + entropy, one pass")
    ms, peak = timed(ours_extract, reps=args.reps)
    add("extract", "opdcore topk + logprobs_at", ms, peak, 2 * N * V * esize, "two passes")
    ms, peak = timed(torch_extract, reps=args.reps)
    add("extract", "torch log_softmax+topk+gather", ms, peak, N * V * esize)

    # ---- loss forward + backward -------------------------------------------------------------------------------
    ids = topk_logprobs(logits, k).ids
    tq = -torch.rand(N, k, device="cuda") * 5
    valid = torch.ones(N, k, dtype=torch.bool, device="cuda")
    x = logits.detach().clone().requires_grad_(True)

    def ours_loss():
        x.grad = None
        opd_topk_loss(x, ids, tq, valid).loss.sum().backward()

    def torch_loss():
        x.grad = None
        lp = torch.log_softmax(x.float(), dim=-1)
        slp = lp.gather(1, ids)
        w = torch.softmax(slp.detach(), dim=-1)
        r = -w * (slp.detach() - tq)
        (-(r * slp).sum(-1)).sum().backward()

    ms, peak = timed(ours_loss, reps=args.reps)
    add("loss_fwd_bwd", "opdcore opd_topk_loss", ms, peak, 3 * N * V * esize, "fwd read + bwd read/write")
    ms, peak = timed(torch_loss, reps=args.reps)
    add("loss_fwd_bwd", "torch autograd", ms, peak, 3 * N * V * esize)
    del x

    # ---- dense divergence (JSD) forward + backward ---------------------------------------------------------------
    teacher = (torch.randn(N, V, device="cuda") * 3).to(dt)
    xs = logits.detach().clone().requires_grad_(True)

    def ours_dense():
        xs.grad = None
        dense_divergence(xs, teacher, "jsd", beta=0.5).sum().backward()

    def torch_dense():  # TRL's generalized_jsd_loss, per token
        xs.grad = None
        lp, lq = torch.log_softmax(xs.float(), -1), torch.log_softmax(teacher.float(), -1)
        lm = torch.logsumexp(torch.stack([lp + math.log(0.5), lq + math.log(0.5)]), dim=0)
        kl_t = torch.nn.functional.kl_div(lm, lq, reduction="none", log_target=True)
        kl_s = torch.nn.functional.kl_div(lm, lp, reduction="none", log_target=True)
        (0.5 * kl_t + 0.5 * kl_s).sum().backward()

    for name, fn in (("opdcore dense_divergence", ours_dense), ("torch (TRL GKD formula)", torch_dense)):
        try:
            ms, peak = timed(fn, reps=args.reps)
            add("dense_div", name, ms, peak, 7 * N * V * esize, "jsd fwd (2 passes over s, t) + bwd")
        except torch.cuda.OutOfMemoryError:
            add("dense_div", name, float("nan"), 0, 0, "out of memory")
            torch.cuda.empty_cache()
    del teacher, xs

    # ---- packed sequences: pad / unpad ---------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 2049, (64,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32).cuda()
    T, n_tok = int(lengths.max()), int(lengths.sum())
    seq = torch.repeat_interleave(torch.arange(64), lengths).cuda()
    pos = (torch.arange(n_tok) - torch.repeat_interleave(cu[:-1].long().cpu(), lengths)).cuda()
    payload = torch.randn(n_tok, k, device="cuda")
    padded = to_padded(payload, cu, T)

    def torch_pad():
        out = payload.new_zeros((64, T, k))
        out[seq, pos] = payload
        return out

    moved_pad = (n_tok + 64 * T) * k * 4  # read the packed rows, write every padded row
    for case, name, fn, nbytes in (("pad", "opdcore to_padded", lambda: to_padded(payload, cu, T), moved_pad),
                                   ("pad", "torch zeros + index_put", torch_pad, moved_pad),
                                   ("unpad", "opdcore from_padded", lambda: from_padded(padded, cu), 2 * n_tok * k * 4),
                                   ("unpad", "torch advanced indexing", lambda: padded[seq, pos], 2 * n_tok * k * 4)):
        ms, peak = timed(fn, reps=args.reps)
        add(case, name, ms, peak, nbytes, f"N={n_tok} B=64 T={T}")
    del payload, padded

    # ---- fused with the LM head --------------------------------------------------------------------------------
    if not args.skip_linear:
        del logits
        torch.cuda.empty_cache()
        hidden = (torch.randn(N, H, device="cuda") / H**0.5).to(dt)
        weight = torch.randn(V, H, device="cuda").to(dt)
        flops = 2 * N * H * V

        def ours_linear():
            return linear_topk(hidden, weight, k, ids=sampled)

        def torch_linear():
            lg = hidden @ weight.T
            lp = torch.log_softmax(lg.float(), dim=-1)
            vals, ids_ = lp.topk(k, dim=-1)
            return vals, ids_, lp.gather(1, sampled)

        def matmul_only():
            return hidden @ weight.T

        cases = [("opdcore linear_topk", ours_linear), ("torch matmul+log_softmax+topk", torch_linear),
                 ("(matmul alone)", matmul_only)]
        # The CUTLASS sm_90a tiled kernel (not the default until verified here): its agreement with the streamed
        # path on these inputs goes in the note; its rate against the bare matmul is the number item 4 asks for.
        sm90 = (opdcore.build_info().get("cutlass_sm90") and torch.cuda.get_device_capability()[0] == 9
                and dt in (torch.bfloat16, torch.float16) and k <= 32)
        if sm90:
            def ours_sm90():
                return linear_topk(hidden, weight, k, kernel="sm90")
            cases.insert(1, ("opdcore linear_topk sm90 (CUTLASS)", ours_sm90))
        timings = {}
        for name, fn in cases:
            ms, peak = timed(fn, reps=max(3, args.reps // 2))
            timings[name] = ms
            add("extract_linear", name, ms, peak, 0, f"{flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s")
        if sm90:
            a, b = ours_sm90(), linear_topk(hidden, weight, k)
            same = (a.ids == b.ids).float().mean().item()
            row = next(r for r in rows if r["impl"] == "opdcore linear_topk sm90 (CUTLASS)")
            row["note"] += (f"; {100 * timings['(matmul alone)'] / timings['opdcore linear_topk sm90 (CUTLASS)']:.0f}% "
                            f"of the matmul's rate; ids equal to the stream path's {100 * same:.2f}%, max |d lse| "
                            f"{(a.lse - b.lse).abs().max().item():.2e} (stream rounds logits to {args.dtype})")

    print(f"\ndevice: {dev}; copy bandwidth {bw:.0f} GB/s (read + write); N={N} V={V} k={k} H={H} {args.dtype}; "
          f"opdcore {opdcore.build_info()['version']}, torch {torch.__version__}")
    hdr = f"{'case':<15} {'implementation':<32} {'ms':>9} {'GB/s':>8} {'% copy':>7} {'peak MiB':>10}  note"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        gbs = f"{r['gbs']:.0f}" if r["gbs"] == r["gbs"] else "-"
        frac = f"{100 * r['frac']:.0f}%" if r["frac"] == r["frac"] else "-"
        print(f"{r['case']:<15} {r['impl']:<32} {r['ms']:>9.3f} {gbs:>8} {frac:>7} {r['peak_mib']:>10.0f}  {r['note']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, copy_gbs=bw, n=N, v=V, k=k, h=H, dtype=args.dtype, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
