"""The recipe command lines: examples/select_prompts.py and examples/cold_start.py, as users run them."""
import json
import os
import subprocess
import sys

import pytest

from tiny_setup import make_tiny_run_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "examples", script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def _jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_select_prompts_command(tmp_path):
    aligned = _jsonl(tmp_path / "aligned.jsonl", [{"prompt": p, "answer": a} for p, a in [
        ("What is 12 plus 35?", "47"), ("Compute the sum of 12 and 35.", "47"),
        ("How many legs does a spider have?", "8"), ("Name the capital of France.", "Paris")]])
    other = _jsonl(tmp_path / "other.jsonl", [{"prompt": "Count the vowels in banana.", "answer": "3"},
                                              {"prompt": "What is 7 times 8?", "answer": "56"}])
    held = _jsonl(tmp_path / "eval.jsonl", [{"prompt": "Which city is the capital of France?", "answer": "Paris"}])
    out = tmp_path / "mix.jsonl"
    r = _run("select_prompts.py", "--aligned", aligned, "--other", other, "--exclude", held, "--template",
             "Q: {prompt}", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in open(out)]
    assert sorted(r["prompt"] for r in rows if r["source"] == "aligned") == [
        "Q: How many legs does a spider have?", "Q: What is 12 plus 35?"]
    assert sum(r["source"] == "other" for r in rows) == 2


def test_cold_start_command_says_when_nothing_passes(tmp_path):
    """Random tiny models (nearly) never finish an answer: every response is rejected, and the command says
    what to do."""
    paths = make_tiny_run_dir(tmp_path / "tiny", teacher_vocab_pad=0)
    r = _run("cold_start.py", "--teacher", paths["teacher"], "--student", paths["student"], "--prompts",
             paths["train"], "--max-new-tokens", 8, "--n", 1, "--out", tmp_path / "cs")
    assert r.returncode != 0 and "no teacher response passed the rejection filter" in r.stderr
    assert "'total': 12" in r.stdout and "'kept': 0" in r.stdout  # 24 prompts, half for the SFT, one response each
    r = _run("cold_start.py", "--teacher", paths["teacher"], "--student", "synthetic", "--out", tmp_path / "x")
    assert r.returncode != 0 and "must both be 'synthetic'" in r.stderr


@pytest.mark.slow
def test_cold_start_lifts_the_synthetic_student(tmp_path):
    """On the embedded task (built on first use, ~1 minute): SFT on the teacher's filtered responses."""
    r = _run("cold_start.py", "--out", tmp_path / "cs", "--n", 1, "--sft-steps", 150, "--eval-max", 128)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.load(open(tmp_path / "cs" / "cold_start.json"))
    assert rep["filter"]["kept"] > 0.5 * rep["sft_prompts"]
    assert rep["student_accuracy_after"] > rep["student_accuracy_before"] + 0.3
    assert "continue with OPD" in r.stdout and os.path.isfile(tmp_path / "cs" / "student" / "config.json")


@pytest.mark.slow
def test_phenomenology_runs_and_says_what_it_finds(tmp_path):
    """examples/phenomenology.py end to end on a few steps: the other teachers build, the runs train, and every
    section states whether the miniature reproduces its finding."""
    r = _run("phenomenology.py", "--steps", 3, "--only", "a", "b", "c", "--out", tmp_path / "ph", timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    text = (tmp_path / "ph" / "phenomenology.md").read_text()
    for section in ("(a) incompatible teacher", "(b) teacher without new knowledge", "(c) overlap over a successful",
                    "opdcore diagnose on the pairs"):
        assert section in text
    assert text.count("reproduced") >= 3  # each finding says whether it holds (or "NOT reproduced here")


def test_other_notation_is_the_same_arithmetic():
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        from phenomenology import other_notation
    finally:
        sys.path.pop(0)
    from opdcore.data.reward import extract_answer

    text = other_notation(964, 494)
    assert text == "0,4,4>8 8\n0,6,9>15 58\n1,9,4>14 1458\nAnswer: 1458"
    assert extract_answer(text) == "1458"
