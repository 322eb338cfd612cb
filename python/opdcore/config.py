"""The trainer's configuration: one dataclass tree, loaded from YAML with `key=value` command-line overrides.

Defaults are the reference hyperparameters of METHOD.md section 5 (1.5B-4B models). The embedded synthetic
default run (`opdcore train` with no arguments) layers python/opdcore/configs/synthetic.yaml on top.
Every value is checked before any model loads; an unknown key is an error that suggests the closest known one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from opdcore.presets import PRESETS
from opdcore.data.reward import EXTRACTIONS, AnswerChecker
from opdcore.objectives.aggregation import AGGREGATIONS
from opdcore.ops import DIVERGENCES, STRATEGIES, STRATEGY_ALIASES, WEIGHT_MODES

CONFIGS = os.path.join(os.path.dirname(__file__), "configs")  # the presets' YAML files
SYNTHETIC_PRESET = os.path.join(CONFIGS, "synthetic.yaml")


@dataclass
class ModelConfig:
    # a Hugging Face path or name, or a preset built offline and cached: synthetic (the embedded default task's
    # models) or smollm2 (SmolLM2-135M-Instruct and a task-specialised teacher; --config smollm2)
    student: str = "synthetic"
    teacher: str = "synthetic"
    tokenizer: Optional[str] = None  # default: the student's
    dtype: str = "float32"  # float32 | bfloat16 (weights and compute)
    # bfloat16: float32 weights (and optimizer state) with rollouts, scoring and the update under bfloat16
    # autocast; 2.5-5x faster matmuls where the CPU has AVX-512-BF16 or AMX, or on a GPU
    autocast: str = "none"
    # same | float32 | bfloat16: the teacher is never trained, so bfloat16 storage halves its memory; under
    # bfloat16 autocast its matmuls run in bfloat16 either way (its residual stream then does too)
    teacher_dtype: str = "same"
    gradient_checkpointing: bool = False  # recompute each layer in the backward: activations of one layer at a time
    teacher_sharding: str = "replicate"  # replicate | fsdp (with world size > 1)
    trust_remote_code: bool = False


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf (transformers generate) | vllm
    n: int = 4  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 7168
    batch_size: int = 64  # prompts per generate call (hf)
    # hf under FSDP: false generates with a full replica of the student synced after every step; true with the
    # sharded student itself, its parameters gathered once per generate call (no second copy of the model)
    hf_generate_sharded: bool = False
    # the share of GPU memory vLLM reserves (weights + KV cache); on the CPU build, of host memory. null: 0.4 on a
    # GPU, 0.15 on the CPU (0.4 there would hold 40% of RAM for a KV cache a small model never fills)
    vllm_gpu_memory_utilization: Optional[float] = None
    # vLLM's KV cache in GiB, instead of a share of memory (on the CPU a small model needs far less than 0.15 of
    # RAM: 32 responses of 100 tokens of SmolLM2-135M fill 0.15 GiB); vLLM's context is then capped at the
    # longest prompt plus max_new_tokens, so the cache need hold only one such sequence at least
    vllm_kv_cache_gib: Optional[float] = None
    vllm_enforce_eager: bool = True


@dataclass
class DataConfig:
    train_path: str = ""  # JSONL or Parquet; empty with a preset (model.student=synthetic|smollm2): its task
    eval_path: str = ""
    prompt_key: str = "prompt"
    answer_key: Optional[str] = None  # default: answer, ground_truth or reward_model.ground_truth
    # how a response's answer is found: marked (\\boxed{}, "Answer:", "answer is", "####"), last_number,
    # marked_or_last_number, regex (data.answer_regex: its first group), exact (the whole response)
    answer_extraction: str = "marked"
    answer_regex: str = ""
    max_prompt_tokens: int = 1024  # longer prompts are dropped (and counted)
    chat_template: Optional[bool] = None  # None: use it when the tokenizer has one or the prompt is chat messages
    chat_template_kwargs: dict = field(default_factory=dict)  # e.g. {enable_thinking: false}


@dataclass
class LossConfig:
    topk: int = 16  # 0: sampled-token OPD (METHOD.md 2.1)
    strategy: str = "student"  # student | teacher | intersection | union | symmetric_difference (+ fork aliases)
    weight_mode: str = "auto"  # auto (student_p; student_p_raw for symmetric_difference) or a WEIGHT_MODES name
    log_ratio_clip: float = 0.0  # 0: off
    aggregation: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    aggregation_norm: int = 0  # seq-mean-token-sum-norm's constant (verl's loss_scale_factor); 0: max_new_tokens
    renorm_kl: bool = False  # exact renormalised top-k reverse KL (METHOD.md 2.4)
    tail_kl: bool = False  # tail-aware top-k KL: the reverse KL of the set's ids plus a rest bin (METHOD.md 2.4)
    dense: str = "none"  # none | forward_kl | reverse_kl | jsd: full-vocabulary divergence (METHOD.md 2.5)
    dense_beta: float = 0.5  # the JSD's beta (TRL's convention), in (0, 1)
    teacher_temperature: float = 1.0
    outcome_weight: float = 0.0  # hybrid (METHOD.md 2.6): + w * GRPO-normalised verifiable reward
    # PPO clipping of the reward-weighted losses when a batch gets several updates (train.update_epochs or
    # train.mini_batches > 1; with one update the ratio is exactly 1 and clipping is inert)
    ppo_clip: float = 0.2  # the ratio p / p_rollout is clipped to [1 - ppo_clip, 1 + ppo_clip_high]
    ppo_clip_high: Optional[float] = None  # None: ppo_clip; larger: DAPO's clip-higher
    ppo_dual_clip: float = 3.0  # negative advantages: the loss is capped at -ppo_dual_clip * A (0: off)
    fused_lm_head: bool = True  # loss on hidden states + LM head, never [tokens, vocab] logits
    # rollout / trainer mismatch (e.g. vLLM's sampler vs the trainer's forward): weight each token's loss by the
    # truncated importance ratio min(p_trainer(y_t) / p_rollout(y_t), cap) (0: off)
    rollout_is_cap: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 1e-6
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine/linear decay floor as a fraction of lr


@dataclass
class TrainConfig:
    steps: int = 200
    prompts_per_step: int = 64  # global, across data-parallel ranks
    micro_batch_tokens: int = 16384  # token budget of one forward/backward
    seed: int = 0
    output_dir: str = "runs/opd"
    save_every: int = 50  # 0: only the final model
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest intact checkpoint in output_dir) | never | a checkpoint path
    # a new run refuses an output_dir that holds another run (its checkpoints would be pruned, its metrics mixed);
    # true: that run is moved aside to <output_dir>.replaced-<time> first
    overwrite: bool = False
    log_every: int = 1
    threads: int = 0  # torch threads per process; 0: cores / local world size
    tensor_parallel: int = 1  # ranks per tensor-parallel group (DTensor); the world is data-parallel x this
    update_epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass, each on its share of the batch's responses
    # one process, one update per batch, a fused teacher head: the student's top-k set comes from the update's own
    # forward and the teacher's log-probs on it from its scoring pass's hidden states (k dot products per token),
    # instead of a separate no-grad student forward (and, with loss.dense, a second teacher forward)
    score_in_update: bool = True
    # several responses per row of the models' forward (restarting position ids; transformers' packed-sequence
    # masks keep them apart) instead of one right-padded response per row: fewer padding tokens computed. Used
    # only where a check at load time shows both models keep packed sequences apart (trainer.models.packs_rows)
    pack_rows: bool = True
    progress: bool = True
    tensorboard: bool = True  # when tensorboard is installed


@dataclass
class EvalConfig:
    every: int = 25  # 0: only before and after training
    max_prompts: int = 256
    n: int = 1  # avg@n
    temperature: float = 0.0  # 0: greedy
    max_new_tokens: int = 0  # 0: rollout.max_new_tokens
    # responses saved at every eval with per-token student / teacher log-probs (samples/step_N.jsonl); 0: none
    save_samples: int = 8


@dataclass
class DiagnosticsConfig:
    position_buckets: int = 8  # response-position buckets of the per-position profiles (positions.jsonl)
    eval_teacher: bool = True  # evaluate the teacher once before training: gap recovery rate in the final eval
    probe_every: int = 0  # teacher continuation probe at step 0, every this many steps and at the end (0: off)
    probe_prompts: int = 32  # held-out prompts the probe cuts the student's responses to
    probe_cuts: tuple = (0.0, 0.25, 0.5, 0.75)  # cut depths, fractions of each response's length


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)


CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.autocast": ("none", "bfloat16"),
    "model.teacher_dtype": ("same", "float32", "bfloat16"),
    "model.teacher_sharding": ("replicate", "fsdp"),
    "rollout.engine": ("hf", "vllm"),
    "data.answer_extraction": EXTRACTIONS,
    "loss.strategy": STRATEGIES + tuple(STRATEGY_ALIASES),
    "loss.weight_mode": ("auto",) + WEIGHT_MODES,
    "loss.aggregation": AGGREGATIONS,
    "loss.dense": ("none",) + DIVERGENCES,
    "optim.schedule": ("constant", "cosine", "linear"),
}

# (key, predicate, what is expected)
RANGES = [
    ("rollout.n", lambda v: v >= 1, ">= 1"),
    ("rollout.temperature", lambda v: 0 < v <= 10, "in (0, 10]"),
    ("rollout.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("rollout.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("rollout.batch_size", lambda v: v >= 1, ">= 1"),
    ("rollout.vllm_gpu_memory_utilization", lambda v: v is None or 0 < v <= 1, "in (0, 1] (null: automatic)"),
    ("rollout.vllm_kv_cache_gib", lambda v: v is None or v > 0, "> 0 (null: a share of memory)"),
    ("data.max_prompt_tokens", lambda v: v >= 1, ">= 1"),
    ("loss.topk", lambda v: v >= 0, ">= 0 (0: sampled-token)"),
    ("loss.log_ratio_clip", lambda v: v >= 0, ">= 0"),
    ("loss.teacher_temperature", lambda v: 0 < v <= 10, "in (0, 10]"),
    ("loss.outcome_weight", lambda v: v >= 0, ">= 0"),
    ("loss.dense_beta", lambda v: 0 < v < 1, "in (0, 1)"),
    ("loss.aggregation_norm", lambda v: v >= 0, ">= 0 (0: rollout.max_new_tokens)"),
    ("loss.rollout_is_cap", lambda v: v == 0 or v >= 1, ">= 1 (0: off)"),
    ("loss.ppo_clip", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("loss.ppo_clip_high", lambda v: v is None or v >= 0, ">= 0 (null: loss.ppo_clip)"),
    ("loss.ppo_dual_clip", lambda v: v == 0 or v > 1, "> 1 (0: off)"),
    ("optim.lr", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two values in [0, 1)"),
    ("optim.weight_decay", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.grad_clip", lambda v: v >= 0, ">= 0 (0: off)"),
    ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("train.steps", lambda v: v >= 0, ">= 0"),
    ("train.prompts_per_step", lambda v: v >= 1, ">= 1"),
    ("train.micro_batch_tokens", lambda v: v >= 1, ">= 1"),
    ("train.save_every", lambda v: v >= 0, ">= 0"),
    ("train.keep_checkpoints", lambda v: v >= 1, ">= 1"),
    ("train.log_every", lambda v: v >= 1, ">= 1"),
    ("train.threads", lambda v: v >= 0, ">= 0"),
    ("train.tensor_parallel", lambda v: v >= 1, ">= 1"),
    ("train.update_epochs", lambda v: v >= 1, ">= 1"),
    ("train.mini_batches", lambda v: v >= 1, ">= 1"),
    ("eval.every", lambda v: v >= 0, ">= 0"),
    ("eval.max_prompts", lambda v: v >= 0, ">= 0"),
    ("eval.n", lambda v: v >= 1, ">= 1"),
    ("eval.temperature", lambda v: 0 <= v <= 10, "in [0, 10] (0: greedy)"),
    ("eval.max_new_tokens", lambda v: v >= 0, ">= 0"),
    ("eval.save_samples", lambda v: v >= 0, ">= 0"),
    ("diagnostics.position_buckets", lambda v: v >= 1, ">= 1"),
    ("diagnostics.probe_every", lambda v: v >= 0, ">= 0 (0: off)"),
    ("diagnostics.probe_prompts", lambda v: v >= 1, ">= 1"),
    ("diagnostics.probe_cuts", lambda v: len(v) >= 1 and all(0 <= c < 1 for c in v), "fractions in [0, 1)"),
]


class ConfigError(ValueError):
    """A bad configuration key or value (raised before any model loads)."""


def _fields(obj) -> dict:
    return {f.name: f for f in dataclasses.fields(obj)}


def flat_items(cfg: Config):
    """Yield (dotted key, value, comment-free type name) for every leaf."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(sub))
        for f in dataclasses.fields(sub):
            yield f"{section.name}.{f.name}", getattr(sub, f.name), hints[f.name]


