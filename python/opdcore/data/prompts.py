"""Prompt sets in the common RL layout, their rendering to token ids, and the per-step prompt sampler.

A prompt file (.jsonl, .json or .parquet) holds one row per prompt: the prompt is a string or a list of chat
messages ({"role": ..., "content": ...}); the optional ground-truth answer sits under "answer", "ground_truth" or
the verl layout's nested "reward_model.ground_truth":

    {"prompt": "123+489=", "answer": "612"}
    {"prompt": [{"role": "user", "content": "What is 2+2?"}], "reward_model": {"ground_truth": "4"}}
"""
from __future__ import annotations

import dataclasses
import json
import operator
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

Messages = List[Dict[str, Any]]
Answer = Union[str, List[str], None]

ANSWER_KEYS = ("answer", "ground_truth", "reward_model.ground_truth")
SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclasses.dataclass
class PromptExample:
    """One prompt row: prompt (a string or chat messages), its answer (a string, a list of acceptable strings, or
    None), its 0-based row index in the file, and the raw row (for extra columns such as data_source)."""

    prompt: Union[str, Messages]
    answer: Answer
    index: int
    row: Dict[str, Any]


# ---- loading ----------------------------------------------------------------------------------------------------

def _lookup(row: Dict[str, Any], key: str) -> Tuple[bool, Any]:
    """(found, value) for a key or a dotted path into nested dicts ("reward_model.ground_truth")."""
    if key in row:
        return True, row[key]
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _read_rows(path: Path) -> List[Tuple[Any, str]]:
    """(row, where) pairs; where names the row for error messages ("row 3 (line 5)")."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported prompt file type {suffix!r}; expected one of {SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt/non-parquet files
            raise ValueError(f"{path}: cannot read as Parquet: {e}") from e
        return [(r, f"row {i}") for i, r in enumerate(rows)]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read as UTF-8 text: {e}") from e
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json prompt file must hold a list of rows, got {type(data).__name__}")
        return [(r, f"row {i}") for i, r in enumerate(data)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"row {len(rows)} (line {lineno})"
        try:
            rows.append((json.loads(line), where))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} {where}: invalid JSON: {e}") from e
    return rows


def _check_prompt(value: Any, ctx: str) -> Union[str, Messages]:
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{ctx} is an empty string")
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{ctx} is an empty list of chat messages")
        for j, msg in enumerate(value):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
                raise ValueError(f"{ctx} message {j} must be a dict with string 'role' and 'content', got {msg!r}")
        return [dict(m) for m in value]
    raise ValueError(f"{ctx} must be a string or a list of chat messages, got {type(value).__name__}")


def _check_answer(value: Any, ctx: str) -> Answer:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):  # bool is an int subclass, but never a meaningful answer
        raise ValueError(f"{ctx} must be a string, a number or a list of strings, got bool")
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                          for v in value):
        return [str(v) for v in value]
    raise ValueError(f"{ctx} must be a string, a number or a non-empty list of them, got {value!r}")


def load_prompts(path: Union[str, Path], prompt_key: str = "prompt", answer_key: Optional[str] = None
                 ) -> List[PromptExample]:
    """Read a prompt set from .jsonl, .json (a list of rows) or .parquet.

    prompt_key and answer_key may be dotted paths into nested columns ("extra.question"). With answer_key None
    the answer is the first of "answer", "ground_truth", "reward_model.ground_truth" present in a row (None when
    none is); a named answer_key must be present and non-null in every row. Numeric answers become strings.
    Errors name the file, the row (0-based; JSONL also gives the line) and the key.
    """
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no prompt rows")
    out = []
    for i, (row, where) in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path} {where}: a row must be a JSON object, got {type(row).__name__}")
        found, prompt = _lookup(row, prompt_key)
        if not found or prompt is None:
            raise ValueError(f"{path} {where}: missing prompt key {prompt_key!r} (keys: {sorted(row)})")
        prompt = _check_prompt(prompt, f"{path} {where}: {prompt_key!r}")
        if answer_key is None:
            answer, key = None, ANSWER_KEYS[0]
            for key in ANSWER_KEYS:
                found, answer = _lookup(row, key)
                if found and answer is not None:
                    break
        else:
            key = answer_key
            found, answer = _lookup(row, key)
            if not found or answer is None:
                raise ValueError(f"{path} {where}: missing answer key {answer_key!r} (keys: {sorted(row)})")
        answer = _check_answer(answer, f"{path} {where}: {key!r}")
        out.append(PromptExample(prompt=prompt, answer=answer, index=i, row=row))
    return out


# ---- rendering --------------------------------------------------------------------------------------------------

def render_prompt(tokenizer, example: Union[PromptExample, str, Messages],
                  chat_template_kwargs: Optional[Dict[str, Any]] = None,
                  use_chat_template: Optional[bool] = None) -> List[int]:
    """Token ids of a prompt, ready for generation.

    use_chat_template None means: apply the chat template when the prompt is chat messages or the tokenizer has
    one (a plain string then becomes a single user message); otherwise encode the string with the tokenizer's
    special tokens (e.g. BOS). The template gets add_generation_prompt=True plus chat_template_kwargs (e.g.
    {"enable_thinking": False}), and its text is encoded without adding special tokens again (the template
    writes them), exactly as apply_chat_template(tokenize=True) does.
    """
    prompt = example.prompt if isinstance(example, PromptExample) else example
    is_chat = isinstance(prompt, (list, tuple))
    if not is_chat and not isinstance(prompt, str):
        raise TypeError(f"render_prompt: prompt must be a string or chat messages, got {type(prompt).__name__}")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if use_chat_template is None:
        use_chat_template = is_chat or has_template
    if not use_chat_template:
        if is_chat:
            raise ValueError("render_prompt: chat messages need the chat template (use_chat_template=False given)")
        if chat_template_kwargs:
            raise ValueError("render_prompt: chat_template_kwargs given but the chat template is not applied")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not has_template:
        raise ValueError("render_prompt: the tokenizer has no chat_template; for raw string prompts leave "
                         "use_chat_template unset or False")
    messages = list(prompt) if is_chat else [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **(chat_template_kwargs or {}))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def filter_long(token_lists: Sequence[Sequence[int]], max_prompt_tokens: Optional[int]) -> Tuple[List[int], int]:
    """(indices of prompts with at most max_prompt_tokens tokens, number dropped); None keeps everything."""
    if max_prompt_tokens is None:
        return list(range(len(token_lists))), 0
    if isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be a positive int or None, got {max_prompt_tokens!r}")
    kept = [i for i, t in enumerate(token_lists) if len(t) <= max_prompt_tokens]
    return kept, len(token_lists) - len(kept)


# ---- sampling ---------------------------------------------------------------------------------------------------

def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


class PromptSampler:
    """Deterministic per-step prompt batches for data-parallel training, resumable at the exact position.

        sampler = PromptSampler(len(prompts), global_batch_size=64, seed=0, rank=rank, world_size=world)
        for step in range(steps):
            idx = next(sampler)          # this rank's global_batch_size // world_size prompt indices

    The global stream is the concatenation of per-epoch permutations of range(n), epoch e shuffled by a
    generator seeded with (seed, e); step s takes the next global_batch_size entries of that stream (so a batch
    can straddle two epochs and no prompt is ever skipped), and rank r takes its contiguous slice
    [r * b, (r + 1) * b) with b = global_batch_size // world_size. Every rank computes the same stream, so the
    slices are disjoint and cover the global batch without communication. Within a step an index repeats only
    when n < global_batch_size.

    state_dict() records the global position; load_state_dict() restores it (n, seed and global batch size must
    match; the world size may differ, because the position is global).
    """

    def __init__(self, n: int, global_batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n = _positive_int(n, "n")
        self.global_batch_size = _positive_int(global_batch_size, "global_batch_size")
        self.world_size = _positive_int(world_size, "world_size")
        self.rank = _positive_int(rank, "rank", minimum=0)
        self.seed = _positive_int(seed, "seed", minimum=0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size={self.world_size}, got {self.rank}")
        if self.global_batch_size % self.world_size:
            raise ValueError(f"global_batch_size={self.global_batch_size} must be divisible by "
                             f"world_size={self.world_size}")
        self.epoch = 0  # epoch of the next unread entry
        self.offset = 0  # position of the next unread entry within that epoch's permutation
        self.step = 0  # batches drawn so far
        self._perm: Optional[Tuple[int, np.ndarray]] = None

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1]

    def next_global_batch(self) -> List[int]:
        """The whole global batch of the next step (every rank's slices in rank order); advances the sampler."""
        out: List[int] = []
        while len(out) < self.global_batch_size:
            perm = self._permutation(self.epoch)
            take = min(self.global_batch_size - len(out), self.n - self.offset)
            out.extend(perm[self.offset:self.offset + take].tolist())
            self.offset += take
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        self.step += 1
        return out

    def __next__(self) -> List[int]:
        """This rank's prompt indices for the next step."""
        b = self.local_batch_size
        return self.next_global_batch()[self.rank * b:(self.rank + 1) * b]

    def __iter__(self) -> "PromptSampler":
        return self

    def state_dict(self) -> Dict[str, int]:
        return {"n": self.n, "global_batch_size": self.global_batch_size, "seed": self.seed,
                "epoch": self.epoch, "offset": self.offset, "step": self.step}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        for key in ("n", "global_batch_size", "seed"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"PromptSampler.load_state_dict: checkpoint has {key}={state.get(key)!r}, this "
                                 f"sampler has {key}={getattr(self, key)!r}; resuming would change the prompt order")
        epoch, offset, step = (_positive_int(state.get(k), f"state[{k!r}]", minimum=0)
                               for k in ("epoch", "offset", "step"))
        if offset >= self.n:
            raise ValueError(f"PromptSampler.load_state_dict: offset={offset} out of range for n={self.n}")
        self.epoch, self.offset, self.step = epoch, offset, step
