"""The HF rollout engine's two CPU costs besides the model's GEMMs, each against the obvious way, same run:

  draw     opdcore.sample_tokens (one fused pass: inverse-CDF draw + the drawn token's log-prob) against what
           generate does per decoding step: softmax + torch.multinomial, plus a log_softmax + gather to record
           the log-prob; [rows, vocab] float32 scores (generate's own copy of the logits), rows x vocabulary grid
  rollout  HFEngine.generate on the smollm2 preset's student (SmolLM2-135M-Instruct, vocabulary 49152; 8 prompts x
           4 samples, <= 48 new tokens, bfloat16 autocast) against the same engine with generate's own sampling
           (do_sample, a log-prob recorder) on transformers' sdpa attention, a prefill per sample (the engine
           before this change), and with the changes one by one; interleaved, same seeds per round, ms per
           decoding step including the prefill (a batch decodes until its longest response ends, so steps
           differ between variants)

  python benchmarks/bench_rollout.py [--threads 2] [--rounds 3] [--only draw|rollout]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import median_seconds, peak_extra_mib  # noqa: E402


def bench_draw(rounds: int) -> None:
    import opdcore

    print("| rows | vocab | sample_tokens ms | softmax+multinomial+log_softmax ms | ratio | extra MiB fused / torch |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rows in (8, 32, 64):
        for vocab in (32000, 49152, 151936):
            x = torch.randn(rows, vocab) * 3

            def fused():
                return opdcore.sample_tokens(x, 0.8)

            def plain():
                y = x / 0.8
                ids = torch.multinomial(torch.softmax(y, -1), 1)
                return ids, torch.log_softmax(y, -1).gather(1, ids)

            tf, tp = [], []
            for _ in range(rounds):  # interleaved
                tf.append(median_seconds(fused, repeats=10))
                tp.append(median_seconds(plain, repeats=5))
            f, p = statistics.median(tf), statistics.median(tp)
            print(f"| {rows} | {vocab} | {f * 1e3:.2f} | {p * 1e3:.2f} | {p / f:.0f}x | "
                  f"{peak_extra_mib(fused):.1f} / {peak_extra_mib(plain):.1f} |", flush=True)


def bench_rollout(rounds: int) -> None:
    from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor,
                              LogitsProcessorList, TemperatureLogitsWarper)

    import opdcore.rollout.hf as hf
    from opdcore.data.prompts import load_prompts, render_prompt
    from opdcore.presets import prepare_preset
    from opdcore.rollout.base import SamplingConfig

    cache = os.environ.get("OPDCORE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "opdcore"))
    setup = prepare_preset("smollm2", os.path.join(cache, "smollm2"))
    tok = AutoTokenizer.from_pretrained(setup.tokenizer_dir, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(setup.student_dir, dtype=torch.float32)
    prompts = [render_prompt(tok, e) for e in load_prompts(setup.train_prompts_path)]
    sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=48)

    class Recorder(LogitsProcessor):  # the log-prob recording of generate's own sampling
        def __init__(self):
            self.prev, self.taken = None, []

        def __call__(self, input_ids, scores):
            if self.prev is not None:
                self.taken.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
            self.prev = torch.log_softmax(scores.float(), dim=-1)
            return scores

    def generate_own_sampling(model, items_ids, mask, config):  # do_sample with the recorder
        rec = Recorder()
        config.do_sample = True
        return model.generate(input_ids=items_ids, attention_mask=mask, generation_config=config,
                              logits_processor=LogitsProcessorList([TemperatureLogitsWarper(1.0), rec]))

    engine = hf.HFEngine(model, tok, batch_size=64, shares_training_model=True)
    keep_sdpa = lambda m, enabled: hf._Attention(m, None)  # noqa: E731

    def run(fused_draw: bool, decode_attention: bool, shared_prefill: bool, batch):
        saved = hf._decode_attention, hf.HFEngine._shared_prompt_cache
        if not decode_attention:
            hf._decode_attention = keep_sdpa
        if not shared_prefill:
            hf.HFEngine._shared_prompt_cache = lambda self, *a: None
        try:
            if fused_draw:
                return engine.generate(batch, sampling)
            ids = tok.pad({"input_ids": [p for p in batch for _ in range(4)]}, return_tensors="pt")
            config = GenerationConfig(max_new_tokens=48, pad_token_id=tok.pad_token_id, temperature=1.0, top_p=1.0,
                                      top_k=0, eos_token_id=engine.stop_ids)
            with torch.no_grad():
                attention = hf._decode_attention(model, True)
                try:
                    out = generate_own_sampling(model, ids["input_ids"], ids["attention_mask"], config)
                finally:
                    attention.close()
            return out
        finally:
            hf._decode_attention, hf.HFEngine._shared_prompt_cache = saved

    variants = {"generate's sampling, sdpa": (False, False, False), "fused draw, sdpa": (True, False, False),
                "generate's sampling, decode attention": (False, True, False),
                "fused draw + decode attention": (True, True, False),
                "opdcore (+ one prefill per prompt)": (True, True, True)}
    per_step = {k: [] for k in variants}
    for rnd in range(rounds + 1):  # round 0 warms up
        batch = prompts[8 * rnd:8 * rnd + 8]
        for name, (fd, da, sp) in variants.items():
            torch.manual_seed(rnd)
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = run(fd, da, sp, batch)
            dt = time.perf_counter() - t
            steps = max(len(r.response_ids) for r in out) if fd else out.shape[1] - max(len(p) for p in batch)
            if rnd:
                per_step[name].append(dt / steps * 1e3)
            print(f"round {rnd} {name}: {dt:.2f} s, {steps} steps", flush=True)
    base = statistics.median(per_step["generate's sampling, sdpa"])
    print("\n| variant | ms per decoding step (median) | speed-up |\n|---|---:|---:|")
    for name, v in per_step.items():
        m = statistics.median(v)
        print(f"| {name} | {m:.0f} | {base / m:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=("draw", "rollout"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}, torch {torch.__version__}")
    if a.only in (None, "draw"):
        bench_draw(a.rounds)
    if a.only in (None, "rollout"):
        bench_rollout(a.rounds)


if __name__ == "__main__":
    main()
