r"""Verifiable reward: pull the final answer out of a response and compare it with the ground truth.

    verify("... so the total is \boxed{1,234}.", "1234")   -> 1.0
    verify("3+9+0=12 2\n...\nAnswer: 612", "612")          -> 1.0

Extraction (extract_answer) takes the last complete \boxed{...} (nested braces allowed), else the value after the
last "Answer:" / "answer is" (to the end of that line or sentence), else the value after the last GSM8K-style
"####"; a response with none of them has no answer and scores 0. Comparison (answers_match) is exact match after
normalize_answer, or exact numeric equality of both sides (thousands separators, decimals, scientific notation,
a/b fractions, \frac). Not handled: units, percent ("50%" matches "50%" only), symbolic equivalence.

Small chat models rarely follow an answer format: AnswerChecker picks the extraction (EXTRACTIONS: "marked" as
above, "last_number" the last number in the text, "marked_or_last_number", "regex" the first group of the last
match of a pattern, "exact" the whole response) and says when a response has no extractable answer.
"""
from __future__ import annotations

import re
from fractions import Fraction
from dataclasses import dataclass
from typing import Optional, Sequence, Union

Gold = Union[str, int, float, Sequence[Union[str, int, float]]]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed[ \t]+([^\s$]+)")  # "\boxed 5" (no braces)
_ANSWER = re.compile(r"(?i)\banswer\s*(?::|\bis\b\s*:?)")
_HASHES = re.compile(r"####")


def _boxed_contents(text: str) -> list[tuple[int, str]]:
    """(start, content) of every complete \\boxed{...}; an unclosed one (truncated response) is skipped."""
    out = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append((m.start(), text[m.end():i - 1]))
    out.extend((m.start(), m.group(1)) for m in _BOXED_BARE.finditer(text))
    return sorted(out)


def _line_value(rest: str) -> str:
    """The value that follows a marker: up to the end of the line or sentence, without markdown emphasis."""
    value = rest.split("\n", 1)[0]
    value = re.split(r"\.(?:\s|$)", value, maxsplit=1)[0]  # "42. Done" -> "42"; "3.5" stays whole
    return value.strip().strip("*_").strip()


