"""opdcore.data (reward, prompt files, rendering, sampler, synthetic task, default setup) and opdcore.sft."""
import json

import pytest
import torch

from opdcore.data import answers_match, extract_answer, normalize_answer, verify


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the machine's cores are shared; tiny models run faster on one thread anyway
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- reward -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    (r"so the result is \boxed{42}.", "42"),
    (r"first \boxed{1} then \boxed{2}", "2"),  # the last box wins
    (r"\boxed{\frac{3}{4}}", r"\frac{3}{4}"),  # nested braces
    (r"\boxed{\text{a {b} c}} end", r"\text{a {b} c}"),
    (r"\boxed{7} and later a truncated \boxed{12", "7"),  # an unclosed box is skipped
    (r"\fbox{5}", "5"),
    (r"\boxed 9", "9"),
    ("Answer: 612", "612"),
    ("3+9+0=12 2\nAnswer: 612\n", "612"),
    ("answer: 1\nAnswer: 2", "2"),
    ("The answer is 42. Let me double check.", "42"),
    ("the final answer is: 3.5.", "3.5"),
    ("**Answer:** 17", "17"),
    ("#### 6\nAnswer: 5", "5"),  # "Answer:" outranks the GSM8K marker
    ("Answer: 5\n#### 6", "5"),
    ("no marker, just 12", None),
    ("Answer:", None),
    (r"\boxed{}", None),
    ("the answer isn't obvious", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_gsm8k_marker_and_type_error():
    assert extract_answer("Natalia sold 48 clips... #### 72") == "72"
    with pytest.raises(TypeError, match="text must be a str"):
        extract_answer(None)


@pytest.mark.parametrize("raw,expected", [
    ("  $42$ ", "42"), (r"\(x = 5\)", "5"), (r"\text{Paris}", "paris"), (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    ("{1, 2}", "{1,2}"), ("New  York.", "new york"), (r"90^\circ", "90"), ("\u22123", "-3"), (r"\$5", "5"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("pred,gold", [
    ("1,234", "1234"), ("1234", "1,234"), ("1234.0", "1234"), ("1234", 1234), ("1234", 1234.0),
    ("3/4", "0.75"), (r"\frac{3}{4}", "0.75"), (r"\dfrac{3}{4}", "3/4"), (r"\frac34", ".75"),
    (r"-\frac{1}{2}", "-0.5"), (r"\frac{-1}{2}", "-1/2"), ("1e3", "1000"), ("+7", "7"), ("007", "7"),
    ("x = 5", "5"), ("$12$", "12"), (r"\text{Paris}", "paris"), ("(1, 2)", "(1,2)"), ("5", ["4", "5"]),
    ("612", r"\boxed{612}"),
])
def test_answers_match(pred, gold):
    assert answers_match(pred, gold)


@pytest.mark.parametrize("pred,gold", [
    ("1,2", "12"),  # a pair, not a thousands separator
    ("0.333", "1/3"),  # exact comparison: rounding is not equality
    ("612", "613"), ("-5", "5"), ("50%", "50"), ("1/0", "0"), ("", "0"), (None, "1"), ("1", None),
    ("12", "1 2"), ("paris", "london"), (r"\frac{1}{0}", "1"), ("inf", "inf0"), ("5", ["4", "6"]),
])
def test_answers_do_not_match(pred, gold):
    assert not answers_match(pred, gold)


def test_answers_match_rejects_bad_gold_type():
    with pytest.raises(TypeError, match="gold must be"):
        answers_match("1", True)
    with pytest.raises(TypeError, match="gold must be"):
        answers_match("1", {"a": 1})


def test_verify():
    assert verify("7+5+0=12 2\n1+1+1=3 32\nAnswer: 32", "32") == 1.0
    assert verify(r"The total is \boxed{1,000}.", "1000") == 1.0
    assert verify("Answer: 31", "32") == 0.0
    assert verify("32", "32") == 0.0  # no stated answer, no credit
    with pytest.raises(ValueError, match="no ground-truth answer"):
        verify("Answer: 1", None)
