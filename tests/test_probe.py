"""The teacher continuation probe on tiny real models: what is cut, who continues, what is graded."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdcore.rollout import SamplingConfig
from opdcore.rollout.hf import HFEngine
from opdcore.trainer.probe import continuation_probe
from tiny_setup import make_tiny_run_dir

CUTS = (0.0, 0.5, 0.75)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    paths = make_tiny_run_dir(tmp_path_factory.mktemp("probe"), teacher_vocab_pad=0)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    student = HFEngine(AutoModelForCausalLM.from_pretrained(paths["student"]), tok, shares_training_model=True)
    teacher = HFEngine(AutoModelForCausalLM.from_pretrained(paths["teacher"]), tok, shares_training_model=True)
    prompts = [tok.encode(p) for p in ("12+34=", "5+6=", "77+8=")]
    return student, teacher, prompts


def test_graded_responses_are_the_cut_prefix_plus_each_models_continuation(engines):
    student, teacher, prompts = engines
    graded = []

    def check(i, ids):
        graded.append((i, list(ids)))
        return float(len(ids) % 2 == 0)  # any deterministic grade

    torch.manual_seed(0)
    res = continuation_probe(student, teacher, prompts, check, CUTS, max_new_tokens=8, temperature=1.0)
    torch.manual_seed(0)  # the same sampled student responses the probe cut
    own = student.generate(prompts, SamplingConfig(n=1, temperature=1.0, max_new_tokens=8))
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=8)
    want = []
    for c in CUTS:
        prefixes = [r.response_ids[:int(c * len(r.response_ids))] for r in own]
        starts = [r.prompt_ids + p for r, p in zip(own, prefixes)]
        by_t, by_s = teacher.generate(starts, greedy), student.generate(starts, greedy)
        for r, p, t, s in zip(own, prefixes, by_t, by_s):
            want += [(r.prompt_index, p + t.response_ids), (r.prompt_index, p + s.response_ids)]
        acc_t = sum(len(p + t.response_ids) % 2 == 0 for p, t in zip(prefixes, by_t)) / len(prompts)
        acc_s = sum(len(p + s.response_ids) % 2 == 0 for p, s in zip(prefixes, by_s)) / len(prompts)
        assert res[f"probe_teacher@{c:g}"] == acc_t and res[f"probe_student@{c:g}"] == acc_s
        assert res[f"probe_advantage@{c:g}"] == pytest.approx(acc_t - acc_s)
    assert graded == want


def test_same_model_has_no_advantage_and_ungraded_are_left_out(engines):
    student, _, prompts = engines
    res = continuation_probe(student, student, prompts, lambda i, ids: 1.0 if i else math.nan, CUTS, 6,
                             reduce=lambda xs: [2 * x for x in xs])  # as if a second rank had the same counts
    for c in CUTS:
        assert res[f"probe_advantage@{c:g}"] == 0.0 and res[f"probe_teacher@{c:g}"] == 1.0  # prompt 0 ungraded


def test_bad_cuts_are_an_error(engines):
    student, teacher, prompts = engines
    for cuts in [(), (0.5, 1.0), (-0.1,)]:
        with pytest.raises(ValueError, match="cuts must be fractions"):
            continuation_probe(student, teacher, prompts, lambda i, ids: 1.0, cuts, 4)