def _coerce(key: str, value: Any, hint) -> Any:
    """Check value against the field's type; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif hint is tuple or origin is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            return tuple(float(v) for v in value)
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - a new field type needs a rule here
        raise TypeError(f"config field {key} has unsupported type {hint}")
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} expects {name}, got {value!r} ({type(value).__name__})")


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted key (`loss.topk`) with type checking; unknown keys suggest the closest known one."""
    known = [k for k, _, _ in flat_items(cfg)]
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see --help for every key"
        raise ConfigError(f"unknown config key {key!r}{hint}")
    section, name = key.split(".", 1)
    sub = getattr(cfg, section)
    hint = typing.get_type_hints(type(sub))[name]
    setattr(sub, name, _coerce(key, value, hint))


def _apply_mapping(cfg: Config, mapping: dict, prefix: str = "") -> None:
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "." not in key:  # a section
            sections = [f.name for f in dataclasses.fields(cfg)]
            if key not in sections:
                close = difflib.get_close_matches(key, sections, n=1)
                raise ConfigError(f"unknown config section {key!r}" + (f"; did you mean {close[0]!r}?" if close else
                                  f"; sections are {', '.join(sections)}"))
            _apply_mapping(cfg, v, key + ".")
        else:
            set_key(cfg, key, v)


