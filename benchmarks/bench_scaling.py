"""How the student's loss step grows with response tokens N, vocabulary V and set size k: opdcore's fused LM-head
top-k loss against the plain PyTorch way, forward + backward, median seconds and peak extra memory.

    python benchmarks/bench_scaling.py [--threads 2] [--hidden 896] [--repeats 3] [--plot benchmarks/scaling.png]
    python benchmarks/bench_scaling.py --dtype bfloat16 --n-values 256 1024 4096 8192 16384   # 16-bit, long

The step is what the update does after the model's backbone: hidden states [N, H] (float32, requiring grad) and
the LM head [V, H] -> the reward-weighted top-k loss on the student's top-k set with given teacher log-probs ->
backward to both. opdcore: `opdcore.ops.opd_topk_loss_linear_weighted` (the head streamed in row blocks, the
gradient formed in the forward, never [N, V]); plain PyTorch: logits = hidden @ W.T, log_softmax, gather, the
same loss through autograd. Three sweeps around a base point (N = 1024, V = 65536, k = 16): N in 256..4096,
V in 32000..151936, k in 1..64. A plain-PyTorch point that would need more than --max-gib of logits is skipped.
Memory is each step's peak extra resident memory measured in a fresh process (the step's inputs are already
allocated there; the weight gradient [V, H] counts). --dtype bfloat16 makes hidden states and head bfloat16 (the
trainer's autocast head; plain PyTorch takes the log-softmax in float32, as is usual).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import median_seconds, peak_extra_mib  # noqa: E402

import opdcore  # noqa: E402


DTYPE = torch.float32  # --dtype


def _inputs(n, v, h, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(DTYPE).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.05).to(DTYPE).requires_grad_()
    # k distinct ids per row without [n, V] of temporaries: a random start, then k ids V // k apart
    ids = (torch.randint(0, v, (n, 1), generator=g) + torch.arange(k) * (v // k)) % v
    tq = torch.randn(n, k, generator=g).log_softmax(1) - 1.0
    return hidden, weight, ids, tq, torch.full((n,), 1.0 / n)


def _opdcore(hidden, weight, ids, tq, w):
    total, _ = opdcore.ops.opd_topk_loss_linear_weighted(hidden, weight, ids, tq, w)
    total.backward()


def _plain(hidden, weight, ids, tq, w):
    lp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    slp = lp.gather(1, ids)
    with torch.no_grad():
        r = -torch.softmax(slp, -1) * (slp - tq)  # student_p weights, r = -w (log p - log q)
    (-(r * slp).sum(1) * w).sum().backward()


METHODS = {"opdcore": _opdcore, "torch": _plain}


def _step(name, args):
    def step():
        METHODS[name](*args)
        args[0].grad = args[1].grad = None
    return step


def _peak_in_fresh_process(name, n, v, h, k, threads) -> float:
    """Peak extra resident memory of one step, in a process of its own: in a long-lived one the step reuses heap
    an earlier step freed and the high-water mark misses it."""
    out = subprocess.run([sys.executable, __file__, "--memory-point", name, str(n), str(v), str(h), str(k),
                          "--threads", str(threads), "--dtype", str(DTYPE).split(".")[1]],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure(n, v, h, k, repeats, max_gib, threads):
    args = _inputs(n, v, h, k)
    row = {"N": n, "V": v, "k": k}
    for name in METHODS:
        if name == "torch" and 3 * n * v * 4 > max_gib * 2**30:  # logits, log-softmax and their gradient (fp32)
            row[f"{name}_s"] = row[f"{name}_mib"] = float("nan")
            continue
        row[f"{name}_s"] = median_seconds(_step(name, args), repeats=repeats, warmup=1)
        row[f"{name}_mib"] = _peak_in_fresh_process(name, n, v, h, k, threads)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-gib", type=float, default=8.0, help="skip plain-PyTorch points above this many GiB")
    p.add_argument("--plot", default=None, help="write a PNG of the three sweeps here")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--n-values", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096], help="the N sweep")
    p.add_argument("--sweeps", nargs="+", choices=("N", "V", "k"), default=["N", "V", "k"])
    p.add_argument("--memory-point", nargs=5, default=None, metavar=("METHOD", "N", "V", "H", "K"),
                   help=argparse.SUPPRESS)  # internal: one step's peak extra MiB, in this fresh process
    args = p.parse_args()
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    if args.memory_point:
        name, n, v, h, k = args.memory_point[0], *map(int, args.memory_point[1:])
        inputs = _inputs(n, v, h, k)
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # no freed heap for the step to reuse unseen
        print(peak_extra_mib(_step(name, inputs)))
        return
    base = dict(N=1024, V=65536, k=16)
    sweeps = {"N": args.n_values, "V": [32000, 65536, 151936], "k": [1, 4, 16, 64]}
    sweeps = {axis: sweeps[axis] for axis in args.sweeps}
    rows = {}
    for axis, values in sweeps.items():
        rows[axis] = []
        for x in values:
            pt = dict(base, **{axis: x})
            r = measure(pt["N"], pt["V"], args.hidden, pt["k"], args.repeats, args.max_gib, args.threads)
            rows[axis].append(r)
            print(f"  {axis}={x}: opdcore {r['opdcore_s']:.3f} s {r['opdcore_mib']:.0f} MiB, torch "
                  f"{r['torch_s']:.3f} s {r['torch_mib']:.0f} MiB", flush=True)
    print(f"\nfused top-k loss fwd+bwd, H={args.hidden}, {args.dtype}, {args.threads} threads, median of "
          f"{args.repeats} after 1 warm-up\n")
    print("| sweep | N | V | k | opdcore s | torch s | opdcore / torch time | opdcore MiB | torch MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for axis, rs in rows.items():
        for r in rs:
            print(f"| {axis} | {r['N']} | {r['V']} | {r['k']} | {r['opdcore_s']:.3f} | {r['torch_s']:.3f} | "
                  f"{r['opdcore_s'] / r['torch_s']:.2f}x | {r['opdcore_mib']:.0f} | {r['torch_mib']:.0f} |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, len(rows), figsize=(4.4 * len(rows), 7), squeeze=False)
        for col, (axis, rs) in enumerate(rows.items()):
            xs = [r[axis] for r in rs]
            for row_i, (unit, label) in enumerate((("s", "seconds"), ("mib", "peak extra MiB"))):
                ax = axes[row_i][col]
                for name in ("opdcore", "torch"):
                    ax.plot(xs, [r[f"{name}_{unit}"] for r in rs], marker="o",
                            label="opdcore fused" if name == "opdcore" else "plain PyTorch")
                ax.set_xscale("log", base=2)
                ax.set_xlabel(axis)
                ax.set_ylabel(label)
                ax.grid(alpha=0.3)
                if row_i == 0 and col == 0:
                    ax.legend()
        fig.suptitle(f"top-k OPD loss fwd+bwd through the LM head (H={args.hidden}, {args.dtype}, {args.threads} "
                     "threads)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
