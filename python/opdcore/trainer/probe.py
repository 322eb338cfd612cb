"""Teacher continuation probe (METHOD.md 3): cut the student's own responses at several depths, let the teacher
and the student each continue greedily from the cut, and compare their accuracy. The teacher's advantage over
the student shrinks with depth: how much the teacher still knows on the student's states, deep in a response."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from opdcore.rollout import RolloutEngine, SamplingConfig


def continuation_probe(student: RolloutEngine, teacher: RolloutEngine, prompts: List[List[int]],
                       check: Callable[[int, List[int]], float], cuts: Sequence[float], max_new_tokens: int,
                       temperature: float = 1.0, reduce: Optional[Callable[[list], list]] = None,
                       share: Optional[Callable[[list], list]] = None) -> Dict[str, float]:
    """Accuracy of each model continuing from the student's responses cut at `cuts` (fractions of each
    response's length; 0 continues from the prompt alone).

    check(i, response_ids) grades a full response to prompt i (1/0, NaN: ungraded). The student samples one
    response per prompt at `temperature`; the continuations are greedy with up to max_new_tokens new tokens.
    `reduce` sums the [correct_teacher, correct_student, graded] counts across ranks (data parallelism);
    `share` replaces the sampled responses with those of the rank whose inputs this rank must match (tensor
    parallelism: one sample per group). A synced teacher engine joins the generation even without prompts.
    Returns probe_teacher@c, probe_student@c and probe_advantage@c (teacher - student) per cut c.
    """
    if not cuts or any(not 0.0 <= c < 1.0 for c in cuts):
        raise ValueError(f"cuts must be fractions in [0, 1), got {list(cuts)}")
    rollouts = student.generate(prompts, SamplingConfig(n=1, temperature=temperature, max_new_tokens=max_new_tokens)) \
        if prompts else []
    if share is not None:
        rollouts = share(rollouts)
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    counts = []
    for c in cuts:
        prefixes = [r.response_ids[:int(c * len(r.response_ids))] for r in rollouts]
        starts = [r.prompt_ids + p for r, p in zip(rollouts, prefixes)]
        row = [0.0, 0.0, 0.0]
        by_t = teacher.generate(starts, greedy) if starts or teacher.synced else []
        by_s = student.generate(starts, greedy) if starts else []
        for r, p, t, s in zip(rollouts, prefixes, by_t, by_s):
            ok_t, ok_s = check(r.prompt_index, p + t.response_ids), check(r.prompt_index, p + s.response_ids)
            if ok_t == ok_t and ok_s == ok_s:  # both graded
                row = [row[0] + ok_t, row[1] + ok_s, row[2] + 1]
        counts.append(row)
    if reduce is not None:
        flat = reduce([x for row in counts for x in row])
        counts = [list(flat[3 * i:3 * i + 3]) for i in range(len(cuts))]
    out: Dict[str, float] = {}
    for c, (t, s, n) in zip(cuts, counts):
        acc_t, acc_s = (float(t) / n, float(s) / n) if n else (float("nan"), float("nan"))
        out.update({f"probe_teacher@{c:g}": acc_t, f"probe_student@{c:g}": acc_s,
                    f"probe_advantage@{c:g}": acc_t - acc_s})
    return out
