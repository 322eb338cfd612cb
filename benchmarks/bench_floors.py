"""How far opdcore's CPU kernels are from their floors, measured in the same run.

    python benchmarks/bench_floors.py                  # N=4096, V in {32000, 151936}, fp32 and bf16, 2 threads
    python benchmarks/bench_floors.py --quick          # N=512, V=32000

- extraction (`opdcore.topk_logprobs`, k=16, with log-sum-exp and entropy) against the read bound: reading the
  logits' bytes once with the same threads (an int32 max over them, memory-bound), and against the exp floor: one
  exp and one sum per logit (`torch.exp(x).sum` is slower than opdcore, so the floor is the kernel's own exp
  pass, approximated by `torch.logsumexp` over the same logits: shown for reference, not as the bound).
- the fused LM head + top-k loss with the gradient formed in the forward (`opd_topk_loss_linear_weighted`,
  weight trained as the trainer's tied head is) against the bare GEMMs it needs: logits = hidden @ weight.T,
  d hidden = G @ weight, d weight = G.T @ hidden, each one torch.matmul over all N rows and V columns at once
  (preallocated outputs, the input dtype; [N, V] logits held, so GEMMs at their most efficient shapes), and with
  the weight frozen (two GEMMs). The fused loss never holds [N, V]: it works on row blocks of 2^24 logits.

Prints a markdown table (median of --repeats, timed in turns after a warm-up; ratios are same-run).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import opdcore


def interleaved(fns, repeats):
    """Median seconds of each fn, timed in turns (a, b, a, b, ...) after one warm-up each, so a slow spell of
    the shared machine hits every method alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def read_once(x):
    return x.reshape(-1).view(torch.int32).max()


def extraction_rows(N, V, dt, k, repeats):
    x = (torch.randn(N, V) * 3).to(dt)
    t_read, t_ext, t_lse = interleaved([lambda: read_once(x), lambda: opdcore.topk_logprobs(x, k),
                                        lambda: torch.logsumexp(x.float() if dt != torch.float32 else x, -1)], repeats)
    gbs = x.numel() * x.element_size() / t_read / 1e9
    return [("extraction", "read the logits once (bound)", t_read, f"{gbs:.0f} GB/s"),
            ("extraction", "torch.logsumexp (reference)", t_lse, ""),
            ("extraction", f"opdcore.topk_logprobs k={k}", t_ext, f"{t_ext / t_read:.2f}x the bound")]


def fused_rows(N, V, H, dt, k, repeats, train_weight):
    hidden = (torch.randn(N, H) / H**0.5).to(dt).requires_grad_(True)
    weight = (torch.randn(V, H) * 0.02).to(dt).requires_grad_(train_weight)
    ids = torch.randint(0, V, (N, k))
    tq = torch.log_softmax(torch.randn(N, k), -1) - 2.0
    tw = torch.full((N,), 1.0 / N)
    z = torch.empty(N, V, dtype=dt)  # the floor holds all logits at once: GEMMs at their best shapes
    gh = torch.empty(N, H, dtype=dt)
    gw = torch.empty(V, H, dtype=dt)

    def gemms():
        with torch.no_grad():
            torch.matmul(hidden, weight.T, out=z)
            torch.matmul(z, weight, out=gh)
            if train_weight:
                torch.matmul(z.T, hidden, out=gw)

    def fused():
        hidden.grad = weight.grad = None
        total = opdcore.ops.opd_topk_loss_linear_weighted(hidden, weight, ids, tq, tw)[0]
        total.backward()

    t_g, t_f = interleaved([gemms, fused], repeats)
    what = "LM head + loss, weight trained" if train_weight else "LM head + loss, weight frozen"
    n = 3 if train_weight else 2
    return [(what, f"{n} bare GEMMs (floor)", t_g, ""),
            (what, "opd_topk_loss_linear_weighted", t_f, f"{t_f / t_g:.2f}x the GEMMs")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--groups", nargs="+", default=["extraction", "fused"], choices=["extraction", "fused"])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.vocab, args.repeats = 512, [32000], 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [f"N={args.tokens}, H={args.hidden}, k={args.k}, threads={args.threads}, median of {args.repeats} "
             "after a warm-up", "", "| config | what | method | time (ms) | vs floor |", "|---|---|---|---:|---|"]
    for V in args.vocab:
        for name in args.dtypes:
            dt = getattr(torch, name)
            rows = []
            if "extraction" in args.groups:
                rows += extraction_rows(args.tokens, V, dt, args.k, args.repeats)
            if "fused" in args.groups:
                for train in (True, False):
                    rows += fused_rows(args.tokens, V, args.hidden, dt, args.k, args.repeats, train)
            for what, method, t, note in rows:
                line = f"| V={V} {name} | {what} | {method} | {t * 1e3:.1f} | {note} |"
                print(line, flush=True)
                lines.append(line)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
