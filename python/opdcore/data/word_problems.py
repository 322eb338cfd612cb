"""Arithmetic word problems with exact answers, generated offline: the real-model preset's verifiable task.

    {"prompt": [{"role": "system", "content": "Solve the math problem."},
                {"role": "user", "content": "Mia has 7 pencils. She buys 5 more pencils. How many pencils does
                 Mia have now? End with 'Answer: <number>'."}],
     "answer": "12", "kind": "add", "solution": "7 + 5 = 12\nAnswer: 12"}

Problems are one- or two-step stories over small whole numbers (addition, subtraction, multiplication, sharing,
and one two-step form), worded from a few templates with varied names and objects; every answer is a
non-negative integer. make_word_problems(n, seed) draws n distinct problems reproducibly.
"""
from __future__ import annotations

import random
from typing import Callable, Dict, List, Tuple

NAMES = (("Mia", "She"), ("Tom", "He"), ("Ava", "She"), ("Leo", "He"), ("Zoe", "She"), ("Sam", "He"),
         ("Emma", "She"), ("Noah", "He"), ("Lily", "She"), ("Ben", "He"), ("Ella", "She"), ("Max", "He"),
         ("Ruby", "She"), ("Jack", "He"), ("Nora", "She"), ("Owen", "He"))
OBJECTS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "balloons", "shells", "cards", "eggs",
           "stamps", "flowers", "coins", "toy cars", "oranges", "candies")
SYSTEM = "Solve the math problem."
INSTRUCTION = "End with 'Answer: <number>'."

# (kind, template, answer(a, b, c), draw(rng) -> (a, b, c))
Template = Tuple[str, str, Callable[[int, int, int], int], Callable[[random.Random], Tuple[int, int, int]]]

# the worked solution the specialised teacher is SFT-trained to write
SOLUTIONS = {
    "add": lambda a, b, c: f"{a} + {b} = {a + b}",
    "sub": lambda a, b, c: f"{a} - {b} = {a - b}",
    "mul": lambda a, b, c: f"{a} x {b} = {a * b}",
    "div": lambda a, b, c: f"{a} / {b} = {a // b}",
    "two_step": lambda a, b, c: f"{a} - {b} = {a - b}\n{a - b} + {c} = {a - b + c}",
}


def _pair_sum(rng: random.Random) -> Tuple[int, int, int]:
    return rng.randint(2, 20), rng.randint(2, 20), 0


def _pair_diff(rng: random.Random) -> Tuple[int, int, int]:
    a = rng.randint(5, 30)
    return a, rng.randint(1, a - 1), 0


def _pair_prod(rng: random.Random) -> Tuple[int, int, int]:
    return rng.randint(2, 9), rng.randint(2, 9), 0


def _quotient(rng: random.Random) -> Tuple[int, int, int]:
    b, q = rng.randint(2, 6), rng.randint(2, 9)
    return b * q, b, 0


def _two_step(rng: random.Random) -> Tuple[int, int, int]:
    a = rng.randint(6, 20)
    return a, rng.randint(1, a - 1), rng.randint(2, 12)


TEMPLATES: Tuple[Template, ...] = (
    ("add", "{name} has {a} {obj}. {pron} buys {b} more {obj}. How many {obj} does {name} have now?",
     lambda a, b, c: a + b, _pair_sum),
    ("add", "There are {a} {obj} in a red box and {b} {obj} in a blue box. How many {obj} are there in all?",
     lambda a, b, c: a + b, _pair_sum),
    ("add", "{name} found {a} {obj} on Monday and {b} {obj} on Tuesday. How many {obj} did {name} find?",
     lambda a, b, c: a + b, _pair_sum),
    ("sub", "{name} had {a} {obj} and gave {b} of them to a friend. How many {obj} does {name} have left?",
     lambda a, b, c: a - b, _pair_diff),
    ("sub", "A shop had {a} {obj}. It sold {b} {obj}. How many {obj} does the shop have now?",
     lambda a, b, c: a - b, _pair_diff),
    ("mul", "{name} has {a} bags with {b} {obj} in each bag. How many {obj} does {name} have?",
     lambda a, b, c: a * b, _pair_prod),
    ("div", "{name} shares {a} {obj} equally among {b} friends. How many {obj} does each friend get?",
     lambda a, b, c: a // b, _quotient),
    ("two_step", "{name} has {a} {obj}. {pron} loses {b} of them and then gets {c} more. "
     "How many {obj} does {name} have now?", lambda a, b, c: a - b + c, _two_step),
)


def word_problem(rng: random.Random) -> Dict[str, object]:
    """One problem drawn with rng: {"prompt": [system, user messages], "answer": str, "kind", "text", "solution"}
    (solution: the worked response ending in "Answer: <n>")."""
    kind, template, answer, draw = TEMPLATES[rng.randrange(len(TEMPLATES))]
    name, pron = NAMES[rng.randrange(len(NAMES))]
    obj = OBJECTS[rng.randrange(len(OBJECTS))]
    a, b, c = draw(rng)
    text = template.format(name=name, pron=pron, obj=obj, a=a, b=b, c=c)
    value = answer(a, b, c)
    return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{text} {INSTRUCTION}"}],
            "answer": str(value), "kind": kind, "text": text,
            "solution": f"{SOLUTIONS[kind](a, b, c)}\nAnswer: {value}"}


def make_word_problems(n: int, seed: int) -> List[Dict[str, object]]:
    """n distinct problems (by wording), drawn reproducibly from seed."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"make_word_problems: n must be an int >= 0, got {n!r}")
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(100 * n + 100):
        if len(out) == n:
            return out
        p = word_problem(rng)
        if p["text"] not in seen:
            seen.add(p["text"])
            out.append(p)
    raise ValueError(f"make_word_problems: could not draw {n} distinct problems")