def extract_answer(text: str) -> Optional[str]:
    r"""The final answer stated in a response, or None.

    Order: the last complete \boxed{...} (or \fbox{...}, nested braces kept, e.g. "\frac{3}{4}"); else the value
    after the last "Answer:" or "answer is" (case-insensitive) up to the end of that line or sentence; else the
    value after the last "####". Empty values count as no answer.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer: text must be a str, got {type(text).__name__}")
    boxed = _boxed_contents(text)
    if boxed:
        value = boxed[-1][1].strip()
        return value or None
    for pattern in (_ANSWER, _HASHES):
        matches = list(pattern.finditer(text))
        if matches:
            value = _line_value(text[matches[-1].end():])
            return value or None
    return None


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm|mbox)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:!> ]|\\(?:left|right|displaystyle)\b|\\q?quad\b")


def normalize_answer(s: str) -> str:
    r"""Canonical form for exact matching.

    Strips surrounding $...$, \(...\), \[...\], a leading "x =" style assignment, \text{}/\mathrm{} wrappers, LaTeX
    spacing and \left/\right, degree marks, trailing periods and quotes; maps \dfrac/\tfrac to \frac and the
    unicode minus to "-"; lowercases; collapses whitespace and drops it next to punctuation ("x = 5" -> "x=5",
    "{1, 2}" -> "{1,2}", but "new york" keeps its space).
    """
    if not isinstance(s, str):
        raise TypeError(f"normalize_answer: expected a str, got {type(s).__name__}")
    s = s.strip().replace("\u2212", "-")
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        while len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left):len(s) - len(right)].strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\$", "")
    s = _SPACING.sub(" ", s)
    prev = None
    while prev != s:  # unwrap nested \text{\textbf{...}}
        prev, s = s, _TEXT_WRAPPERS.sub(r"\1", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = s.strip().rstrip(".").strip().strip("\"'`").strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*(?=\S)", "", s)  # "x = 5" -> "5"
    s = re.sub(r"\s+", " ", s.lower())
    return re.sub(r"\s*([^\w\s])\s*", r"\1", s)


_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")
_FRAC_LATEX = re.compile(r"^([+-]?)\\frac\s*(?:\{([^{}]+)\}|(\d))\s*(?:\{([^{}]+)\}|(\d))$")


def _to_number(s: str) -> Optional[Fraction]:
    """An exact rational for a normalised numeric answer, or None when it is not a plain number."""
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    m = _FRAC_LATEX.match(s)
    if m:
        sign, num, den = m.group(1), m.group(2) or m.group(3), m.group(4) or m.group(5)
        a, b = _to_number(num.strip()), _to_number(den.strip())
        if a is None or b is None or b == 0:
            return None
        return -a / b if sign == "-" else a / b
    if "/" in s:
        num, _, den = s.partition("/")
        a, b = _to_number(num), _to_number(den)
        if a is None or b is None or b == 0 or "/" in den:
            return None
        return a / b
    # Fraction accepts "12", "-1.5", "1e3", " 7 " but also "inf"/"nan"-free strings only, which is what we want
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?", s):
        return None
    return Fraction(s)


def answers_match(pred: Optional[str], gold: Optional[Gold]) -> bool:
    r"""Whether a predicted answer equals the gold answer.

    True when the normalised strings are equal or both parse as the same number ("1,234" == "1234" == "1234.0",
    "3/4" == "0.75" == "\frac{3}{4}", "-\frac12" == "-0.5"). Numbers compare exactly (as fractions), so a rounded
    decimal does not equal a repeating fraction ("0.333" != "1/3"). gold may be a number, or a list of
    acceptable answers (any one matching is enough); a gold that itself contains \boxed{} is reduced to its box.
    None on either side never matches.
    """
    if pred is None or gold is None:
        return False
    if isinstance(gold, (list, tuple)):
        return any(answers_match(pred, g) for g in gold)
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
        raise TypeError(f"answers_match: gold must be a str, a number or a list of them, got {type(gold).__name__}")
    gold = str(gold)
    boxed = _boxed_contents(gold)
    if boxed:
        gold = boxed[-1][1]
    p, g = normalize_answer(str(pred)), normalize_answer(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    a, b = _to_number(p), _to_number(g)
    return a is not None and b is not None and a == b


def verify(response_text: str, gold: Gold) -> float:
    """1.0 when the answer extracted from response_text matches gold, else 0.0 (also when nothing is extracted).

    gold None is an error: a prompt without a ground-truth answer cannot be scored (filter such prompts first).
    """
    if gold is None:
        raise ValueError("verify: gold is None; this prompt has no ground-truth answer to score against")
    return 1.0 if answers_match(extract_answer(response_text), gold) else 0.0


EXTRACTIONS = ("marked", "last_number", "marked_or_last_number", "regex", "exact")
# "1,234", "-3", "2.5", "3/4"; a trailing sentence period is not part of the number
_NUMBER = re.compile(r"(?<![\w.])[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def last_number(text: str) -> Optional[str]:
    """The last number written in text ("so 15 + 10 = 25 stickers." -> "25"), or None."""
    if not isinstance(text, str):
        raise TypeError(f"last_number: text must be a str, got {type(text).__name__}")
    found = _NUMBER.findall(text)
    return found[-1] if found else None


@dataclass(frozen=True)
class AnswerChecker:
    """How a response's final answer is found (`extraction`, one of EXTRACTIONS; `pattern` for "regex": the
    first capture group, or the whole match, of its last match) and compared with the gold answer."""

    extraction: str = "marked"
    pattern: str = ""

    def __post_init__(self):
        if self.extraction not in EXTRACTIONS:
            raise ValueError(f"answer extraction must be one of {', '.join(EXTRACTIONS)}; got {self.extraction!r}")
        if self.extraction == "regex":
            if not self.pattern:
                raise ValueError("answer extraction 'regex' needs a pattern (data.answer_regex)")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"answer pattern {self.pattern!r} is not a valid regular expression: {e}") from e

    def extract(self, text: str) -> Optional[str]:
        """The answer stated in text, or None when it has none under this extraction."""
        if self.extraction == "marked":
            return extract_answer(text)
        if self.extraction == "last_number":
            return last_number(text)
        if self.extraction == "marked_or_last_number":
            marked = extract_answer(text)
            return marked if marked is not None else last_number(text)
        if self.extraction == "exact":
            return text.strip() or None
        matches = list(re.finditer(self.pattern, text))
        if not matches:
            return None
        m = matches[-1]
        value = (m.group(1) if m.re.groups else m.group(0)).strip()
        return value or None

    def __call__(self, text: str, gold: Gold) -> float:
        """1.0 when the extracted answer matches gold (answers_match), else 0.0; gold None is an error."""
        if gold is None:
            raise ValueError("AnswerChecker: gold is None; this prompt has no ground-truth answer to score against")
        return 1.0 if answers_match(self.extract(text), gold) else 0.0
