"""opdcore kernels against the plain PyTorch way (and torch.compile of it), side by side in one run.

    python benchmarks/compare.py                     # N=4096, V in {32000, 151936}, k=16, fp32 and bf16
    python benchmarks/compare.py --quick             # small sizes, a few seconds
    python benchmarks/compare.py --peer-compile      # also time torch.compile'd PyTorch (slow to compile)

Prints a markdown table: median time and extra peak memory of each method, and ratios against PyTorch from
the same run. Thread count is fixed (--threads) because this machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import opdcore  # noqa: E402
from harness import median_seconds, peak_extra_mib  # noqa: E402


# ---- the plain PyTorch way -------------------------------------------------------------------------------------

def torch_extract(logits, k, temperature=1.0):
    """The plain way named in the issue: log_softmax + topk (values are the gathered log-probs)."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return torch.topk(lp, k, dim=-1)


def torch_extract_full(logits, k, temperature=1.0):
    """The same outputs as opdcore.topk_logprobs: also the log-sum-exp and the entropy."""
    y = logits.float() / temperature
    lp = torch.log_softmax(y, dim=-1)
    vals, ids = torch.topk(lp, k, dim=-1)
    lse = y[:, 0] - lp[:, 0]
    ent = -(lp.exp() * lp).sum(-1)
    return ids, vals, lse, ent


def torch_loss_fwd_bwd(logits, ids, tq, valid):
    """The loss through autograd: log_softmax, gather, stop-gradient rewards, backward."""
    x = logits.detach().requires_grad_(True)
    lp = torch.log_softmax(x.float(), dim=-1)
    slp = lp.gather(1, ids)
    with torch.no_grad():
        w = torch.softmax(slp.masked_fill(~valid, float("-inf")), -1)
        r = torch.where(valid, -w * (slp - tq), torch.zeros_like(slp))
    loss = -(r * slp).sum(-1).mean()
    loss.backward()
    return x.grad


def opdcore_loss_fwd_bwd(logits, ids, tq, valid):
    x = logits.detach().requires_grad_(True)
    opdcore.opd_topk_loss(x, ids, tq, valid).loss.mean().backward()
    return x.grad


def linear_then_torch(hidden, weight, k):
    return torch_extract(hidden @ weight.T, k)


def linear_then_opdcore(hidden, weight, k):
    return opdcore.topk_logprobs(hidden @ weight.T, k)


def fused_loss_fwd_bwd(hidden, weight, ids, tq, valid):
    h = hidden.detach().requires_grad_(True)
    opdcore.opd_topk_loss_linear(h, weight, ids, tq, valid).loss.mean().backward()
    return h.grad


def fused_weighted_loss_fwd_bwd(hidden, weight, ids, tq, valid):
    h = hidden.detach().requires_grad_(True)
    w = torch.full((h.shape[0],), 1.0 / h.shape[0])
    opdcore.ops.opd_topk_loss_linear_weighted(h, weight, ids, tq, w, valid)[0].backward()
    return h.grad


def unfused_loss_fwd_bwd(hidden, weight, ids, tq, valid):
    h = hidden.detach().requires_grad_(True)
    opdcore.opd_topk_loss(h @ weight.T, ids, tq, valid).loss.mean().backward()
    return h.grad


def torch_linear_loss_fwd_bwd(hidden, weight, ids, tq, valid):
    h = hidden.detach().requires_grad_(True)
    torch_loss_fwd_bwd_graph(h @ weight.T, ids, tq, valid).backward()
    return h.grad


def torch_loss_fwd_bwd_graph(logits, ids, tq, valid):
    lp = torch.log_softmax(logits.float(), dim=-1)
    slp = lp.gather(1, ids)
    with torch.no_grad():
        w = torch.softmax(slp.masked_fill(~valid, float("-inf")), -1)
        r = torch.where(valid, -w * (slp - tq), torch.zeros_like(slp))
    return -(r * slp).sum(-1).mean()


