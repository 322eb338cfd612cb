"""The OPD training loop (METHOD.md sections 2 and 5): rollouts, scoring, update, weight sync, logging."""
from __future__ import annotations

import copy
import os
from typing import Dict

import torch

from opdcore.config import Config, several_updates, to_dict
from opdcore.data.presets import PRESETS, prepare_preset
from opdcore.data.prompts import PromptSampler, filter_long, load_prompts, render_prompt
from opdcore.data.reward import AnswerChecker, answers_match
from opdcore.metrics import gap_recovery
from opdcore.parallel.tensor_parallel import parallelize
from opdcore.rollout import SamplingConfig
from opdcore.rollout.hf import HFEngine
from opdcore.trainer import checkpoint, dist, metrics as M
from opdcore.trainer import microbatch, step as S
from opdcore.trainer.logger import MetricsLogger
from opdcore.trainer.probe import continuation_probe
from opdcore.trainer.models import (GenerateThroughRoot, OPDModel, full_state_dict, load_causal_lm, load_tokenizer,
                                    shard, vocab_limit)
from opdcore.trainer.schedule import make_scheduler


# settings a run may change when it resumes: how long, where and how it logs, evaluates and parallelises; every
# other setting (models, data, loss, optimizer, sampling, batch) defines the run, so a resume must keep it
RESUMABLE = ("train.steps", "train.output_dir", "train.resume", "train.save_every", "train.keep_checkpoints",
             "train.log_every", "train.threads", "train.tensor_parallel", "train.progress", "train.tensorboard",
             "train.micro_batch_tokens", "rollout.engine", "rollout.batch_size", "rollout.hf_generate_sharded",
             "rollout.vllm_gpu_memory_utilization", "rollout.vllm_enforce_eager", "eval.", "diagnostics.")


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
        paths = self._resolve_paths()
        self._load_models(paths)
        self._load_data(paths)
        self.checker = AnswerChecker(cfg.data.answer_extraction, cfg.data.answer_regex)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, o.schedule, o.warmup_steps, cfg.train.steps, o.min_lr_ratio)
        self.sampler = PromptSampler(len(self.train_prompts), cfg.train.prompts_per_step, seed=cfg.train.seed,
                                     rank=dist.dp_rank(), world_size=dist.dp_world())
        self.step = 0
        self.baseline: Dict[str, float] = {}  # held-out accuracy before training: student, teacher
        self._maybe_resume()
        self.log = MetricsLogger(self.out, cfg.train.steps, self.step, cfg.train.tensorboard, cfg.train.progress)

    # ---- setup ---------------------------------------------------------------------------------------------------

    def _resolve_paths(self) -> Dict[str, str]:
        m, d = self.cfg.model, self.cfg.data
        if m.student not in PRESETS:
            return {"student": m.student, "teacher": m.teacher, "tokenizer": m.tokenizer or m.student,
                    "train": d.train_path, "eval": d.eval_path}
        cache = os.environ.get("OPDCORE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "opdcore"))
        setup = None
        if dist.is_main():  # one rank builds the preset's models (cached on disk), the others wait
            setup = prepare_preset(m.student, os.path.join(cache, m.student), seed=self.cfg.train.seed)
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
        teacher_hf = load_causal_lm(paths["teacher"], m.dtype, self.device, m.trust_remote_code)
        self.vocab = vocab_limit(student_hf, teacher_hf, self.tokenizer, teacher_tok)
        teacher_hf.requires_grad_(False).eval()
        if m.gradient_checkpointing:
            student_hf.gradient_checkpointing_enable()
        student_hf.train()
        self.sharded = dist.world() > 1
        # rollouts: the training model itself in one process; under FSDP a plain replica synced after each step,
        # or (rollout.hf_generate_sharded) the sharded student itself
        replica = self.sharded and not self.cfg.rollout.hf_generate_sharded and self.cfg.rollout.engine == "hf"
        engine_model = copy.deepcopy(student_hf).eval() if replica else student_hf
        self.replica = engine_model if replica else None
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
        r = self.cfg.rollout
        if r.engine == "vllm":
            from opdcore.rollout.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(paths["student"], self.tokenizer, vocab_limit=self.vocab,
                                     gpu_memory_utilization=r.vllm_gpu_memory_utilization or (
                                         0.4 if self.device.type == "cuda" else 0.15),
                                     enforce_eager=r.vllm_enforce_eager, dtype=m.dtype, seed=self.cfg.train.seed,
                                     # under torchrun vLLM's own (world size 1) process group lives apart
                                     in_process=dist.world() == 1)
        elif self.sharded and r.hf_generate_sharded:  # every forward is a collective: generate in lockstep
            self.engine = HFEngine(GenerateThroughRoot(self.student, gather_once=True), self.tokenizer,
                                   batch_size=r.batch_size, shares_training_model=True, vocab_limit=self.vocab,
                                   synced=True)
        else:
            self.engine = HFEngine(engine_model, self.tokenizer, batch_size=r.batch_size,
                                   shares_training_model=not self.sharded, vocab_limit=self.vocab)

    def _load_data(self, paths: Dict[str, str]) -> None:
        d = self.cfg.data

        def load(path):
            examples = load_prompts(path, prompt_key=d.prompt_key, answer_key=d.answer_key)
            ids = [render_prompt(self.tokenizer, e, d.chat_template_kwargs, d.chat_template) for e in examples]
            kept, dropped = filter_long(ids, d.max_prompt_tokens)
            return [examples[i] for i in kept], [ids[i] for i in kept], dropped

        self.train_prompts, self.train_ids, dropped = load(paths["train"])
        if not self.train_prompts:
            raise ValueError(f"no training prompts left in {paths['train']} after dropping {dropped} longer than "
                             f"data.max_prompt_tokens={d.max_prompt_tokens}")
        self.dropped_prompts = dropped
        if self.cfg.loss.outcome_weight > 0:
            missing = [e.index for e in self.train_prompts if e.answer is None]
            if missing:
                raise ValueError(f"loss.outcome_weight > 0 needs a ground-truth answer for every training prompt; "
                                 f"{len(missing)} in {paths['train']} have none (first row {missing[0]})")
        self.eval_prompts, self.eval_ids = [], []
        if paths["eval"]:
            self.eval_prompts, self.eval_ids, _ = load(paths["eval"])
            n = self.cfg.eval.max_prompts
            self.eval_prompts, self.eval_ids = self.eval_prompts[:n], self.eval_ids[:n]

    # ---- checkpoint / resume -------------------------------------------------------------------------------------

    def _state(self) -> Dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "config": to_dict(self.cfg), "baseline": self.baseline}

    def _write_shards(self, folder: str) -> None:
        """Model and optimizer through torch.distributed.checkpoint, at every world size: each rank writes its
        own shards (no rank ever holds the whole model and optimizer under FSDP), with the global layout in the
        metadata, so a checkpoint loads back at any world size and parallel layout (resharded on load)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.student, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(folder, "shards"))

    def save(self) -> str:
        return checkpoint.save(os.path.join(self.out, "checkpoints"), self.step, self._state(),
                               self.cfg.train.keep_checkpoints, write_shards=self._write_shards)

    def _maybe_resume(self) -> None:
        mode = self.cfg.train.resume
        path = checkpoint.latest(os.path.join(self.out, "checkpoints")) if mode == "auto" else (
            None if mode == "never" else mode)
        if path is None:
            return
        state = checkpoint.load(path)
        changed = changed_settings(state.get("config"), to_dict(self.cfg))
        if changed:
            raise ValueError(f"train.resume: the checkpoint {path} was written by a run with other settings ("
                             + "; ".join(f"{k}: {a!r} then, {b!r} now" for k, a, b in changed)
                             + "); restore them to continue that run, or start a new one in another "
                             "train.output_dir (train.resume=never)")
        if "model" in state:  # a single-process checkpoint of opdcore <= 0.1: model and optimizer in trainer.pt
            if self.sharded:
                raise ValueError(f"checkpoint {path} holds an unsharded model of an older opdcore: resume it in "
                                 f"one process")
            self.student.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(self.student, self.optimizer)
            shards = {"model": model_sd, "optimizer": optim_sd}
            dcp.load(shards, checkpoint_id=os.path.join(path, "shards"))
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

    # ---- the loop ------------------------------------------------------------------------------------------------

    def sync_engine(self) -> None:
        """Give the rollout engine the student's current weights (a no-op when it generates with them)."""
        if not getattr(self.engine, "shares_training_model", False):
            self.engine.update_weights(full_state_dict(self.student, self.sharded))

    def sampling(self) -> SamplingConfig:
        r = self.cfg.rollout
        return SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)

    def compute(self):
        """The autocast context of every model computation (model.autocast)."""
        on = self.cfg.model.autocast != "none"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    def train_step(self) -> Dict[str, float]:
        with self.compute():
            return self._train_step()

    def _train_step(self) -> Dict[str, float]:
        cfg, timer = self.cfg, M.Timer()
        idx = next(self.sampler)
        with timer("rollout"):  # tensor-parallel peers train on the same rollouts: their first rank samples
            rollouts = self.engine.generate([self.train_ids[i] for i in idx], self.sampling()) \
                if dist.tp_rank() == 0 else None
            rollouts = dist.broadcast_in_tp_group(rollouts)
        correct, no_answer = self._grade(rollouts, [self.train_prompts[idx[r.prompt_index]].answer
                                                    for r in rollouts])
        several = several_updates(cfg)
        with timer("score"):
            mbs = microbatch.build(rollouts, cfg.train.micro_batch_tokens, self.device,
                                   min_count=cfg.train.mini_batches)
            scored = [S.score(self.student, self.teacher, mb, cfg) if mb is not None else None for mb in mbs]
            sets = [S.token_set(sc, mb, cfg) if mb is not None else None for sc, mb in zip(scored, mbs)]
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
        outcome = S.outcome_terms(mbs, scored, advantages)
        correction = [S.rollout_correction(mb, sc, cfg.loss.rollout_is_cap) if mb is not None else None
                      for mb, sc in zip(mbs, scored)] if cfg.loss.rollout_is_cap else None
        with timer("update"):
            updates = []
            for _ in range(cfg.train.update_epochs):
                for gi, g in enumerate(groups):
                    part = [mbs[i] for i in g]
                    weights = S.token_weights(part, lengths, cfg.loss.aggregation, float(sizes[2 * gi]),
                                              float(sizes[2 * gi + 1]), dist.world())
                    if correction is not None:
                        weights = [w if w is None else w * correction[i] for w, i in zip(weights, g)]
                    updates.append(S.update(self.student, self.optimizer, part, [sets[i] for i in g], weights, cfg,
                                            self.params, [outcome[i] for i in g], teacher=self.teacher,
                                            policy=[policy[i] for i in g] if several else None))
            self.scheduler.step()
            upd = S.merge_updates(updates)
        with timer("sync"):
            self.sync_engine()
        self.step += 1
        nb = cfg.diagnostics.position_buckets
        out, self.last_profile = M.step_metrics(rollouts, correct, mbs, scored, sets, upd, timer, self.optimizer,
                                                bucket_width=-(-cfg.rollout.max_new_tokens // nb), num_buckets=nb,
                                                correction=correction, cap=cfg.loss.rollout_is_cap,
                                                no_answer=no_answer)
        return out

    def _grade(self, rollouts, answers):
        """(correct, no_answer) per rollout: 1/0 against its gold answer (NaN where the prompt has none), and
        whether data.answer_extraction found any answer in the response."""
        preds = [self.checker.extract(self.tokenizer.decode(r.response_ids, skip_special_tokens=True))
                 for r in rollouts]
        correct = [float(answers_match(p, a)) if a is not None else float("nan") for p, a in zip(preds, answers)]
        return correct, [p is None for p in preds]

    def evaluate(self, engine=None, split=None) -> Dict[str, float]:
        """Held-out accuracy of the student (or of the model behind `engine`); this rank evaluates the prompts
        r, r + n, ... for split = (r, n), by default (rank, world)."""
        e = self.cfg.eval
        r, n = split or (dist.rank(), dist.world())
        mine = list(range(r, len(self.eval_ids), n))
        if not self.eval_ids:
            return {}
        sampling = SamplingConfig(n=e.n, temperature=e.temperature,
                                  top_p=1.0, max_new_tokens=e.max_new_tokens or self.cfg.rollout.max_new_tokens)
        engine = engine or self.engine
        # a synced engine joins the other ranks' generation even without prompts of its own
        with self.compute():
            rollouts = engine.generate([self.eval_ids[i] for i in mine], sampling) \
                if mine or getattr(engine, "synced", False) else []
        correct, no_answer = self._grade(rollouts, [self.eval_prompts[mine[r.prompt_index]].answer
                                                    for r in rollouts])
        graded = [c for c in correct if c == c]  # prompts without an answer are generated, not scored
        total, count, unscored, missing = dist.all_reduce([sum(graded), len(graded), len(correct) - len(graded),
                                                           sum(no_answer)])
        out = {f"accuracy_avg@{e.n}": float(total / count) if count else float("nan"),
               "eval_responses": float(count), "eval_no_answer_fraction": float(missing / max(count + unscored, 1))}
        if unscored:
            out["eval_unscored_responses"] = float(unscored)
        return out

    def run(self) -> Dict[str, float]:
        cfg = self.cfg
        if dist.is_main():
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.json"), "w") as f:
                import json

                json.dump(to_dict(cfg), f, indent=2)
            self.log.message(f"opdcore OPD: {len(self.train_prompts)} train prompts ({self.dropped_prompts} too long "
                             f"dropped), {len(self.eval_prompts)} eval prompts, world {dist.world()}, "
                             f"{self.threads} threads/rank, vocab {self.vocab}")
        if self.step == 0 and self.eval_prompts:
            start = self.evaluate()
            self.log.log(0, start, kind="eval")
            self.log.message(f"step 0: eval {start}")
            self.baseline = {"student": start[self._acc_key()]}
            self._evaluate_teacher()
            self.probe()
        while self.step < cfg.train.steps:
            m = self.train_step()
            if self.step % cfg.train.log_every == 0:
                self.log.log(self.step, m)
                self.log.log_profile(self.step, self.last_profile)
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                ev = self.evaluate()
                self.log.log(self.step, ev, kind="eval")
                self.log.message(f"step {self.step}: eval {ev}  train acc {m.get('train_accuracy', float('nan')):.3f}")
            if cfg.diagnostics.probe_every and self.step % cfg.diagnostics.probe_every == 0 \
                    and self.step < cfg.train.steps:
                self.probe()
            if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                self.save()
        final = self.evaluate()
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
        acc = self.evaluate(self._teacher_engine(), split=(dist.dp_rank(), dist.dp_world()))[self._acc_key()]
        self.baseline["teacher"] = acc
        self.log.log(0, {"teacher_accuracy": acc}, kind="eval")
        self.log.message(f"step 0: teacher accuracy {acc:.4f}")

    def probe(self) -> None:
        """The teacher continuation probe on held-out prompts (diagnostics.probe_*), logged as kind "probe"."""
        d = self.cfg.diagnostics
        if not (d.probe_every and self.eval_ids):
            return
        answered = [i for i, e in enumerate(self.eval_prompts) if e.answer is not None][:d.probe_prompts]
        mine = answered[dist.dp_rank()::dist.dp_world()]  # the probe compares accuracies: prompts with answers

        def check(i, response_ids):
            text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
            return self.checker(text, self.eval_prompts[mine[i]].answer)

        with self.compute():
            res = continuation_probe(self.engine, self._teacher_engine(), [self.eval_ids[i] for i in mine], check,
                                     d.probe_cuts, self.cfg.eval.max_new_tokens or self.cfg.rollout.max_new_tokens,
                                     temperature=self.cfg.rollout.temperature,
                                     reduce=lambda xs: dist.all_reduce(xs).tolist(),
                                     share=dist.broadcast_in_tp_group)
        self.log.log(self.step, res, kind="probe")
        adv = ", ".join(f"{k.split('@')[1]}: {v:+.3f}" for k, v in res.items() if k.startswith("probe_advantage@"))
        self.log.message(f"step {self.step}: teacher continuation advantage by cut depth {{{adv}}}")

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
