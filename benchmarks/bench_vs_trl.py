"""TRL 1.16's own on-policy distillation trainers against opdcore's trainer, end to end, in one process (CPU).

    python benchmarks/bench_vs_trl.py --preset synthetic            # the tiny synthetic pair (vocabulary 100)
    python benchmarks/bench_vs_trl.py --preset smollm2              # SmolLM2-135M-Instruct and its SFT teacher
    python benchmarks/bench_vs_trl.py --preset synthetic --quick    # tiny settings: checks it runs, numbers mean nothing

Both sides train the same student from the same teacher on the same prompts in the same order (the preset's
training prompt file, drawn by opdcore's PromptSampler), with the same prompts per step, samples per prompt,
response length, sampling temperature, AdamW settings and learning-rate schedule (the preset's) and thread count:

- TRL: `trl.experimental.gkd.GKDTrainer` (lmbda=1: every batch sampled by the student; beta=1: reverse KL over
  the full vocabulary from full [tokens, vocab] logits) and `trl.DistillationTrainer` (always on-policy; beta=1;
  its chunked hidden-state loss), each driven by its own `train()`.
- opdcore: `opdcore.trainer.loop.Trainer.train_step()`, with the preset's default loss and with
  `loss.dense=reverse_kl` (the objective of TRL's beta=1).

A step is everything between two optimizer steps: sampling, teacher scoring, the update and the trainer's own
bookkeeping. tokens/s counts prompt + response tokens (up to and including EOS) per step, for both sides. Phases:
rollout (the generate call), teacher (TRL: the teacher's forward; opdcore: its scoring pass, the teacher's forward
and, with train.score_in_update=false, the student's own no-grad forward), update (TRL: compute_loss without the teacher's forward, backward, clipping and optimizer step;
opdcore: time_update_s), other (the rest of the step). Peak RSS is the process's resident high-water mark within a
step (benchmarks/harness.py's reading), the largest over the timed steps. Accuracy is greedy accuracy on the
held-out eval prompts after the run, measured for both sides by the same function (opdcore.sft.greedy_accuracy,
float32, the preset's answer extraction).

Runs alternate TRL and opdcore (the side that goes first alternates per round), each from freshly loaded weights;
the first step of every run is a warm-up and is left out; the table gives medians over the rest of all rounds.
With --isolate every run is its own fresh Python process (this script again, one variant, result as JSON), so no
run inherits another's heap, allocator caches or thread pools; without it all runs share one process.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import math
import os
import platform
import subprocess
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import _status_kib  # noqa: E402

from opdcore.config import CONFIGS, load_config  # noqa: E402
from opdcore.data.prompts import PromptSampler, load_prompts, render_prompt  # noqa: E402
from opdcore.data.reward import AnswerChecker  # noqa: E402

# opdcore losses: name -> config overrides on top of the preset
OPD_LOSSES = {
    "default": (),  # the preset's own loss (both presets: the exact renormalised top-16 reverse KL)
    "reward_weighted": ("loss.renorm_kl=false",),  # the reward-weighted top-16 loss (METHOD.md 2.2)
    "reverse_kl": ("loss.renorm_kl=false", "loss.dense=reverse_kl"),  # TRL's beta=1 objective
}
TRL_TRAINERS = ("gkd", "distillation")


# ---- memory -----------------------------------------------------------------------------------------------------

def reset_peak() -> None:
    """Restart the kernel's resident high-water mark (VmHWM), as harness.peak_extra_mib does."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib() -> float:
    return _status_kib("VmHWM") / 1024