def _renorm_kl_graph(z, tq):
    """KL(pbar || qbar) over the set from its K logits [N, K], through autograd."""
    lpbar = torch.log_softmax(z.float(), -1)
    lqbar = torch.log_softmax(tq, -1)
    return (lpbar.exp() * (lpbar - lqbar)).sum(-1).mean()


def torch_linear_renorm_fwd_bwd(hidden, weight, ids, tq):
    """The plain way: full [N, V] logits, then gather the set."""
    h = hidden.detach().requires_grad_(True)
    _renorm_kl_graph((h @ weight.T).gather(1, ids), tq).backward()
    return h.grad


def torch_gathered_renorm_fwd_bwd(hidden, weight, ids, tq):
    """The K head rows of every token gathered at once ([N, K, H]), autograd."""
    h = hidden.detach().requires_grad_(True)
    _renorm_kl_graph(torch.bmm(weight[ids], h.unsqueeze(2)).squeeze(2), tq).backward()
    return h.grad


def opdcore_linear_renorm_fwd_bwd(hidden, weight, ids, tq):
    h = hidden.detach().requires_grad_(True)
    opdcore.ops.renorm_topk_kl_linear(h, weight, ids, tq).mean().backward()
    return h.grad


# ---- the run ---------------------------------------------------------------------------------------------------

def measure(name, fn, repeats):
    t = median_seconds(fn, repeats=repeats, warmup=1)
    mem = peak_extra_mib(fn)
    return {"method": name, "s": t, "mib": mem}


def rows_for(kind, cases, repeats):
    out = []
    base_t = base_m = None
    for name, fn in cases:
        r = measure(name, fn, repeats)
        if base_t is None:
            base_t, base_m = r["s"], r["mib"]
        r["speedup"] = base_t / r["s"]
        r["mem_ratio"] = base_m / r["mib"] if r["mib"] > 0 else float("inf")
        r["kind"] = kind
        out.append(r)
        print(f"  {kind:<22} {name:<34} {r['s'] * 1e3:9.1f} ms  {r['mib']:9.1f} MiB  "
              f"x{r['speedup']:.2f} faster  x{r['mem_ratio']:.1f} less memory", flush=True)
    return out


