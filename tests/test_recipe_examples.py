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
