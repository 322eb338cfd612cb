"""prepare_default_setup: the embedded default run's tokenizer, teacher, student and prompt files, cached on disk.

Everything is generated locally (no download): a character tokenizer, disjoint sets of addition problems, a
teacher SFT-trained to high held-out accuracy and a student of the same family stopped early, so OPD has room
to lift it toward the teacher. The result lives in cache_dir/default-<hash of all settings>; a call with the
same settings returns it at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from opdcore.data.synthetic import CHARACTERS, SPECIAL_TOKENS, build_char_tokenizer, make_addition_problems, tiny_llama

log = logging.getLogger(__name__)

# Bump when the task text, the tokenizer or the training recipe changes: old caches then stop matching.
FORMAT_VERSION = 1

DEFAULT_TEACHER = {"hidden": 128, "layers": 2, "heads": 4, "intermediate": 256}
# head_dim 32 (not 16): the smallest head size vLLM's CPU attention supports, so rollout.engine=vllm runs too
DEFAULT_STUDENT = {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 256}


@dataclasses.dataclass(frozen=True)
class DefaultSetup:
    """Paths (strings) and measured accuracies of a prepared default setup.

    teacher_dir and student_dir are Hugging Face model directories (config, safetensors weights, generation
    config and the tokenizer); tokenizer_dir holds the tokenizer alone. The prompt files are JSONL rows
    {"prompt": "123+489=", "answer": "612"} (raw string prompts, no chat template) for load_prompts;
    sft_data_path also has the target "response" the models were trained on. The three problem sets
    (SFT, OPD train, eval) are disjoint. Accuracies are greedy exact-answer accuracy on the eval prompts.
    """

    root: str
    tokenizer_dir: str
    teacher_dir: str
    student_dir: str
    train_prompts_path: str
    eval_prompts_path: str
    sft_data_path: str
    teacher_accuracy: float
    student_accuracy: float
    student_sft_steps: int  # steps the student actually trained (early stopping may end it before the budget)
    max_new_tokens: int  # enough for every target response of the task plus a margin
    settings: Dict[str, Any]
    build_seconds: float  # wall time of the build (not of a cache hit)
    from_cache: bool = False


def _model_settings(name: str, given: Optional[Mapping[str, Any]], default: Dict[str, Any]) -> Dict[str, Any]:
    unknown = set(given or {}) - set(default)
    if unknown:
        raise ValueError(f"prepare_default_setup: unknown {name} setting(s) {sorted(unknown)}; "
                         f"expected some of {sorted(default)}")
    return {**default, **(given or {})}


def _write_jsonl(path: Path, rows: List[Dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An inter-process lock (e.g. torchrun ranks on one machine), released by the OS if the holder dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# where each artefact lives inside a setup directory
_PATHS = {"tokenizer_dir": "tokenizer", "teacher_dir": "teacher", "student_dir": "student",
          "train_prompts_path": "train.jsonl", "eval_prompts_path": "eval.jsonl", "sft_data_path": "sft.jsonl"}


def _setup(root: Path, meta: Dict[str, Any], from_cache: bool) -> DefaultSetup:
    paths = {field: str(root / name) for field, name in _PATHS.items()}
    return DefaultSetup(root=str(root), **paths, **meta, from_cache=from_cache)


def _load_cached(final: Path) -> Optional[DefaultSetup]:
    try:
        setup = _setup(final, json.loads((final / "setup.json").read_text()), from_cache=True)
        missing = [n for n in _PATHS.values() if not (final / n).exists()]
        if missing:
            raise ValueError(f"missing {missing}")
        return setup
    except (OSError, ValueError, TypeError) as e:
        log.warning("ignoring unusable cache %s (%s); rebuilding it", final, e)
        return None


class NotCached(LookupError):
    """The preset is not in the cache (and building it was not asked for)."""


def cached_setup(cache_dir, prefix: str, settings: Dict[str, Any],
                 build: Optional[Callable[[Path], Dict[str, Any]]]) -> DefaultSetup:
    """The setup cached in cache_dir/<prefix>-<hash of settings>, built by build(tmp_dir) when missing (build
    None: raise NotCached instead).

    build writes the artefacts named in _PATHS into the directory it is given and returns setup.json's content.
    The cache is built in a temporary directory and renamed into place when complete, so a killed run never
    leaves a directory that a later call would use; concurrent callers (torchrun ranks) serialise on a lock
    file and the later ones get the cache; an unusable cache is rebuilt.
    """
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"{prefix}-{key}"
    if final.is_dir() and (hit := _load_cached(final)) is not None:
        return hit
    if build is None:
        raise NotCached(str(final))
    with _exclusive(cache_dir / f".{prefix}-{key}.lock"):
        if final.is_dir():  # another process may have finished while we waited, or the cache is broken
            if (hit := _load_cached(final)) is not None:
                return hit
            shutil.rmtree(final)
        for stale in glob.glob(str(cache_dir / f".{prefix}-{key}.tmp-*")):  # left by a killed run (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{prefix}-{key}.tmp-"))
        try:
            meta = build(tmp)
            (tmp / "setup.json").write_text(json.dumps(meta, indent=1))  # last: marks the directory complete
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _setup(final, meta, from_cache=False)


def prepare_default_setup(cache_dir, *, seed: int = 0, digits: int = 3,
                          teacher: Optional[Mapping[str, Any]] = None, student: Optional[Mapping[str, Any]] = None,
                          teacher_sft_steps: int = 500, student_sft_steps: int = 600,
                          student_target_accuracy: Optional[float] = 0.15, student_check_every: int = 5,
                          student_check_max_loss: float = 0.5,
                          n_sft: int = 4000, n_train: int = 2000, n_dev: int = 200, n_eval: int = 400,
                          batch_size: int = 32, lr: float = 2e-3, warmup: int = 20,
                          progress: bool = True, build: bool = True) -> DefaultSetup:
    """Build (or load from cache) the default OPD setup on the synthetic addition task; see DefaultSetup.

    teacher/student override the model shapes (keys hidden, layers, heads, intermediate; defaults
    DEFAULT_TEACHER / DEFAULT_STUDENT). Both are SFT-trained on the same n_sft problems with the same recipe
    (batch_size, lr, warmup steps then cosine decay). The teacher trains teacher_sft_steps steps. The student's
    schedule spans student_sft_steps, but with student_target_accuracy set it stops at the first check (every
    student_check_every steps, once the batch loss is below student_check_max_loss: before that it gets
    ~nothing right and checking only costs time) where its greedy accuracy on n_dev separate problems reaches
    that target: its accuracy rises from ~0 to ~1 within a couple of hundred steps, so a fixed step count
    would land anywhere in between depending on seed and settings. None trains the full budget.

    Every setting, and FORMAT_VERSION, goes into the cache key (see cached_setup). Set
    torch.set_num_threads(1) first when cores are shared: two threads per process can be far slower.
    """
    for name, value in (("n_sft", n_sft), ("n_train", n_train), ("n_dev", n_dev), ("n_eval", n_eval),
                        ("teacher_sft_steps", teacher_sft_steps), ("student_sft_steps", student_sft_steps),
                        ("student_check_every", student_check_every), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"prepare_default_setup: {name} must be an int >= 1, got {value!r}")
    if student_target_accuracy is not None and not 0.0 < student_target_accuracy <= 1.0:
        raise ValueError(f"student_target_accuracy must be in (0, 1] or None, got {student_target_accuracy}")
    settings = {
        "format_version": FORMAT_VERSION,
        "vocab_sha": hashlib.sha256("\0".join(SPECIAL_TOKENS + CHARACTERS).encode()).hexdigest()[:16],
        "seed": seed, "digits": digits,
        "teacher": _model_settings("teacher", teacher, DEFAULT_TEACHER),
        "student": _model_settings("student", student, DEFAULT_STUDENT),
        "teacher_sft_steps": teacher_sft_steps, "student_sft_steps": student_sft_steps,
        "student_target_accuracy": student_target_accuracy, "student_check_every": student_check_every,
        "student_check_max_loss": student_check_max_loss,
        "n_sft": n_sft, "n_train": n_train, "n_dev": n_dev, "n_eval": n_eval,
        "batch_size": batch_size, "lr": lr, "warmup": warmup,
    }
    return cached_setup(cache_dir, "default", settings,
                        (lambda out: _build(out, settings, progress)) if build else None)


def _build(out: Path, settings: Dict[str, Any], progress: bool) -> Dict[str, Any]:
    """Write tokenizer, prompt files and both models into out (names as in _PATHS); returns setup.json's
    content: everything DefaultSetup holds except the paths, so the cache directory can be moved."""
    from opdcore.sft import greedy_accuracy, sft_train

    t0 = time.perf_counter()
    s, seed = settings, settings["seed"]
    tok = build_char_tokenizer(out / "tokenizer")

    # One draw of distinct problems, split into disjoint sets.
    sizes = {k: s[f"n_{k}"] for k in ("eval", "dev", "train", "sft")}
    problems = make_addition_problems(sum(sizes.values()), seed, digits=s["digits"])
    split, start = {}, 0
    for name, n in sizes.items():
        split[name], start = problems[start:start + n], start + n
    _write_jsonl(out / "eval.jsonl", [{"prompt": p["prompt"], "answer": p["answer"]} for p in split["eval"]])
    _write_jsonl(out / "train.jsonl", [{"prompt": p["prompt"], "answer": p["answer"]} for p in split["train"]])
    _write_jsonl(out / "sft.jsonl", split["sft"])
    examples = [(p["prompt"], p["response"]) for p in split["sft"]]

    # Longest prompt + response (+eos) of the task, so generation never cuts a correct answer.
    longest = max(len(tok(p["prompt"] + p["response"])["input_ids"]) + 1 for p in problems)
    max_new_tokens = max(len(tok(p["response"], add_special_tokens=False)["input_ids"]) for p in problems) + 8
    max_positions = max(128, 2 * longest)

    def accuracy(model, rows):
        return greedy_accuracy(model, tok, [p["prompt"] for p in rows], [p["answer"] for p in rows],
                               max_new_tokens=max_new_tokens, batch_size=256)

    def train(name, shape, steps, model_seed, stop=None):
        model = tiny_llama(len(tok), shape["hidden"], shape["layers"], shape["heads"], shape["intermediate"],
                           max_positions, tokenizer=tok, seed=model_seed)
        callback = None if stop is None else (lambda step, loss: stop(model, step, loss))
        losses = sft_train(model, tok, examples, steps=steps, batch_size=s["batch_size"], lr=s["lr"],
                           warmup=s["warmup"], seed=model_seed, max_len=longest, progress=progress,
                           desc=f"{name} SFT", callback=callback)
        model.save_pretrained(str(out / name))
        tok.save_pretrained(str(out / name))
        return model, len(losses)

    teacher, _ = train("teacher", s["teacher"], s["teacher_sft_steps"], seed * 1000 + 1)
    teacher_acc = accuracy(teacher, split["eval"])
    log.info("teacher: held-out accuracy %.3f", teacher_acc)

    def reached_target(model, step, loss):
        if (s["student_target_accuracy"] is None or step % s["student_check_every"]
                or loss > s["student_check_max_loss"]):
            return False
        return accuracy(model, split["dev"]) >= s["student_target_accuracy"]

    student, student_steps = train("student", s["student"], s["student_sft_steps"], seed * 1000 + 2, reached_target)
    student_acc = accuracy(student, split["eval"])
    log.info("student: held-out accuracy %.3f after %d SFT steps", student_acc, student_steps)
    return {
        "teacher_accuracy": teacher_acc, "student_accuracy": student_acc, "student_sft_steps": student_steps,
        "max_new_tokens": max_new_tokens, "settings": settings, "build_seconds": round(time.perf_counter() - t0, 1),
    }
