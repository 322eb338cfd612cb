"""TRL 1.16's stock distillation loss against TRL with opdcore's loss: same models, same batch, same steps (CPU).

    python benchmarks/bench_trl_integration.py [--vocab 49152|151936] [--threads 4] [--repeats 7]
    python benchmarks/bench_trl_integration.py --preset smollm2          # the cached SmolLM2-135M preset models
    python benchmarks/bench_trl_integration.py --quick                   # tiny settings: checks it runs end to end

A "step" is the part of a training step the loss replaces: the trainer's compute_loss (student forward with grad,
teacher forward without, the loss) and the backward, on one fixed batch of prompt + completion tokens. Generation
and the optimizer step are the same code for every variant and are left out. Variants run interleaved (one step
of each in turn, `--repeats` rounds after `--warmup`), so drift in the machine's load hits them alike; the table
gives the median seconds per step, completion tokens per second, the peak resident memory a step adds
(benchmarks/harness.py) and each opdcore row's ratios to the stock trainer of its kind, from the same run.

Rows: for each trainer (DistillationTrainer: TRL's chunked hidden-state loss; GKDTrainer: TRL's full-logits
generalized_jsd_loss), TRL's stock loss and opdcore's dense loss with the same beta, then opdcore's sparse top-k
losses (no TRL counterpart; their ratio is still to the stock dense loss).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import peak_extra_mib  # noqa: E402


def random_llama(vocab, hidden, layers, heads, seed, sharp):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = LlamaForCausalLM(cfg)
        with torch.no_grad():
            m.lm_head.weight.mul_(sharp)  # peaked next-token distributions, as trained models have
    return m


def preset_models(name):
    from transformers import AutoModelForCausalLM

    from opdcore.presets import prepare_preset
    cache = os.environ.get("OPDCORE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "opdcore"))
    try:
        setup = prepare_preset(name, os.path.join(cache, name), build=False)
    except LookupError:
        raise SystemExit(f"--preset {name} is not cached under {cache} (python -m opdcore train --config {name})")
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)  # noqa: E731
    return load(setup.student_dir), load(setup.teacher_dir)


def tokenizer():
    from opdcore.data.synthetic import build_char_tokenizer

    tok = build_char_tokenizer()  # only for the trainers' constructors: the batch is token ids
    tok.padding_side = "left"
    return tok


def batch(vocab, B, P, C, seed=0):
    """A fixed generated batch in both trainers' layouts: left-padded prompts, completions of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (B, P), generator=g)
    completion = torch.randint(3, vocab, (B, C), generator=g)
    pm = torch.ones(B, P, dtype=torch.long)
    cm = torch.ones(B, C, dtype=torch.long)
    for i in range(B):
        pm[i, :i % 4] = 0  # prompts of P - 0..3 tokens
        cm[i, C - (i * C) // (4 * B):] = 0  # completions ending early (EOS then padding)
    ids = torch.cat([prompt, completion], 1)
    am = torch.cat([pm, cm], 1)
    labels = ids.masked_fill(am == 0, -100)
    labels[:, :P] = -100
    distill = {"prompt_ids": prompt, "prompt_mask": pm, "completion_ids": completion, "completion_mask": cm,
               "num_items_in_batch": cm.sum()}
    gkd = {"input_ids": ids, "attention_mask": am, "labels": labels}
    return distill, gkd, int(cm.sum())


def build_trainers(kind, student, teacher, tok, a, losses, out):
    from datasets import Dataset

    from opdcore.integrations.trl import OPDCoreDistillationTrainer, OPDCoreGKDTrainer, OPDCoreLoss

    data = Dataset.from_list([{"prompt": "1+1="}] * 4)
    common = dict(output_dir=out, per_device_train_batch_size=a.batch, max_steps=1, beta=a.beta, report_to=[],
                  save_strategy="no", use_cpu=True, bf16=a.bf16, disable_tqdm=True)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "distillation":
            from trl import DistillationConfig, DistillationTrainer

            args = DistillationConfig(max_completion_length=a.completion_len, **common)
            mk = lambda cls, **kw: cls(model=student, teacher_model=teacher, args=args, train_dataset=data,  # noqa
                                       processing_class=tok, **kw)
            stock = mk(DistillationTrainer)
            ours = lambda opd: mk(OPDCoreDistillationTrainer, opdcore_loss=opd)  # noqa: E731
        else:
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            args = GKDConfig(lmbda=1.0, max_new_tokens=a.completion_len, **common)
            collate = lambda ex: {}  # noqa: E731  (never called: the batch is given)
            mk = lambda cls, **kw: cls(model=student, teacher_model=teacher, args=args, train_dataset=data,  # noqa
                                       processing_class=tok, data_collator=collate, **kw)
            stock = mk(GKDTrainer)
            ours = lambda opd: mk(OPDCoreGKDTrainer, opdcore_loss=opd)  # noqa: E731
        rows.append((f"TRL {kind} (stock, beta={a.beta:g})", stock))
        for loss in losses:
            opd = OPDCoreLoss(loss=loss, topk=a.topk, lm_head="fused",
                              diagnostics="every_step" if a.diagnostics else "off")
            rows.append((f"opdcore {loss}" + (f" (beta={a.beta:g})" if loss == "dense" else f" (k={a.topk})"),
                         ours(opd)))
    return rows


def step_fn(trainer, model, inputs):
    def step():
        model.zero_grad(set_to_none=True)
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, dict(inputs))
        loss.backward()
        return float(loss.detach())
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trainer", choices=("distillation", "gkd", "both"), default="both")
    p.add_argument("--losses", default="dense,renorm_topk_kl,tail_topk_kl,topk_opd",
                   help="opdcore losses to time (comma-separated)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary of the random models (49152 SmolLM2, "
                   "151936 Qwen2.5); ignored with --preset")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--teacher-hidden", type=int, default=960)
    p.add_argument("--teacher-heads", type=int, default=15)
    p.add_argument("--preset", choices=("smollm2",), default=None, help="the cached SmolLM2-135M preset models")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=128)
    p.add_argument("--beta", type=float, default=1.0, help="TRL's beta: 0 forward KL, 1 reverse KL, else JSD")
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="the trainers' bfloat16 autocast (TRL's default on GPU)")
    p.add_argument("--diagnostics", action="store_true", help="opdcore rows also compute their diagnostics")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks that it runs, numbers mean nothing")
    a = p.parse_args(argv)
    if a.quick:
        a.vocab, a.hidden, a.layers, a.heads, a.teacher_hidden, a.teacher_heads = 2048, 64, 1, 2, 96, 3
        a.batch, a.prompt_len, a.completion_len, a.repeats, a.warmup, a.preset = 2, 8, 16, 2, 1, None
    torch.set_num_threads(a.threads)
    losses = [x for x in a.losses.split(",") if x]

    if a.preset:
        student, teacher = preset_models(a.preset)
    else:
        student = random_llama(a.vocab, a.hidden, a.layers, a.heads, seed=1, sharp=3.0)
        teacher = random_llama(a.vocab, a.teacher_hidden, a.layers, a.teacher_heads, seed=2, sharp=6.0)
    student.train()
    teacher.eval().requires_grad_(False)
    vocab = student.config.vocab_size
    distill, gkd, tokens = batch(vocab, a.batch, a.prompt_len, a.completion_len)
    tok = tokenizer()
    out = os.path.join("runs", "bench_trl_integration")
    kinds = ("distillation", "gkd") if a.trainer == "both" else (a.trainer,)

    variants = []  # (kind, name, step function)
    for kind in kinds:
        inputs = distill if kind == "distillation" else gkd
        for name, tr in build_trainers(kind, student, teacher, tok, a, losses, out):
            variants.append((kind, name, step_fn(tr, student, inputs)))

    times = {(k, n): [] for k, n, _ in variants}
    values = {}
    for r in range(a.warmup + a.repeats):  # interleaved: one step of every variant per round
        for kind, name, fn in variants:
            t0 = time.perf_counter()
            values[(kind, name)] = fn()
            if r >= a.warmup:
                times[(kind, name)].append(time.perf_counter() - t0)
    mem = {}
    if not a.no_memory:
        for kind, name, fn in variants:
            mem[(kind, name)] = peak_extra_mib(fn)

    model_desc = (f"preset {a.preset}" if a.preset else
                  f"random Llama student H={a.hidden}, teacher H={a.teacher_hidden}, {a.layers} layers")
    print(f"\nTRL {__import__('trl').__version__}, torch {torch.__version__}, {a.threads} threads, {model_desc}, "
          f"V={vocab}, batch {a.batch} x ({a.prompt_len} prompt + {a.completion_len} completion), {tokens} "
          f"completion tokens, median of {a.repeats} interleaved steps after {a.warmup} warm-up"
          + (", bf16 autocast" if a.bf16 else "") + (", opdcore diagnostics on" if a.diagnostics else "") + "\n")
    print("| trainer | loss | s/step | tokens/s | peak extra MiB | time vs stock | memory vs stock | loss value |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for kind in kinds:
        stock = next(n for k, n, _ in variants if k == kind)
        t_stock = statistics.median(times[(kind, stock)])
        for k, name, _ in variants:
            if k != kind:
                continue
            t = statistics.median(times[(k, name)])
            m = mem.get((k, name), float("nan"))
            m_stock = mem.get((kind, stock), float("nan"))
            ratio_m = m / m_stock if m_stock and m_stock == m_stock and m_stock > 0 else float("nan")
            print(f"| {kind} | {name} | {t:.3f} | {tokens / t:,.0f} | {m:,.0f} | {t / t_stock:.2f}x | "
                  f"{ratio_m:.2f}x | {values[(k, name)]:.5g} |")


if __name__ == "__main__":
    main()
