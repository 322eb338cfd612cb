"""How the whole OPD step after the rollouts grows with response length, vocabulary and k: opdcore's trainer step
against the same step in plain PyTorch / transformers, on SmolLM2-135M-shaped models, seconds per phase and peak
resident memory.

    python benchmarks/bench_step_scaling.py [--threads 2] [--repeats 2] [--plot benchmarks/step_scaling.png]
    python benchmarks/bench_step_scaling.py --lengths 256 1024 --vocabs 49152 --ks 16   # one sweep point each

The step is the preset's (`--config smollm2`) after generation, which is the same `generate` for both ways:
  score   the teacher's no-grad forward on the batch
  update  the student's forward (bfloat16 autocast, reentrant gradient checkpointing), its top-k set, the
          renormalised top-k KL against the teacher's log-probs on that set, backward, gradient clip, AdamW
opdcore runs the trainer's own functions (`opdcore.trainer.step.score_teacher` and `update` with the student scored
in the update): the fused LM-head kernels, never [tokens, vocab] logits. Plain PyTorch is the obvious way with the
same backbone settings: full logits of both models, the teacher's float32 log-softmax kept for the update, the
student's top-k of its logits, `opdcore.reference.renorm_topk_kl`, autograd.

Models: the SmolLM2-135M architecture (30 layers, hidden 576, tied embeddings) with random weights and the swept
vocabulary; float32 student, bfloat16 teacher, as the preset. The batch is --batch responses of the swept length
after --prompt prompt tokens each, one micro-batch. Three sweeps around a base point (length 1024, V = 49152,
k = 16): length 256..4096, V 32000..151936, k 1..64. Each (point, way) runs in a fresh process: one warm-up step,
then --repeats timed steps, median seconds per phase; memory is the largest resident high-water mark of a phase
(models, AdamW state and the step together; `rss_setup` is the process before the first step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {"length": 1024, "vocab": 49152, "k": 16}
WAYS = ("opdcore", "torch")


def _models(vocab: int, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from opdcore.trainer.models import OPDModel

    def make(seed, dtype):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                          max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0)
        return LlamaForCausalLM(cfg).to(dtype)

    student_hf, teacher_hf = make(0, torch.float32), make(1, torch.bfloat16)
    teacher_hf.requires_grad_(False).eval()
    student_hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    student_hf.enable_input_require_grads()
    student_hf.train()
    return OPDModel(student_hf, vocab), OPDModel(teacher_hf, vocab)


def _batch(vocab: int, length: int, batch: int, prompt: int):
    import torch

    from opdcore.rollout import Rollout
    from opdcore.trainer import microbatch

    g = torch.Generator().manual_seed(2)
    rollouts = [Rollout(i, torch.randint(0, vocab, (prompt,), generator=g).tolist(),
                        torch.randint(0, vocab, (length,), generator=g).tolist(), None, False)
                for i in range(batch)]
    return microbatch.build(rollouts, batch * (prompt + length), torch.device("cpu"))[0]


def worker(way: str, length: int, vocab: int, k: int, args) -> dict:
    """One (point, way) in this process: warm-up + repeats steps; a JSON line of medians and peaks."""
    import torch

    from opdcore import reference
    from opdcore.config import load_config
    from opdcore.trainer import step as S
    from opdcore.trainer.memory import _hwm_kib, phase_peak

    torch.set_num_threads(args.threads)
    cfg = load_config(os.path.join(REPO, "python", "opdcore", "configs", "smollm2.yaml"), (f"loss.topk={k}",))
    student, teacher = _models(vocab, args.layers)
    params = [p for p in student.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    mb = _batch(vocab, length, args.batch, args.prompt)
    weights = S.token_weights([mb], {i: length for i in range(args.batch)}, S.objective_spec(cfg),
                              float(mb.num_tokens), float(args.batch), 1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    def opdcore_step(peaks, seconds):
        with phase_peak(peaks, "score"):
            t0 = time.perf_counter()
            with autocast:
                scored = [S.score_teacher(teacher, mb, cfg)]
            seconds["score"] = time.perf_counter() - t0
        with phase_peak(peaks, "update"):
            t0 = time.perf_counter()
            S.update(student, opt, [mb], [None], weights, cfg, params, None, teacher=teacher, scored=scored)
            opt.zero_grad(set_to_none=True)
            seconds["update"] = time.perf_counter() - t0

    def torch_step(peaks, seconds):
        rows = mb.pred_index

        def logits(model):
            return model.hf(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits.flatten(0, 1)[rows]

        with phase_peak(peaks, "score"):
            t0 = time.perf_counter()
            with torch.no_grad(), autocast:
                t_lp = torch.log_softmax(logits(teacher).float(), -1)
            seconds["score"] = time.perf_counter() - t0
        with phase_peak(peaks, "update"):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                s = logits(student).float()
            ids = s.detach().topk(k, -1).indices
            loss = (reference.renorm_topk_kl(s, ids, t_lp.gather(1, ids)) * weights[0]).sum()
            del t_lp
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds["update"] = time.perf_counter() - t0

    run = opdcore_step if way == "opdcore" else torch_step
    rss_setup = _hwm_kib() / 1024
    times, peaks = [], {}
    for i in range(1 + args.repeats):
        seconds = {}
        run(peaks if i else {}, seconds)
        if i:
            times.append(seconds)
    out = {"way": way, "length": length, "vocab": vocab, "k": k, "tokens": mb.num_tokens, "rss_setup": rss_setup}
    for phase in ("score", "update"):
        out[phase] = statistics.median(t[phase] for t in times)
        out[f"rss_{phase}"] = peaks[phase]
    out["step"] = out["score"] + out["update"]
    out["peak"] = max(peaks.values())
    return out


def points(args):
    """(sweep, length, vocab, k) of the three sweeps; the base point is measured once."""
    seen = set()
    for sweep, values in (("length", args.lengths), ("vocab", args.vocabs), ("k", args.ks)):
        for v in values:
            p = dict(BASE, **{sweep: v})
            key = (p["length"], p["vocab"], p["k"])
            yield sweep, key, key in seen
            seen.add(key)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [s for s in ("length", "vocab", "k") if any(r["sweep"] == s for r in rows)]
    fig, axes = plt.subplots(2, len(sweeps), figsize=(4.2 * len(sweeps), 6.5), squeeze=False)
    for j, sweep in enumerate(sweeps):
        for way, style in zip(WAYS, ("o-", "s--")):
            rs = sorted((r for r in rows if r["sweep"] == sweep and r["way"] == way), key=lambda r: r[sweep])
            xs = [r[sweep] for r in rs]
            axes[0][j].plot(xs, [r["step"] for r in rs], style, label=way)
            axes[1][j].plot(xs, [r["peak"] / 1024 for r in rs], style, label=way)
        for i, ylabel in enumerate(("seconds per step (score + update)", "peak resident GiB")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_xlabel({"length": "response length (tokens)", "vocab": "vocabulary", "k": "k"}[sweep])
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle("OPD step after the rollouts, SmolLM2-135M-shaped models: opdcore vs plain PyTorch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="responses per step")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per response")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32000, 49152, 65536, 151936])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    ap.add_argument("--plot", help="write the plot here (PNG)")
    ap.add_argument("--json", help="append each row here as a JSON line")
    ap.add_argument("--replot", metavar="JSONL", help="only plot the rows of an earlier --json file (with --plot)")
    ap.add_argument("--worker", nargs=4, metavar=("WAY", "LENGTH", "VOCAB", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        way, *nums = args.worker
        print(json.dumps(worker(way, *map(int, nums), args)))
        return
    if args.replot:
        plot([json.loads(line) for line in open(args.replot)], args.plot)
        return
    passed = ["--threads", str(args.threads), "--repeats", str(args.repeats), "--batch", str(args.batch),
              "--prompt", str(args.prompt), "--layers", str(args.layers)]
    rows, done = [], {}
    print(f"OPD step after the rollouts: {args.batch} x ({args.prompt} + length) tokens, {args.layers} layers, "
          f"{args.threads} threads, median of {args.repeats} after a warm-up\n")
    print("| sweep | length | V | k | opdcore s | torch s | opdcore / torch time | opdcore MiB | torch MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for sweep, (length, vocab, k), repeat in points(args):
        res = {}
        for way in args.ways:
            if not repeat:
                cmd = [sys.executable, __file__, "--worker", way, str(length), str(vocab), str(k), *passed]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{way} at length={length} V={vocab} k={k} failed:\n{out.stderr[-3000:]}")
                done[(way, length, vocab, k)] = json.loads(out.stdout.strip().splitlines()[-1])
            res[way] = dict(done[(way, length, vocab, k)], sweep=sweep)
            rows.append(res[way])
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(res[way]) + "\n")
        a, b = res.get("opdcore"), res.get("torch")
        cell = lambda r, key, fmt: fmt.format(r[key]) if r else "-"  # noqa: E731
        ratio = f"{a['step'] / b['step']:.2f}x" if a and b else "-"
        print(f"| {sweep} | {length} | {vocab} | {k} | {cell(a, 'step', '{:.2f}')} | {cell(b, 'step', '{:.2f}')} | "
              f"{ratio} | {cell(a, 'peak', '{:.0f}')} | {cell(b, 'peak', '{:.0f}')} |", flush=True)
    if args.plot:
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