def validate(cfg: Config) -> Config:
    """Check choices and ranges; raises ConfigError naming the key."""
    values = {k: v for k, v, _ in flat_items(cfg)}
    for key, value in values.items():  # inf or nan would pass most range checks and fail mid-run
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else
                                                                       (value,))):
            raise ConfigError(f"{key} must be a finite number; got {value!r}")
    for key, choices in CHOICES.items():
        if values[key] not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {values[key]!r}")
    for key, ok, what in RANGES:
        if not ok(values[key]):
            raise ConfigError(f"{key} must be {what}; got {values[key]!r}")
    m = cfg.model
    if m.student in PRESETS and cfg.data.train_path:
        raise ConfigError(f"data.train_path is set but model.student={m.student} builds its own task; "
                          "set model.student/model.teacher to Hugging Face models to train on your data")
    if m.student not in PRESETS and not cfg.data.train_path:
        raise ConfigError(f"data.train_path is required with a Hugging Face student (model.student={m.student!r})")
    if (m.student in PRESETS or m.teacher in PRESETS) and m.student != m.teacher:
        raise ConfigError(f"a preset names both models: set model.student and model.teacher to the same preset "
                          f"({', '.join(PRESETS)}) or both to real models; got {m.student!r} and {m.teacher!r}")
    if cfg.rollout.hf_generate_sharded and (cfg.rollout.engine != "hf" or cfg.train.tensor_parallel > 1):
        raise ConfigError("rollout.hf_generate_sharded needs rollout.engine=hf and train.tensor_parallel=1 (each "
                          "data-parallel rank samples its own rollouts from the FSDP-sharded student)")
    if cfg.data.answer_extraction == "regex":
        try:
            AnswerChecker("regex", cfg.data.answer_regex)
        except ValueError as e:
            raise ConfigError(f"data.answer_regex: {e}") from e
    for key in ("renorm_kl", "tail_kl"):
        if getattr(cfg.loss, key) and cfg.loss.topk == 0:
            raise ConfigError(f"loss.{key} needs loss.topk > 0")
    chosen = [n for n, on in (("loss.renorm_kl", cfg.loss.renorm_kl), ("loss.tail_kl", cfg.loss.tail_kl),
                              ("loss.dense", cfg.loss.dense != "none")) if on]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} each choose the loss: set one of them")
    return cfg


def several_updates(cfg: Config) -> bool:
    """Whether a rollout batch gets more than one optimizer step (the PPO ratio then leaves 1)."""
    return cfg.train.update_epochs * cfg.train.mini_batches > 1


def load_config(path: Optional[str] = None, overrides: tuple = ()) -> Config:
    """Defaults <- YAML file (optional) <- `key=value` overrides (values parsed as YAML scalars/lists)."""
    cfg = Config()
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
        _apply_mapping(cfg, data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (for example loss.topk=8)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from e
        set_key(cfg, key.strip(), value)
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def help_text() -> str:
    """Every key with its default, grouped by section (the text of `--help`)."""
    lines, section = [], None
    for key, value, hint in flat_items(Config()):
        s = key.split(".")[0]
        if s != section:
            lines.append(f"\n[{s}]")
            section = s
        choices = CHOICES.get(key)
        extra = f"  one of: {', '.join(choices)}" if choices else ""
        lines.append(f"  {key} = {value!r}{extra}")
    return "\n".join(lines)
