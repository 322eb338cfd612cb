"""Dense divergences (forward + backward to the student logits) against the PyTorch way, side by side in one run.

PyTorch: log_softmax of both logits in float32, then TRL's GKD formulas through autograd (kl_div with
log_target; the JSD's mixture by logsumexp). opdcore: dense_divergence, streamed over the vocabulary.

    python benchmarks/bench_dense.py [--tokens 1024] [--vocab 32000 151936] [--dtypes float32 bfloat16]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import opdcore  # noqa: E402
from harness import median_seconds, peak_extra_mib  # noqa: E402


def torch_divergence(s, t, kind, beta=0.5):
    lp, lq = torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)
    if kind == "reverse_kl":
        return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)  # KL(p || q)
    lm = torch.logsumexp(torch.stack([lp + math.log(1 - beta), lq + math.log(beta)]), dim=0)
    return (beta * F.kl_div(lm, lq, reduction="none", log_target=True)
            + (1 - beta) * F.kl_div(lm, lp, reduction="none", log_target=True)).sum(-1)


def fwd_bwd(fn, s, t, kind):
    x = s.detach().requires_grad_(True)
    fn(x, t, kind).sum().backward()
    return x.grad


def main():
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # see compare.py: per-call peak memory, THP on both sides
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
        os.execv(sys.executable, [sys.executable] + sys.argv)
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"N={args.tokens}, threads={args.threads}, median of {args.repeats} after a warm-up; extra = peak "
          "resident memory added by the call\n")
    print("| config | divergence | method | time (ms) | extra memory (MiB) | speed vs torch | memory vs torch |")
    print("|---|---|---|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for V in args.vocab:
        for dtype in args.dtypes:
            dt = getattr(torch, dtype)
            s = (torch.randn(args.tokens, V, generator=g) * 3).to(dt)
            t = (torch.randn(args.tokens, V, generator=g) * 3).to(dt)
            for kind in ("reverse_kl", "jsd"):
                rows = []
                for name, fn in (("torch (TRL GKD formula)", torch_divergence),
                                 ("opdcore.dense_divergence", lambda a, b, c: opdcore.dense_divergence(a, b, c))):
                    sec = median_seconds(lambda: fwd_bwd(fn, s, t, kind), repeats=args.repeats, warmup=1)
                    rows.append((name, sec, peak_extra_mib(lambda: fwd_bwd(fn, s, t, kind))))
                for name, sec, mib in rows:
                    print(f"| V={V} {dtype} | {kind} | {name} | {sec * 1e3:.1f} | {mib:.0f} | "
                          f"{rows[0][1] / sec:.2f}x | {rows[0][2] / max(mib, 1e-9):.1f}x |", flush=True)
            del s, t


if __name__ == "__main__":
    main()