def release() -> None:
    """Between runs: free the last run's models and hand glibc's freed heap back, so every run starts alike."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- the shared setup --------------------------------------------------------------------------------------------

@dataclass
class Bench:
    preset: str
    config_path: str
    setup: object  # opdcore.presets DefaultSetup: model folders and prompt files
    threads: int
    steps: int  # warm-up + timed steps, per run
    warmup: int
    prompts_per_step: int
    n: int
    max_new_tokens: int
    temperature: float
    top_p: float
    lr: float
    betas: tuple
    weight_decay: float
    grad_clip: float
    schedule: tuple  # (kind, warmup steps, min lr ratio): the preset's, over this benchmark's steps
    seed: int
    autocast: bool  # opdcore's model.autocast=bfloat16 -> TRL's bf16=True
    teacher_bf16: bool
    gradient_checkpointing: bool
    trl_gradient_checkpointing: bool
    train_examples: list = field(default_factory=list)
    train_ids: list = field(default_factory=list)
    order: List[int] = field(default_factory=list)  # prompt index per response, in training order
    eval_prompts: list = field(default_factory=list)
    eval_answers: list = field(default_factory=list)
    eval_max_new_tokens: int = 0
    checker: object = None
    overrides: tuple = ()


def cache_root() -> str:
    return os.environ.get("OPDCORE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "opdcore"))


def cached_preset(name: str):
    """The preset's cached models and prompt files; never builds (a build takes minutes and changes the machine's
    load under the other runs)."""
    from opdcore.presets import prepare_preset

    cache = os.path.join(cache_root(), name)
    try:
        return prepare_preset(name, cache, build=False)
    except LookupError:
        raise SystemExit(f"--preset {name} is not cached under {cache}; build it first with "
                         f".venv/bin/opdcore train --config {name} (this benchmark never builds it)")


def make_bench(a) -> Bench:
    config_path = os.path.join(CONFIGS, f"{a.preset}.yaml")
    base = load_config(config_path)
    setup = cached_preset(a.preset)
    r, o, m = base.rollout, base.optim, base.model
    b = Bench(preset=a.preset, config_path=config_path, setup=setup,
              threads=a.threads or base.train.threads or os.cpu_count() or 1,
              steps=a.warmup + a.steps, warmup=a.warmup,
              prompts_per_step=a.prompts_per_step or base.train.prompts_per_step, n=a.n or r.n,
              max_new_tokens=a.max_new_tokens or r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
              lr=a.lr or o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, grad_clip=o.grad_clip,
              schedule=(o.schedule, o.warmup_steps, o.min_lr_ratio),
              seed=base.train.seed, autocast=m.autocast == "bfloat16",
              teacher_bf16=m.teacher_dtype == "bfloat16" or (m.teacher_dtype == "same" and m.dtype == "bfloat16"),
              gradient_checkpointing=m.gradient_checkpointing,
              trl_gradient_checkpointing=m.gradient_checkpointing and not a.trl_no_gradient_checkpointing)
    if m.dtype != "float32":
        raise SystemExit(f"preset {a.preset} trains in {m.dtype}; this benchmark assumes float32 master weights")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup.tokenizer_dir)
    d = base.data
    b.train_examples = load_prompts(setup.train_prompts_path, prompt_key=d.prompt_key, answer_key=d.answer_key)
    # rendered exactly as opdcore's trainer renders them; TRL gets the same ids (checked in build_trl)
    b.train_ids = [render_prompt(tok, e, d.chat_template_kwargs, d.chat_template) for e in b.train_examples]
    sampler = PromptSampler(len(b.train_examples), b.prompts_per_step, seed=b.seed)
    b.order = [i for _ in range(b.steps) for i in next(sampler) for _ in range(b.n)]  # n samples of each prompt
    evals = [e for e in load_prompts(setup.eval_prompts_path, prompt_key=d.prompt_key, answer_key=d.answer_key)
             if e.answer is not None][:a.eval_prompts if a.eval_prompts is not None else base.eval.max_prompts]
    b.eval_prompts, b.eval_answers = [e.prompt for e in evals], [e.answer for e in evals]
    b.eval_max_new_tokens = base.eval.max_new_tokens or r.max_new_tokens  # the preset's, whatever --max-new-tokens
    b.checker = AnswerChecker(d.answer_extraction, d.answer_regex)
    b.overrides = (f"train.steps={b.steps}", "train.save_every=0", "eval.every=0", "eval.max_prompts=0",
                   "train.progress=false", "train.tensorboard=false", "train.resume=never",
                   "diagnostics.eval_teacher=false", f"train.threads={b.threads}",
                   f"train.prompts_per_step={b.prompts_per_step}", f"rollout.n={b.n}",
                   f"rollout.max_new_tokens={b.max_new_tokens}", f"optim.lr={b.lr}")
    return b


def lr_factor(b: Bench):
    """The learning-rate factor per optimizer step of opdcore's schedules (linear warm-up from 1/warmup, then
    constant, cosine or linear decay to min_lr_ratio over the run), for TRL's trainers: transformers' own warm-up
    starts from 0, so its schedules cannot match. Both sides log the rate they used (checked after the runs)."""
    kind, warmup, floor = b.schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant" or b.steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, b.steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return floor + (1 - floor) * decay

    return factor


def accuracy(b: Bench, model, tokenizer) -> float:
    """Greedy held-out accuracy, the same function and precision (float32) for both sides."""
    from opdcore.sft import greedy_accuracy

    if not b.eval_prompts:
        return float("nan")
    with torch.no_grad():
        return greedy_accuracy(model, tokenizer, b.eval_prompts, b.eval_answers, b.eval_max_new_tokens,
                               checker=b.checker)


# ---- opdcore ----------------------------------------------------------------------------------------------------

def run_opdcore(b: Bench, loss: str, out: str) -> dict:
    from opdcore.trainer.loop import Trainer

    start = _status_kib("VmRSS") / 1024
    cfg = load_config(b.config_path, b.overrides + (f"train.output_dir={out}",) + OPD_LOSSES[loss])
    torch.set_num_threads(b.threads)
    trainer = Trainer(cfg)
    rows = []
    for _ in range(b.steps):
        reset_peak()
        t0 = time.perf_counter()
        m = trainer.train_step()
        total = time.perf_counter() - t0
        phases = {k[5:-2]: v for k, v in m.items() if k.startswith("time_") and k.endswith("_s")}
        # opdcore restarts the high-water mark at each phase and logs each phase's peak: the step's is the largest
        peak = max([peak_mib()] + [v for k, v in m.items() if k.startswith("rss_") and k.endswith("_mib")])
        rows.append({"total": total, "rollout": phases.get("rollout", 0.0), "teacher": phases.get("score", 0.0),
                     "update": phases.get("update", 0.0),
                     "other": total - sum(phases.get(k, 0.0) for k in ("rollout", "score", "update")),
                     "tokens": m["tokens_per_s"] * sum(phases.values()),
                     "response_length": m.get("response_length", float("nan")), "peak_mib": peak,
                     "lr": m.get("lr", float("nan"))})  # the rate of the next step (after the scheduler's step)
    acc = accuracy(b, trainer.student.hf, trainer.tokenizer)
    threads = torch.get_num_threads()
    trainer.close()
    del trainer
    return {"rows": rows, "accuracy": acc, "threads_after": threads, "start_mib": start}


# ---- TRL --------------------------------------------------------------------------------------------------------

class PhaseClock:
    """Per-step phase seconds of a TRL trainer, from timers wrapped around its own methods."""

    def __init__(self):
        self.acc = defaultdict(float)
        self.backward_end = None
        self.opt_end = None

    @contextlib.contextmanager
    def time(self, name):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.acc[name] += time.perf_counter() - t0

    def take(self):
        acc, self.acc = self.acc, defaultdict(float)
        tail = (self.opt_end - self.backward_end) if self.opt_end and self.backward_end else 0.0
        self.backward_end = self.opt_end = None
        return acc, tail


def instrument(trainer, kind: str, clock: PhaseClock, teacher) -> None:
    """Timers around TRL's generate call, the teacher's forward, compute_loss and backward; tokens counted from
    the generated batch (prompt tokens + completion tokens through the first EOS)."""
    if kind == "gkd":
        gen = trainer.generate_on_policy_outputs  # a staticmethod: an instance attribute replaces it

        def generate(model, inputs, generation_config):
            with clock.time("rollout"):
                out = gen(model, inputs, generation_config)
            clock.acc["tokens"] += float(out[1].sum())  # the new attention mask: prompt + completion to EOS
            clock.acc["responses"] += out[0].shape[0]
            return out

        trainer.generate_on_policy_outputs = generate
        starts = []
        teacher.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        teacher.register_forward_hook(lambda *_: clock.acc.__setitem__(
            "teacher", clock.acc["teacher"] + time.perf_counter() - starts.pop()))
    else:
        gen = trainer._generate

        def generate(prompts):
            with clock.time("rollout"):
                out = gen(prompts)
            prompt_ids, completion_ids = out[0], out[1]
            clock.acc["tokens"] += sum(map(len, prompt_ids)) + sum(map(len, completion_ids))
            clock.acc["responses"] += len(completion_ids)
            return out

        trainer._generate = generate
        hidden = trainer._get_last_hidden_state  # the backbone pass, once for the student and once for the teacher

        def last_hidden_state(model, *args, **kwargs):
            if model is not teacher:
                return hidden(model, *args, **kwargs)
            with clock.time("teacher"):
                return hidden(model, *args, **kwargs)

        trainer._get_last_hidden_state = last_hidden_state
    compute_loss = trainer.compute_loss

    def timed_compute_loss(*args, **kwargs):
        with clock.time("compute_loss"):
            return compute_loss(*args, **kwargs)

    trainer.compute_loss = timed_compute_loss
    backward = trainer.accelerator.backward

    def timed_backward(*args, **kwargs):
        with clock.time("backward"):
            out = backward(*args, **kwargs)
        clock.backward_end = time.perf_counter()
        return out

    trainer.accelerator.backward = timed_backward


def load_pair(b: Bench):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(b.setup.student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(b.setup.teacher_dir,
                                                   dtype=torch.bfloat16 if b.teacher_bf16 else torch.float32)
    teacher.requires_grad_(False).eval()
    return student, teacher


def trl_args(b: Bench, out: str) -> dict:
    """TrainingArguments shared by both TRL trainers: opdcore's optimizer settings, and every overhead that is not
    training (evaluation, checkpoints, logging, progress bars) off."""
    return dict(output_dir=out, per_device_train_batch_size=b.prompts_per_step * b.n, gradient_accumulation_steps=1,
                max_steps=b.steps, learning_rate=b.lr, adam_beta1=b.betas[0], adam_beta2=b.betas[1],
                weight_decay=b.weight_decay, max_grad_norm=b.grad_clip, lr_scheduler_type="constant",
                warmup_steps=0, use_cpu=True, bf16=b.autocast, fp16=False,
                gradient_checkpointing=b.trl_gradient_checkpointing, seed=b.seed, data_seed=b.seed,
                report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, beta=1.0, temperature=b.temperature)


def build_trl(b: Bench, kind: str, out: str):
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer

    from torch.optim.lr_scheduler import LambdaLR

    class Schedule:
        """opdcore's learning-rate schedule (lr_factor) in place of transformers' own."""

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer, lr_factor(b))
            return self.lr_scheduler

    student, teacher = load_pair(b)
    tok = AutoTokenizer.from_pretrained(b.setup.tokenizer_dir, padding_side="left")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if kind == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        class InOrderGKD(Schedule, GKDTrainer):
            def _get_train_sampler(self, dataset=None):  # opdcore's prompt order instead of a random one
                return SequentialSampler(dataset if dataset is not None else self.train_dataset)

        def collate(rows):
            # left-padded prompt ids, the layout TRL's own ChatML collator gives generate. No labels: GKD replaces
            # input_ids / attention_mask / labels with the generated batch, and labels here would only set a
            # num_items_in_batch counted from the dataset (0 tokens) instead of the generated completions
            ids = [r["prompt_ids"] for r in rows]
            width = max(map(len, ids))
            prompts = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for i, x in enumerate(ids):
                prompts[i, width - len(x):] = torch.tensor(x)
                mask[i, width - len(x):] = 1
            return {"prompts": prompts, "prompt_attention_mask": mask, "input_ids": prompts, "attention_mask": mask}

        args = GKDConfig(lmbda=1.0, seq_kd=False, max_new_tokens=b.max_new_tokens, **trl_args(b, out))
        data = Dataset.from_list([{"prompt_ids": b.train_ids[i]} for i in b.order])
        trainer = InOrderGKD(model=student, teacher_model=teacher, args=args, train_dataset=data,
                             processing_class=tok, data_collator=collate)
        if trainer.generation_config.top_p != b.top_p and b.top_p != 1.0:
            raise SystemExit(f"GKDTrainer samples with top_p=1.0; the preset uses rollout.top_p={b.top_p}")
    else:
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(max_completion_length=b.max_new_tokens, top_p=b.top_p, top_k=0,
                                  shuffle_dataset=False, disable_dropout=True, use_vllm=False, **trl_args(b, out))
        data = Dataset.from_list([{"prompt": b.train_examples[i].prompt} for i in b.order])
        class ScheduledDistillation(Schedule, DistillationTrainer):
            pass

        trainer = ScheduledDistillation(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                      processing_class=tok)
        # TRL renders the prompts itself: they must be the token ids opdcore trains on
        sample = sorted(set(b.order))[:16]
        got = trainer._tokenize_prompts([b.train_examples[i].prompt for i in sample])[0]
        bad = [i for i, ids in zip(sample, got) if list(ids) != b.train_ids[i]]
        if bad:
            raise SystemExit(f"DistillationTrainer renders prompt {bad[0]} differently from opdcore: "
                             f"{list(got[sample.index(bad[0])])} vs {b.train_ids[bad[0]]}")
    return trainer, student, teacher, tok


def run_trl(b: Bench, kind: str, out: str) -> dict:
    from transformers import TrainerCallback

    from transformers.trainer_callback import PrinterCallback

    torch.set_num_threads(b.threads)
    start = _status_kib("VmRSS") / 1024
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, student, teacher, tok = build_trl(b, kind, out)
    trainer.remove_callback(PrinterCallback)  # its end-of-training summary line; logging is off otherwise
    clock = PhaseClock()
    # the teacher module TRL actually calls (accelerate may wrap it)
    called_teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    instrument(trainer, kind, clock, called_teacher if kind == "distillation" else trainer.teacher_model)
    rows = []

    class StepClock(TrainerCallback):
        """A step runs from the previous step's end to this one's: data loading, generation, loss, backward,
        clipping, optimizer and scheduler steps, and the trainer's log/save checks all fall inside one."""

        def on_train_begin(self, *args, **kwargs):
            self.t = time.perf_counter()
            reset_peak()

        def on_optimizer_step(self, *args, **kwargs):
            clock.opt_end = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            now = time.perf_counter()
            acc, tail = clock.take()
            total = now - self.t
            update = acc["compute_loss"] - acc["teacher"] + acc["backward"] + tail
            rows.append({"total": total, "rollout": acc["rollout"], "teacher": acc["teacher"], "update": update,
                         "other": total - acc["rollout"] - acc["teacher"] - update, "tokens": acc["tokens"],
                         "response_length": float("nan"), "peak_mib": peak_mib(),
                         "lr": trainer.optimizer.param_groups[0]["lr"]})  # the next step's, as opdcore logs it
            reset_peak()
            self.t = time.perf_counter()

    trainer.add_callback(StepClock())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    acc = accuracy(b, trainer.model, tok)
    threads = torch.get_num_threads()
    del trainer, student, teacher
    return {"rows": rows, "accuracy": acc, "threads_after": threads, "start_mib": start}


