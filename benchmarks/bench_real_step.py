"""The trainer's OPD step on the smollm2 preset (SmolLM2-135M-Instruct student, its task-specialised teacher,
vocabulary 49152, 8 prompts x 4 responses of <= 48 tokens per step): float32 against bfloat16 autocast
(`model.autocast`), one process, --threads threads, the same seed and prompts. Per-phase seconds and response
tokens per second (median of the steps after the first), and the process's peak resident memory.

The preset is built on first use (cached in ~/.cache/opdcore/smollm2, or $OPDCORE_CACHE).

  python benchmarks/bench_real_step.py [--steps 4] [--threads 2] [--engine hf]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("time_rollout_s", "time_score_s", "time_update_s", "time_sync_s", "tokens_per_s", "response_length",
          "peak_rss_mib")


def run(out: str, autocast: str, args) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "examples", "train.py"), "--config", "smollm2",
           f"model.autocast={autocast}", f"rollout.engine={args.engine}", f"train.steps={args.steps}",
           f"train.threads={args.threads}", f"train.output_dir={out}", "train.save_every=0", "train.progress=false",
           "train.tensorboard=false", "eval.max_prompts=0", "diagnostics.eval_teacher=false"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in rows if r["kind"] == "train"][1:]  # the first step warms up
    return {k: statistics.median(r[k] for r in steps) if k != "peak_rss_mib" else max(r[k] for r in steps)
            for k in PHASES}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", default="hf", choices=("hf", "vllm"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="opdcore-bench-real-")
    res = {mode: run(os.path.join(work, mode), mode, args) for mode in ("none", "bfloat16")}
    print(f"smollm2 preset, {args.engine} engine, {args.threads} threads, median of steps 2..{args.steps}")
    print("| phase | float32 | bfloat16 autocast | speed-up |")
    print("|---|---:|---:|---:|")
    for k in PHASES:
        a, b = res["none"][k], res["bfloat16"][k]
        ratio = (b / a if k == "tokens_per_s" else a / b) if k not in ("response_length", "peak_rss_mib") else None
        print(f"| {k} | {a:.3f} | {b:.3f} | {'' if ratio is None else f'{ratio:.2f}x'} |")


if __name__ == "__main__":
    main()
