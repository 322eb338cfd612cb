"""Several updates per rollout batch (PPO-clipped surrogates) against one update, on the embedded default task.

    python benchmarks/bench_ppo_updates.py [--steps 200] [--parallel 2] [--out runs/ppo_updates]

Each variant is a full `examples/train.py` run of the synthetic preset (same models, prompts and seeds) with the
overrides below, `--parallel` of them at a time, one thread each. Prints held-out greedy accuracy at every eval,
the wall time and the clip statistics as a table, and plots accuracy against training step and against wall time
(ppo_updates.png): more optimizer steps per batch reuse each rollout, so the question is accuracy per rollout
and per second.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "examples", "train.py")

VARIANTS = {  # name -> overrides of the synthetic preset
    "sampled-token, 1 update": {"loss.topk": 0, "loss.renorm_kl": False},
    "sampled-token, 4 mini-batches": {"loss.topk": 0, "loss.renorm_kl": False, "train.mini_batches": 4},
    "sampled-token, 2 epochs x 2 mini-batches": {"loss.topk": 0, "loss.renorm_kl": False, "train.update_epochs": 2,
                                                 "train.mini_batches": 2},
    "top-16 student_p, 1 update": {"loss.renorm_kl": False},
    "top-16 student_p, 4 mini-batches": {"loss.renorm_kl": False, "train.mini_batches": 4},
    "renorm_kl (default), 1 update": {},
    "renorm_kl (default), 4 mini-batches": {"train.mini_batches": 4},
    # the same total step size: 4 optimizer steps at a quarter of the learning rate
    "sampled-token, 4 mini-batches, lr / 4": {"loss.topk": 0, "loss.renorm_kl": False, "train.mini_batches": 4,
                                              "optim.lr": 2.5e-4},
    "renorm_kl (default), 4 mini-batches, lr / 4": {"train.mini_batches": 4, "optim.lr": 2.5e-4},
}


def launch(name: str, overrides: dict, steps: int, out: str) -> subprocess.Popen:
    args = {"train.steps": steps, "train.output_dir": out, "train.save_every": 0, "train.progress": False,
            "train.tensorboard": False, "train.threads": 1, **overrides}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = open(out + ".log", "w")
    return subprocess.Popen([sys.executable, TRAIN, *(f"{k}={v}" for k, v in args.items())], stdout=log,
                            stderr=subprocess.STDOUT, env=env)


def read(out: str):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [(r["step"], r["accuracy_avg@1"]) for r in rows if r["kind"] == "eval" and "accuracy_avg@1" in r]
    train = [r for r in rows if r["kind"] == "train"]
    return evals, train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "ppo_updates"))
    p.add_argument("--only", nargs="*", help="variant names (default: all)")
    args = p.parse_args()
    names = args.only or list(VARIANTS)
    os.makedirs(args.out, exist_ok=True)
    # the first run builds and caches the default task's models: do that once before running in parallel
    subprocess.run([sys.executable, "-c", "from opdcore.presets.default_setup import prepare_default_setup as p; "
                    "import os; p(os.path.join(os.path.expanduser('~'), '.cache', 'opdcore', 'synthetic'), seed=0)"],
                   check=True)
    outs = {n: os.path.join(args.out, re.sub(r"[^A-Za-z0-9]+", "_", n).strip("_")) for n in names}
    pending, running, seconds = list(names), {}, {}
    while pending or running:
        while pending and len(running) < args.parallel:
            n = pending.pop(0)
            running[n] = (launch(n, VARIANTS[n], args.steps, outs[n]), time.perf_counter())
            print(f"started {n}", flush=True)
        time.sleep(1.0)
        for n, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                seconds[n] = time.perf_counter() - t0
                del running[n]
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {outs[n]}.log)"
                print(f"{status}: {n} in {seconds[n]:.0f} s", flush=True)
    results = {n: read(outs[n]) for n in names if os.path.isfile(os.path.join(outs[n], "metrics.jsonl"))}
    steps = sorted({s for ev, _ in results.values() for s, _ in ev})
    print("\n| variant | " + " | ".join(f"acc@{s}" for s in steps) + " | optimizer steps | clip fraction | wall s |")
    print("|---|" + "---:|" * (len(steps) + 3))
    for n, (ev, train) in results.items():
        acc = dict(ev)
        opt_steps = sum(r.get("optimizer_steps", 1.0) for r in train)
        clip = [r["ppo_clip_fraction"] for r in train if "ppo_clip_fraction" in r]
        clip_s = f"{sum(clip) / len(clip):.3f}" if clip else "-"
        cells = " | ".join(f"{acc[s]:.3f}" if s in acc else "" for s in steps)
        print(f"| {n} | {cells} | {opt_steps:.0f} | {clip_s} | {seconds.get(n, float('nan')):.0f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for n, (ev, train) in results.items():
        xs, ys = zip(*ev)
        axes[0].plot(xs, ys, marker="o", label=n)
        per_step = seconds.get(n, float("nan")) / max(1, args.steps)
        axes[1].plot([x * per_step for x in xs], ys, marker="o", label=n)
    axes[0].set_xlabel("training step (one rollout batch each)")
    axes[1].set_xlabel("wall seconds (approx.: run time spread evenly over steps)")
    for ax in axes:
        ax.set_ylabel("held-out greedy accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(args.out, "ppo_updates.png")
    fig.savefig(png, dpi=120)
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
