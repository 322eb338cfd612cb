"""The METHOD.md section 4 recipes: the rejection filter of the off-policy cold start, the prompt split, and
teacher-aligned prompt selection with the bundled sentence-embedding model."""
import pytest
import torch

from opdcore.data.prompts import PromptExample
from opdcore.recipes import (SentenceEmbedder, apply_template, dedup, rejection_filter, repeats_at_end, select_prompts,
                             split_prompts)
from opdcore.rollout import Rollout


def test_repeats_at_end():
    loop = list(range(10)) + [7, 8, 9] * 12
    assert repeats_at_end(loop)
    assert repeats_at_end([5] * 40)
    assert not repeats_at_end([1, 0, 0, 0])  # "1000": too short a span to be a loop
    assert not repeats_at_end(list(range(100)))
    assert not repeats_at_end([1, 2] * 15 + [3])  # the loop did not reach the end
    assert not repeats_at_end([4, 5, 6] * 10, min_repeats=11)


def _rollout(prompt, finished=True, ids=(1, 2, 3)):
    return Rollout(prompt, [0], list(ids), None, finished)


def test_rejection_filter_drops_each_kind_and_counts_it():
    rollouts = [_rollout(0, finished=False), _rollout(0), _rollout(0, ids=[9] * 40), _rollout(1), _rollout(1),
                _rollout(1), _rollout(2), _rollout(3)]
    texts = ["Answer: 5", "no final answer here", "Answer: 5", "Answer: 7", "Answer: 6", "Answer: 6", "Answer: 1",
             "\\boxed{42}"]
    answers = ["5", "6", None, None]  # prompt 2 and 3: no known answer, so any extractable answer passes
    keep, st = rejection_filter(rollouts, texts, answers)
    assert keep == [4, 6, 7]  # prompt 1: the wrong 7 dropped, then the first right 6 (the second is over quota)
    assert (st.truncated, st.no_answer, st.repetitive, st.incorrect, st.over_quota) == (1, 1, 1, 1, 1)
    assert st.kept == 3 and st.total == 8 and st.prompts_covered == 3
    keep, st = rejection_filter(rollouts, texts, answers, require_correct=False, per_prompt=2)
    assert keep == [3, 4, 6, 7] and st.incorrect == 0 and st.over_quota == 1
    with pytest.raises(ValueError, match="differ in length"):
        rejection_filter(rollouts, texts[:-1], answers)
    with pytest.raises(ValueError, match="per_prompt"):
        rejection_filter(rollouts, texts, answers, per_prompt=0)


def _examples(texts, answers=None):
    return [PromptExample(t, (answers or [None] * len(texts))[i], i, {"prompt": t}) for i, t in enumerate(texts)]


def test_split_prompts_is_disjoint_and_seeded():
    ex = _examples([f"q{i}" for i in range(10)])
    a, b = split_prompts(ex, 0.3, seed=1)
    assert len(a) == 3 and len(b) == 7 and not {e.index for e in a} & {e.index for e in b}
    assert [e.index for e in split_prompts(ex, 0.3, seed=1)[0]] == [e.index for e in a]
    for bad in (0.0, 1.0, 0.01):
        with pytest.raises(ValueError, match="sft_fraction|a side is empty"):
            split_prompts(ex, bad)


def test_apply_template():
    assert apply_template("2+2=", "Solve: {prompt}\nPut the answer in \\boxed{}.") == \
        "Solve: 2+2=\nPut the answer in \\boxed{}."
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}]
    out = apply_template(chat, "Q: {prompt}")
    assert out[1]["content"] == "Q: 2+2=" and chat[1]["content"] == "2+2=" and out[0] == chat[0]
    with pytest.raises(ValueError, match="must contain"):
        apply_template("x", "no placeholder")
    with pytest.raises(ValueError, match="without a user message"):
        apply_template([{"role": "system", "content": "hi"}], "{prompt}")


@pytest.fixture(scope="module")
def embed():
    return SentenceEmbedder()


def test_embedder_finds_paraphrases(embed):
    e = embed(["What is 12 plus 35?", "Compute the sum of 12 and 35.", "Name the capital of France."])
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] >= 0.6 > sim[0, 2]  # a paraphrase is a near-duplicate at the recipe's 0.6; another topic is not
    assert dedup(e, 0.6) == [0, 2]


def test_select_prompts_mixes_dedups_and_decontaminates(embed):
    aligned = _examples(["What is 12 plus 35?", "Compute the sum of 12 and 35.", "How many legs does a spider have?",
                         "Name the capital of France.", "What is the boiling point of water in Celsius?"],
                        ["47", "47", "8", "Paris", "100"])
    other = _examples([f"Problem {i}: count the vowels in 'banana{i}'." for i in range(6)])
    rows, st = select_prompts(aligned, other, embed=embed, aligned_fraction=0.5, template="Question: {prompt}",
                              exclude=["Which city is the capital of France?"], seed=3)
    assert (st.near_duplicates, st.contaminated) == (1, 1)  # the paraphrased sum; France is held out
    assert st.aligned_out == 3 and st.other_out == 3 and len(rows) == 6  # the most that 3 aligned allow at 0.5
    got = sorted(r["prompt"] for r in rows if r["source"] == "aligned")
    assert got == ["Question: How many legs does a spider have?", "Question: What is 12 plus 35?",
                   "Question: What is the boiling point of water in Celsius?"]
    rows, st = select_prompts(aligned, other, embed=embed, aligned_fraction=0.25, total=4)
    assert [r["source"] for r in rows].count("aligned") == 1 and len(rows) == 4
    with pytest.raises(ValueError, match="need 5 aligned"):  # 4 left after the dedup
        select_prompts(aligned, other, embed=embed, aligned_fraction=1.0, total=5)
    with pytest.raises(ValueError, match="aligned_fraction"):
        select_prompts(aligned, other, embed=embed, aligned_fraction=1.5)


def test_teacher_sft_data_on_a_real_model(tmp_path):
    """A tiny model SFT-trained to answer 5 to everything plays the teacher; generated in groups of 2 prompts,
    each kept response must stay paired with its own prompt."""
    from transformers import AutoTokenizer

    from opdcore.data.prompts import render_prompt
    from opdcore.data.synthetic import build_char_tokenizer, tiny_llama
    from opdcore.recipes import teacher_sft_data
    from opdcore.rollout import SamplingConfig
    from opdcore.rollout.hf import HFEngine
    from opdcore.sft import sft_train

    build_char_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    model = tiny_llama(len(tok), hidden=64, layers=1, heads=2, tokenizer=tok, seed=0)
    torch.manual_seed(0)
    sft_train(model, tok, [(f"{a}+{b}=", "Answer: 5") for a in range(6) for b in range(6)], steps=60, batch_size=12,
              lr=3e-3, progress=False)
    prompts = _examples(["1+4=", "2+4=", "3+2=", "0+0=", "4+1="], ["5", "6", "5", None, "5"])
    data, st = teacher_sft_data(HFEngine(model, tok, shares_training_model=True), tok, prompts,
                                [render_prompt(tok, p) for p in prompts], SamplingConfig(n=1, temperature=0.0,
                                                                                         max_new_tokens=16),
                                group=2, progress=False)
    assert st.total == 5 and st.incorrect == 1 and st.kept == 4
    assert data == [(p, "Answer: 5") for p in ("1+4=", "3+2=", "0+0=", "4+1=")]
