"""The token set that carries a reward at each position (METHOD.md 2.2)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from opdcore.ops._device import check_devices
from opdcore.ops.topk import as_long

STRATEGIES = ("student", "teacher", "intersection", "union", "symmetric_difference")
# Names used by the reference verl fork.
STRATEGY_ALIASES = {
    "only_stu": "student",
    "only_tch": "teacher",
    "union-intersection": "symmetric_difference",
}


def canonical_strategy(name: str) -> str:
    s = STRATEGY_ALIASES.get(name, name)
    if s not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {STRATEGIES} (or the aliases {tuple(STRATEGY_ALIASES)}), got {name!r}")
    return s


def set_is_student_topk(strategy: str) -> bool:
    """Whether the strategy's set lies in the student's top-k columns (student, intersection): the student's log-probs
    on it are those of its own top-k."""
    return canonical_strategy(strategy) in ("student", "intersection")


class TokenSet(NamedTuple):
    ids: torch.Tensor  # [N, K] int64
    valid: torch.Tensor  # [N, K] bool: which entries belong to the set
    teacher_logprobs: Optional[torch.Tensor]  # [N, K] log q on ids, when the inputs were given


def _member(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, ka] bool: a[n, i] appears in b[n, :]."""
    return (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2)


def build_token_set(student_ids: torch.Tensor, teacher_ids: Optional[torch.Tensor], strategy: str = "student",
                    teacher_logprobs_on_student: Optional[torch.Tensor] = None,
                    teacher_topk_logprobs: Optional[torch.Tensor] = None) -> TokenSet:
    """Ids, valid mask (and teacher log-probs) of the token set for a strategy.

    Layout: `student` and `intersection` use the student's top-k columns; `teacher` the teacher's;
    `union` and `symmetric_difference` concatenate [student | teacher] and mark duplicates / shared ids invalid,
    so every id in the set is counted once. teacher_logprobs_on_student is log q at the student's ids,
    teacher_topk_logprobs the teacher's own top-k log-probs; each is needed only where its columns are used.
    """
    s = canonical_strategy(strategy)
    student_ids = as_long(student_ids, "student_ids")  # float ids would be truncated silently
    if teacher_ids is not None:
        teacher_ids = as_long(teacher_ids, "teacher_ids")
    check_devices(student_ids=student_ids, teacher_ids=teacher_ids,
                  teacher_logprobs_on_student=teacher_logprobs_on_student, teacher_topk_logprobs=teacher_topk_logprobs)
    if student_ids.dim() != 2:
        raise ValueError(f"student_ids must be [N, k], got {tuple(student_ids.shape)}")
    if s != "student":
        if teacher_ids is None:
            raise ValueError(f"strategy {s!r} needs teacher_ids")
        if teacher_ids.dim() != 2 or teacher_ids.shape[0] != student_ids.shape[0]:
            raise ValueError(f"teacher_ids must be [N={student_ids.shape[0]}, k], got {tuple(teacher_ids.shape)}")
    for name, t, ref in (("teacher_logprobs_on_student", teacher_logprobs_on_student, student_ids),
                         ("teacher_topk_logprobs", teacher_topk_logprobs, teacher_ids)):
        if t is not None and ref is not None and t.shape != ref.shape:
            raise ValueError(f"{name} must have shape {tuple(ref.shape)}, got {tuple(t.shape)}")

    uses_student = s != "teacher"
    uses_teacher = s in ("teacher", "union", "symmetric_difference")
    tq = None
    if set_is_student_topk(s):
        ids = student_ids
        valid = torch.ones_like(ids, dtype=torch.bool) if s == "student" else _member(student_ids, teacher_ids)
    elif s == "teacher":
        ids = teacher_ids
        valid = torch.ones_like(ids, dtype=torch.bool)
    else:
        ids = torch.cat([student_ids, teacher_ids], dim=1)
        t_new = ~_member(teacher_ids, student_ids)
        s_keep = torch.ones_like(student_ids, dtype=torch.bool) if s == "union" else _member(student_ids, teacher_ids).logical_not()
        valid = torch.cat([s_keep, t_new], dim=1)
    have = (not uses_student or teacher_logprobs_on_student is not None) and (
        not uses_teacher or teacher_topk_logprobs is not None)
    if have:
        parts = ([teacher_logprobs_on_student] if uses_student else []) + ([teacher_topk_logprobs] if uses_teacher else [])
        tq = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return TokenSet(ids.long(), valid, tq)