def run(args):
    torch.manual_seed(0)
    results = []
    compiled_extract = torch.compile(torch_extract_full) if args.peer_compile else None
    for V in args.vocab:
        for dtype in args.dtypes:
            dt = getattr(torch, dtype)
            N, k, H = args.tokens, args.k, args.hidden
            print(f"N={N} V={V} k={k} {dtype}", flush=True)
            logits = (torch.randn(N, V) * 3).to(dt)
            ids = opdcore.topk_logprobs(logits, k).ids
            tq = torch.log_softmax(torch.randn(N, k), -1) - 2.0
            valid = torch.ones(N, k, dtype=torch.bool)
            cfg = f"V={V} {dtype}"
            want = lambda group: args.groups is None or group in args.groups  # noqa: E731
            cases = [("torch log_softmax+topk", lambda: torch_extract(logits, k)),
                     ("torch, + lse + entropy", lambda: torch_extract_full(logits, k)),
                     ("opdcore.topk_logprobs", lambda: opdcore.topk_logprobs(logits, k))]
            if compiled_extract is not None:
                cases.append(("torch.compile(torch way)", lambda: compiled_extract(logits, k)))
            if want("extraction"):
                results += [dict(r, config=cfg) for r in rows_for("extraction", cases, args.repeats)]
            cases = [("torch autograd", lambda: torch_loss_fwd_bwd(logits, ids, tq, valid)),
                     ("opdcore.opd_topk_loss", lambda: opdcore_loss_fwd_bwd(logits, ids, tq, valid))]
            if want("loss"):
                results += [dict(r, config=cfg) for r in rows_for("loss fwd+bwd", cases, args.repeats)]
            del logits
            hidden = (torch.randn(N, H) / H**0.5).to(dt)
            weight = torch.randn(V, H).to(dt)
            cases = [("matmul + torch extraction", lambda: linear_then_torch(hidden, weight, k)),
                     ("matmul + opdcore.topk_logprobs", lambda: linear_then_opdcore(hidden, weight, k)),
                     ("opdcore.linear_topk (fused)", lambda: opdcore.linear_topk(hidden, weight, k))]
            if want("linear-extraction"):
                results += [dict(r, config=cfg) for r in rows_for("LM head + extraction", cases, args.repeats)]
            cases = [("matmul + torch autograd", lambda: torch_linear_loss_fwd_bwd(hidden, weight, ids, tq, valid)),
                     ("matmul + opdcore loss", lambda: unfused_loss_fwd_bwd(hidden, weight, ids, tq, valid)),
                     ("opdcore.opd_topk_loss_linear", lambda: fused_loss_fwd_bwd(hidden, weight, ids, tq, valid)),
                     ("opd_topk_loss_linear_weighted",
                      lambda: fused_weighted_loss_fwd_bwd(hidden, weight, ids, tq, valid))]
            if want("linear-loss"):
                results += [dict(r, config=cfg) for r in rows_for("LM head + loss fwd+bwd", cases, args.repeats)]
            # the exact renormalised top-k KL (the default run's loss) needs only the K set logits per token;
            # K = 2k: a union set
            uids = torch.cat([ids, torch.randint(0, V, ids.shape)], 1)
            utq = torch.log_softmax(torch.randn(uids.shape), -1) - 2.0
            cases = [("matmul + gather + autograd", lambda: torch_linear_renorm_fwd_bwd(hidden, weight, uids, utq)),
                     ("gather K head rows + autograd",
                      lambda: torch_gathered_renorm_fwd_bwd(hidden, weight, uids, utq)),
                     ("opdcore.renorm_topk_kl_linear",
                      lambda: opdcore_linear_renorm_fwd_bwd(hidden, weight, uids, utq))]
            if want("linear-renorm"):
                results += [dict(r, config=cfg) for r in rows_for("LM head + renorm_kl fwd+bwd", cases,
                                                                  args.repeats)]
    return results


def markdown(results, args):
    lines = [f"N={args.tokens}, k={args.k}, hidden={args.hidden}, threads={args.threads}, "
             f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, median of "
             f"{args.repeats} after 1 warm-up; extra = peak resident memory added by the call.", "",
             "| config | what | method | time (ms) | extra memory (MiB) | speed vs first | memory vs first |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['config']} | {r['kind']} | {r['method']} | {r['s'] * 1e3:.1f} | {r['mib']:.0f} | "
                     f"{r['speedup']:.2f}x | {r['mem_ratio']:.1f}x |")
    return "\n".join(lines)


GROUPS = ("extraction", "loss", "linear-extraction", "linear-loss", "linear-renorm")


def main():
    # Fixed mmap threshold: every sizeable tensor gets its own mapping and is returned to the OS when freed,
    # so the resident high-water mark measures each call alone (glibc otherwise recycles heap memory).
    # THP_MEM_ALLOC_ENABLE=1 is torch's own switch for transparent huge pages on large CPU tensors: on this VM a
    # 4 KiB page fault costs ~1.5 us, which otherwise dominates every fresh [N, V] allocation (both sides gain).
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
        os.execv(sys.executable, [sys.executable] + sys.argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024, help="hidden size for the LM-head cases")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peer-compile", action="store_true", help="also time torch.compile of the PyTorch way")
    p.add_argument("--quick", action="store_true", help="N=512, V=32000 only")
    p.add_argument("--groups", nargs="+", choices=GROUPS, help="only these groups (default: all)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.vocab, args.hidden = 512, [32000], 256
    torch.set_num_threads(args.threads)
    print(f"opdcore {opdcore.build_info()}")
    table = markdown(run(args), args)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