# ---- driver -----------------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            have = next(line for line in f if line.startswith("flags")).split()
        flags = ", ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in have)
    except (OSError, StopIteration):
        pass
    mem = _status_kib("VmRSS")  # touch the harness reader early: fails loudly off Linux
    del mem
    try:
        with open("/proc/meminfo") as f:
            total = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2 ** 20
    except (OSError, StopIteration):
        total = float("nan")
    return f"{cpu} ({flags}), {os.cpu_count()} cores, {total:.0f} GiB"


def versions() -> str:
    import transformers
    import trl

    return f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {trl.__version__}"


def med(rows, key):
    vals = [r[key] for r in rows if r[key] == r[key]]
    return statistics.median(vals) if vals else float("nan")


def run_isolated(argv, side: str, kind: str, out: str) -> dict:
    """One run in a fresh process: this script with the same arguments, for one variant."""
    os.makedirs(out, exist_ok=True)
    result = os.path.join(out, "result.json")
    args = [x for x in argv if x != "--isolate"] + ["--one", f"{side}:{kind}", "--result", result]
    subprocess.run([sys.executable, os.path.abspath(__file__)] + args, check=True)
    with open(result) as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("synthetic", "smollm2"), default="synthetic")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (synthetic 20, smollm2 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps per run")
    p.add_argument("--rounds", type=int, default=None, help="runs of every variant, interleaved (synthetic 3, "
                   "smollm2 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: the preset's "
                   "train.threads, else every core)")
    p.add_argument("--prompts-per-step", type=int, default=0, help="0: the preset's train.prompts_per_step")
    p.add_argument("--n", type=int, default=0, help="samples per prompt (0: the preset's rollout.n)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the preset's rollout.max_new_tokens")
    p.add_argument("--lr", type=float, default=0.0, help="0: the preset's optim.lr")
    p.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts for the accuracy (default: the "
                   "preset's eval.max_prompts; 0: no accuracy)")
    p.add_argument("--trl", default=",".join(TRL_TRAINERS), help="TRL trainers: gkd,distillation")
    p.add_argument("--opd-losses", default="default,reverse_kl", help=f"opdcore losses: {', '.join(OPD_LOSSES)}")
    p.add_argument("--trl-no-gradient-checkpointing", action="store_true",
                   help="TRL without gradient checkpointing even where opdcore's preset uses it (smollm2)")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks that it runs, numbers mean nothing")
    p.add_argument("--isolate", action="store_true", help="every run in a fresh process (see the module docstring)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # side:kind: this process runs one variant (--isolate's child)
    p.add_argument("--result", help=argparse.SUPPRESS)  # ... and writes its result here as JSON
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    big = a.preset == "smollm2"
    if a.quick:
        a.steps, a.rounds = a.steps or 2, a.rounds or 1
        a.prompts_per_step, a.n = a.prompts_per_step or 4, a.n or 2
        a.max_new_tokens = a.max_new_tokens or (16 if big else 32)
        a.eval_prompts = 16 if a.eval_prompts is None else a.eval_prompts
    a.steps = a.steps or (5 if big else 20)
    a.rounds = a.rounds or (2 if big else 3)
    trls = [x for x in a.trl.split(",") if x]
    losses = [x for x in a.opd_losses.split(",") if x]
    for x in trls:
        if x not in TRL_TRAINERS:
            p.error(f"--trl: unknown trainer {x!r}")
    for x in losses:
        if x not in OPD_LOSSES:
            p.error(f"--opd-losses: unknown loss {x!r}")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("trl").setLevel(logging.ERROR)  # GKDTrainer's advice to migrate, on every construction
    with warnings.catch_warnings():
        # both sides' modules in memory before the first run, so no run's resident memory carries the other's imports
        warnings.simplefilter("ignore")
        import trl.experimental.gkd  # noqa: F401
        from trl import DistillationTrainer  # noqa: F401

        import opdcore.trainer.loop  # noqa: F401
    b = make_bench(a)
    torch.set_num_threads(b.threads)
    if a.one:  # --isolate's child: one run, its result to the parent
        side, kind = a.one.split(":")
        out = tempfile.mkdtemp(prefix="bench-vs-trl-one-")
        try:
            res = run_trl(b, kind, out) if side == "trl" else run_opdcore(b, kind, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        with open(a.result, "w") as f:
            json.dump(res, f)
        return
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    print(f"bench_vs_trl: preset {b.preset}, {b.threads} thread(s), {b.prompts_per_step} prompts x {b.n} samples, "
          f"max_new_tokens {b.max_new_tokens}, {a.warmup} + {a.steps} steps per run, {a.rounds} round(s); "
          f"load average {load0[0]:.2f}", flush=True)

    variants = [("trl", k) for k in trls]
    opd = [("opdcore", k) for k in losses]
    results: Dict[tuple, list] = defaultdict(list)
    tmp = tempfile.mkdtemp(prefix="bench-vs-trl-")
    try:
        for rnd in range(a.rounds):
            first, second = (variants, opd) if rnd % 2 == 0 else (opd, variants)
            schedule = [v for pair in zip(first, second) for v in pair]
            schedule += first[len(second):] + second[len(first):]
            for side, kind in schedule:
                release()
                out = os.path.join(tmp, f"{side}-{kind}-{rnd}")
                t0 = time.perf_counter()
                if a.isolate:
                    res = run_isolated(argv, side, kind, out)
                else:
                    res = run_trl(b, kind, out) if side == "trl" else run_opdcore(b, kind, out)
                res["rows"] = res["rows"][a.warmup:]
                results[(side, kind)].append(res)
                if res["threads_after"] != b.threads:
                    print(f"  warning: {side} {kind} left torch at {res['threads_after']} threads", flush=True)
                print(f"  round {rnd + 1} {side} {kind}: {len(res['rows'])} timed steps, median "
                      f"{med(res['rows'], 'total'):.3f} s/step, accuracy {res['accuracy']:.3f} "
                      f"({time.perf_counter() - t0:.0f} s with loading and evaluation)", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lrs = {key: [r["lr"] for r in res["rows"]] for key, runs in results.items() for res in runs[:1]}
    ref = next(iter(lrs.values()), [])
    for key, seq in lrs.items():
        if len(seq) != len(ref) or any(abs(x - y) > 1e-12 + 1e-6 * abs(y) for x, y in zip(seq, ref)):
            print(f"warning: {key[0]} {key[1]} stepped the learning rate {seq}, the first run {ref}")
    baseline = (b.setup.student_accuracy, b.setup.teacher_accuracy)
    load1 = os.getloadavg()
    print(f"\n{machine()}; {versions()}; {b.threads} torch thread(s); load average {load0[0]:.2f} at the start, "
          f"{load1[0]:.2f} at the end; {time.perf_counter() - t_start:.0f} s in all\n")
    print(f"Preset {b.preset}: {b.prompts_per_step} prompts x {b.n} samples per step, at most {b.max_new_tokens} new "
          f"tokens, temperature {b.temperature:g}, AdamW lr {b.lr:g} ({b.schedule[0]}, {b.schedule[1]} warm-up "
          f"steps, floor {b.schedule[2]:g}: the preset's schedule over {b.steps} steps) betas {b.betas} weight decay "
          f"{b.weight_decay:g}, grad clip {b.grad_clip:g}"
          + (", bfloat16 autocast (TRL: bf16=True), bfloat16 teacher" if b.autocast else ", float32")
          + (", gradient checkpointing (opdcore" + (" and TRL)" if b.trl_gradient_checkpointing else " only)")
             if b.gradient_checkpointing else "")
          + f". Medians of {a.steps} steps x {a.rounds} round(s) per row after {a.warmup} warm-up step(s) per run. "
          f"Accuracy: greedy on {len(b.eval_prompts)} held-out prompts after {b.steps} steps, mean over rounds "
          f"(the preset's cache: student {baseline[0]:.3f}, teacher {baseline[1]:.3f} before training).\n")
    names = {("trl", "gkd"): "TRL GKDTrainer (lmbda=1, beta=1)",
             ("trl", "distillation"): "TRL DistillationTrainer (beta=1)",
             ("opdcore", "default"): "opdcore, preset loss (renorm top-16 KL)",
             ("opdcore", "reward_weighted"): "opdcore, reward-weighted top-16",
             ("opdcore", "reverse_kl"): "opdcore, loss.dense=reverse_kl"}
    print("| trainer | s/step | tokens/s | rollout s | teacher s | update s | other s | tokens/step "
          "| peak RSS MiB | peak above start MiB | accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for key in variants + opd:
        rows = [r for res in results[key] for r in res["rows"]]
        tps = [r["tokens"] / r["total"] for r in rows]
        accs = [res["accuracy"] for res in results[key]]
        s = summary[key] = {"tps": statistics.median(tps) if tps else float("nan")}
        acc = statistics.mean(accs) if accs else float("nan")
        peak = max((r["peak_mib"] for r in rows), default=float("nan"))
        above = max((r["peak_mib"] - res["start_mib"] for res in results[key] for r in res["rows"]),
                    default=float("nan"))
        print(f"| {names.get(key, key)} | {med(rows, 'total'):.3f} | {s['tps']:,.0f} | {med(rows, 'rollout'):.3f} | "
              f"{med(rows, 'teacher'):.3f} | {med(rows, 'update'):.3f} | {med(rows, 'other'):.3f} | "
              f"{med(rows, 'tokens'):,.0f} | {peak:,.0f} | {above:,.0f} | {acc:.3f} |")
    if variants and opd:
        print("\nSame-run ratios, opdcore tokens/s / TRL tokens/s:\n")
        print("| opdcore loss | " + " | ".join(f"vs {names[v].split(' (')[0]}" for v in variants) + " |")
        print("|---|" + "---:|" * len(variants))
        for o in opd:
            print(f"| {names.get(o, o)} | " + " | ".join(
                f"{summary[o]['tps'] / summary[v]['tps']:.2f}x" for v in variants) + " |")
    print("""
What differs between the sides:
- Sampling: the same prompts in the same order, but each side draws its own random tokens, so responses (and
  their lengths, hence the work per step) differ; tokens/s is per token, s/step is not.
- Phases: opdcore's "teacher" is its scoring pass (the teacher's forward without grad and its top-k; the
  student's top-k comes from the update's own forward, train.score_in_update); TRL's "teacher" is the teacher's
  forward inside compute_loss (Distillation: the teacher's backbone; its LM-head projection is inside the chunked
  loss, counted as update).
- Losses: GKD materialises full [batch, length, vocab] logits for both models and takes the full-vocabulary
  reverse KL; DistillationTrainer uses the chunked hidden-state reverse KL; opdcore's preset loss is the exact
  renormalised top-16 KL (a different objective), its loss.dense=reverse_kl the same objective as beta=1.
- Batching: TRL runs one padded forward over the whole batch; opdcore packs responses into micro-batches of
  train.micro_batch_tokens.
- Optimizer: the same AdamW hyperparameters, but transformers' Trainer exempts biases and norm weights from weight
  decay; opdcore decays every parameter. Both run torch's fused AdamW (TRL: optim=adamw_torch_fused, opdcore in
  one process).
- Memory: opdcore returns freed heap to the OS after a phase that leaves 256 MiB or more of it (malloc_trim;
  real models, not the synthetic pair); TRL does not.
- Precision of the rollouts: with bf16=True TRL's generate runs in float32 (transformers' autocast covers
  compute_loss only); opdcore samples under its bfloat16 autocast. The teacher is bfloat16 on both sides.
- GKD with gradient checkpointing generates with use_cache=False (TRL's choice: every new token re-runs the
  whole sequence); DistillationTrainer keeps the KV cache. --trl-no-gradient-checkpointing shows TRL without it.
- Accuracy: a few steps per run, sampled differently on each side; differences of a few points are noise (the
  progress lines give each round's value).""")


if __name__ == "__main__":
    main()
