"""Off-policy cold start (METHOD.md 4): when the teacher's distribution on the student's own states barely
overlaps the student's, OPD loses its benefit early. The teacher first writes responses to a prompt set; a
rejection filter drops truncated, answer-less and repetitive ones (and wrong ones, where answers are known); the
student is SFT-trained on the rest; OPD then continues on prompts the SFT never saw."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from opdcore.data.prompts import PromptExample
from opdcore.data.reward import extract_answer, verify
from opdcore.rollout import Rollout, RolloutEngine, SamplingConfig


def repeats_at_end(ids: Sequence[int], min_repeats: int = 4, min_span: int = 32, max_period: int = 256) -> bool:
    """True when the response ends in a loop: its last tokens repeat one block of some period p <= max_period at
    least min_repeats times, over at least min_span tokens (so "1000" or a short list is not a loop)."""
    n = len(ids)
    for p in range(1, min(max_period, n // min_repeats) + 1):
        span = max(min_repeats * p, min_span)
        if span > n:
            break
        tail = ids[n - span:]
        if all(tail[i] == tail[i + p] for i in range(span - p)):
            return True
    return False


@dataclass
class FilterStats:
    """Why teacher responses were dropped; `kept` of `total` survive."""
    total: int = 0
    truncated: int = 0
    no_answer: int = 0
    repetitive: int = 0
    incorrect: int = 0
    over_quota: int = 0  # accepted, but the prompt already had per_prompt responses
    kept: int = 0
    prompts_covered: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def rejection_filter(rollouts: Sequence[Rollout], texts: Sequence[str], answers: Sequence[Optional[object]], *,
                     require_correct: bool = True, per_prompt: int = 1, min_repeats: int = 4,
                     min_span: int = 32) -> Tuple[List[int], FilterStats]:
    """Indices of the rollouts to keep, and why the others went. A response is dropped when it was truncated
    (no EOS), has no extractable final answer, ends in a loop (repeats_at_end), or, with require_correct and a
    known answer for its prompt, is wrong; at most per_prompt responses per prompt are kept (the first ones).
    answers[i] is the answer of prompt i (rollout.prompt_index), None when unknown."""
    if not len(rollouts) == len(texts):
        raise ValueError(f"rollouts and texts differ in length: {len(rollouts)} vs {len(texts)}")
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
    st = FilterStats(total=len(rollouts))
    kept: List[int] = []
    taken: Dict[int, int] = {}
    for i, (r, text) in enumerate(zip(rollouts, texts)):
        gold = answers[r.prompt_index]
        if not r.finished:
            st.truncated += 1
        elif extract_answer(text) is None:
            st.no_answer += 1
        elif repeats_at_end(r.response_ids, min_repeats, min_span):
            st.repetitive += 1
        elif require_correct and gold is not None and not verify(text, gold):
            st.incorrect += 1
        elif taken.get(r.prompt_index, 0) >= per_prompt:
            st.over_quota += 1
        else:
            taken[r.prompt_index] = taken.get(r.prompt_index, 0) + 1
            kept.append(i)
    st.kept, st.prompts_covered = len(kept), len(taken)
    return kept, st


def split_prompts(prompts: Sequence[PromptExample], sft_fraction: float, seed: int = 0
                  ) -> Tuple[List[PromptExample], List[PromptExample]]:
    """(SFT prompts, OPD prompts): a seeded shuffle cut at sft_fraction, so OPD runs on prompts the student was
    never SFT-trained on."""
    if not 0.0 < sft_fraction < 1.0:
        raise ValueError(f"sft_fraction must be in (0, 1), got {sft_fraction}")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    cut = int(round(sft_fraction * len(prompts)))
    if cut == 0 or cut == len(prompts):
        raise ValueError(f"{len(prompts)} prompts cannot be split at sft_fraction={sft_fraction}: a side is empty")
    return [prompts[i] for i in sorted(order[:cut])], [prompts[i] for i in sorted(order[cut:])]


def teacher_sft_data(teacher: RolloutEngine, tokenizer, prompts: Sequence[PromptExample],
                     prompt_ids: Sequence[List[int]], sampling: SamplingConfig, group: int = 64,
                     progress: bool = True, **filter_kw) -> Tuple[List[Tuple[object, str]], FilterStats]:
    """The teacher's responses to `prompts` (sampling.n per prompt) that pass rejection_filter, as
    (prompt, response text) pairs for opdcore.sft.sft_train. Generates in groups of `group` prompts behind a
    progress bar."""
    from tqdm.auto import tqdm

    rollouts: List[Rollout] = []
    bar = tqdm(total=len(prompt_ids), desc="teacher responses", unit="prompt", dynamic_ncols=True, disable=not progress)
    for start in range(0, len(prompt_ids), group):
        for r in teacher.generate(list(prompt_ids[start:start + group]), sampling):
            r.prompt_index += start
            rollouts.append(r)
        bar.update(min(group, len(prompt_ids) - start))
    bar.close()
    texts = [tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
    keep, stats = rejection_filter(rollouts, texts, [p.answer for p in prompts], **filter_kw)
    return [(prompts[rollouts[i].prompt_index].prompt, texts[i]) for i in keep], stats
