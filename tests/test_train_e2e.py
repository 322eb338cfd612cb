"""End-to-end OPD runs on tiny real models: one process, killed-and-resumed, and two processes under torchrun."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tiny_setup import TRAIN, make_tiny_run_dir, metrics, overrides, run
DETERMINISTIC = ("loss", "grad_norm", "train_accuracy", "response_length", "student_entropy", "teacher_entropy",
                 "overlap_ratio", "overlap_advantage", "sampled_token_reward", "largest_token_reward", "lr")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run_dir(tmp_path_factory.mktemp("tiny"), teacher_hidden=128)  # 4 heads: tensor-parallel too


def torchrun(tiny, out, nproc, port, **extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}", TRAIN,
           *overrides(tiny, out, **extra)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.parametrize("extra", [
    {},
    {"loss.topk": 0, "loss.log_ratio_clip": 0.0, "diagnostics.probe_every": 2},
    {"loss.strategy": "union", "loss.fused_lm_head": False, "loss.aggregation": "seq-mean-token-mean"},
    {"loss.renorm_kl": True, "loss.strategy": "intersection", "loss.outcome_weight": 0.5},
    {"loss.tail_kl": True, "loss.strategy": "union", "train.update_epochs": 2},
    {"loss.tail_kl": True, "loss.fused_lm_head": False, "loss.outcome_weight": 0.5},
    {"loss.outcome_weight": 1.0, "loss.fused_lm_head": False},
    {"model.dtype": "bfloat16", "model.gradient_checkpointing": True, "loss.strategy": "symmetric_difference"},
    {"loss.dense": "jsd", "loss.dense_beta": 0.3, "loss.teacher_temperature": 0.8},
    {"loss.dense": "reverse_kl", "loss.fused_lm_head": False, "loss.outcome_weight": 0.5},
    {"train.update_epochs": 2, "train.mini_batches": 2, "loss.strategy": "union", "loss.outcome_weight": 0.5,
     "loss.rollout_is_cap": 2.0},
])
def test_single_process_run(tiny, tmp_path, extra):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    r = run(overrides(tiny, out, **extra))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(out)
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0 for m in rows)
    if extra.get("loss.topk", 8):
        assert all(0 < m["student_topk_mass"] <= 1 + 1e-5 and 0 < m["teacher_mass_on_student_topk"] <= 1 + 1e-5
                   for m in rows)
    assert os.path.isdir(out / "checkpoints" / "step_00000002")
    before = AutoModelForCausalLM.from_pretrained(tiny["student"]).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the student was trained
    evals = metrics(out, "eval")  # eval before and after, the teacher's once, and the gap recovery rate
    assert "teacher_accuracy" in evals[1] and "gap_recovery" in evals[-1]
    assert all(m["largest_token_reward"] == m["largest_token_reward"] and "reward_auroc" in m for m in rows)
    if extra.get("loss.topk", 8):
        assert all(-1e-6 <= m["overlap_ratio"] <= 1 and m["overlap_advantage"] <= 1e-6 for m in rows)
        assert all(0 <= m["overlap_mass_student"] <= m["student_topk_mass"] + 1e-5 for m in rows)
        # METHOD.md 2.3: the reward-weighted top-k loss warns once when it drains the student's own top-k
        assert all(m["student_topk_lbar"] == m["student_topk_lbar"] for m in rows)
        weighted = not (extra.get("loss.renorm_kl") or extra.get("loss.tail_kl")) and \
            extra.get("loss.dense", "none") == "none"
        draining = any(m["student_topk_mass"] < 0.9 and m["student_topk_lbar"] > 0.05 for m in rows)
        assert r.stdout.count("set-mass drift") == int(weighted and draining)
    with open(out / "positions.jsonl") as f:
        prof = [json.loads(line) for line in f]
    assert [p["step"] for p in prof] == [1, 2, 3]
    assert all(len(p["student_entropy"]) == 8 and sum(p["tokens"]) == m["response_length"] * 8
               for p, m in zip(prof, rows))  # 4 prompts x 2 responses per step
    if extra.get("diagnostics.probe_every"):  # the continuation probe: before, at step 2, after
        probes = metrics(out, "probe")
        assert [p["step"] for p in probes] == [0, 2, 3] and all(len(p) == 2 + 3 * 4 + 1 for p in probes)  # + rss
    assert os.path.isfile(out / "curves.png") and os.path.isfile(out / "positions.png")
    assert os.path.isdir(out / "tensorboard")
    if extra.get("loss.tail_kl") and "train.update_epochs" in extra:  # a true divergence: minimised again, no ratio
        assert all(m["optimizer_steps"] == 2 and "ppo_clip_fraction" not in m for m in rows)
    elif "train.update_epochs" in extra:  # PPO surrogates: 2 epochs x 2 mini-batches per batch, clip statistics
        assert all(m["optimizer_steps"] == 4 and 0 <= m["ppo_clip_fraction"] <= 1 and m["ppo_ratio_max"] > 0
                   for m in rows)
        # the hf engine samples with the trained model itself: importance weights ~1
        assert all(abs(m["rollout_is_weight"] - 1) < 1e-3 for m in rows)


def test_killed_run_resumes_exactly(tiny, tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    args = dict(**{"train.steps": 6, "train.save_every": 2})
    r = run(overrides(tiny, ref_dir, **args))
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, TRAIN, *overrides(tiny, cut_dir, **args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = cut_dir / "checkpoints" / "step_00000002"
    deadline = time.time() + 300
    # killed after step 3 logged its row, before the step-4 checkpoint: the resumed run redoes step 3
    while not (ck.exists() and 3 in [m["step"] for m in _rows(cut_dir)]) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ck.exists()
    r = run(overrides(tiny, cut_dir, **args))  # resume=auto
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    assert "gap_recovery" in metrics(cut_dir, "eval")[-1]  # the step-0 accuracies came back with the checkpoint
    ref = {m["step"]: m for m in metrics(ref_dir)}
    assert [m["step"] for m in metrics(cut_dir)] == [1, 2, 3, 4, 5, 6]  # the killed run's step-3 row replaced
    assert [m["step"] for m in metrics(cut_dir, "eval") if "accuracy_avg@1" in m] == [0, 6]
    got = {m["step"]: m for m in metrics(cut_dir)}
    for step in range(3, 7):
        for key in DETERMINISTIC:
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])


def _rows(out_dir):
    """The train rows written so far (a row being written may be cut short)."""
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            return [r for r in map(json.loads, f.read().splitlines()[:-1]) if r["kind"] == "train"]
    except (OSError, ValueError):
        return []


def test_vocab_mismatch_is_an_error_before_training(tiny, tmp_path):
    from opdcore.data.synthetic import tiny_llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    tok.add_tokens(["<extra>"])  # a different vocabulary
    d = tmp_path / "other"
    tiny_llama(len(tok), hidden=32, layers=1, heads=4, tokenizer=tok, seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    r = run(overrides(tiny, tmp_path / "x", **{"model.teacher": str(d)}))
    assert r.returncode != 0 and "tokenizers differ" in r.stderr


# dense: the sharded teacher hands over logits; mini-batches: every rank splits its micro-batches alike
@pytest.mark.parametrize("extra", [{}, {"loss.dense": "jsd"}, {"train.mini_batches": 2, "loss.topk": 0}])
def test_torchrun_two_processes(tiny, tmp_path, extra):
    out = tmp_path / "ddp"
    torchrun(tiny, out, 2, 29517, **{"train.steps": 2, "model.teacher_sharding": "fsdp", **extra})
    rows = metrics(out)
    assert [m["step"] for m in rows] == [1, 2] and all(m["grad_norm"] > 0 for m in rows)
    assert all(m.get("optimizer_steps", 1) == extra.get("train.mini_batches", 1) for m in rows)
    # the sharded teacher generates in lockstep on both ranks: its accuracy, the gap recovery rate
    evals = metrics(out, "eval")
    assert "teacher_accuracy" in evals[1] and "gap_recovery" in evals[-1]
    assert os.path.isfile(out / "final" / "model.safetensors")


@pytest.mark.parametrize("extra", [{}, {"train.tensor_parallel": 2}])
def test_torchrun_resume_from_sharded_checkpoint(tiny, tmp_path, extra):
    """Under FSDP (or tensor parallelism) each rank writes its own shards; a 2-process run resumed from them
    continues exactly."""
    port = 29521 if not extra else 29531

    def run_to(out, steps, port):
        return torchrun(tiny, out, 2, port, **{"train.steps": steps, "train.save_every": 2, **extra})

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_to(ref, 4, port)
    run_to(cut, 2, port + 1)
    assert (cut / "checkpoints" / "step_00000002" / "shards").is_dir()
    r = run_to(cut, 4, port + 2)
    assert "resumed from" in r.stdout + r.stderr
    want = {m["step"]: m for m in metrics(ref)}
    got = {m["step"]: m for m in metrics(cut)}
    for step in (3, 4):
        for key in DETERMINISTIC:
            assert got[step][key] == want[step][key], (step, key)


def test_torchrun_generating_with_the_sharded_student_matches_the_replica(tiny, tmp_path):
    """rollout.hf_generate_sharded: the FSDP student generates itself (no replica, no per-step weight sync) and
    trains exactly as with the replica, rollouts, evaluation and continuation probe included."""
    replica, sharded = tmp_path / "replica", tmp_path / "sharded"
    for out, flag, port in ((replica, False, 29581), (sharded, True, 29582)):
        torchrun(tiny, out, 2, port, **{"train.steps": 2, "rollout.hf_generate_sharded": flag,
                                        "diagnostics.probe_every": 1})
    for kind in ("train", "eval", "probe"):
        a, b = metrics(replica, kind, memory=False), metrics(sharded, kind, memory=False)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            for key in (DETERMINISTIC if kind == "train" else x):
                assert x[key] == y[key] or (x[key] != x[key] and y[key] != y[key]), (kind, key)
    assert os.path.isfile(sharded / "final" / "model.safetensors")


def _final_weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "final", "model.safetensors"))


def _optimizer_state(out_dir, tiny):
    """The resumed student's optimizer state, flat: a single-process Trainer built in this process resumes from
    out_dir's latest checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from opdcore.config import load_config
    from opdcore.trainer.loop import Trainer

    threads = torch.get_num_threads()
    try:
        trainer = Trainer(load_config(None, tuple(overrides(tiny, out_dir, **{"train.steps": 2}))))
        _, optim_sd = get_state_dict(trainer.student, trainer.optimizer)
    finally:
        torch.set_num_threads(threads)
    return {f"{k}.{n}": v for k, st in optim_sd["state"].items() for n, v in st.items() if torch.is_tensor(v)}


@pytest.mark.parametrize("extra", [{}, {"train.tensor_parallel": 2}])
def test_resume_at_another_world_size(tiny, tmp_path, extra):
    """Checkpoints hold the model and optimizer in torch.distributed.checkpoint's resharding format at every world
    size: a 2-process (FSDP or tensor-parallel) checkpoint resumes in one process and a one-process checkpoint on
    2 processes, with the weights and optimizer state exactly as written."""
    import shutil
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    port = 29561 if not extra else 29571
    two, one, again = tmp_path / "two", tmp_path / "one", tmp_path / "again"
    torchrun(tiny, two, 2, port, **{"train.steps": 2, "train.save_every": 2, **extra})
    shutil.copytree(two / "checkpoints", one / "checkpoints")
    r = run(overrides(tiny, one, **{"train.steps": 2}))  # resumes at the last step: the final model is the checkpoint's
    assert r.returncode == 0, r.stderr[-3000:]
    assert "written by 2 ranks, resumed on 1: model and optimizer resharded" in r.stdout
    a, b = _final_weights(two), _final_weights(one)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dcp_to_torch_save(two / "checkpoints" / "step_00000002" / "shards", tmp_path / "written.pt")
    written = torch.load(tmp_path / "written.pt", weights_only=False)["optimizer"]["state"]
    written = {f"{k}.{n}": v for k, st in written.items() for n, v in st.items() if torch.is_tensor(v)}
    resumed = _optimizer_state(one, tiny)
    assert written.keys() == resumed.keys() and any(v.abs().sum() > 0 for v in written.values())
    assert all(torch.equal(written[k], resumed[k]) for k in written), "optimizer state after resharding"

    r = run(overrides(tiny, one, **{"train.steps": 3, "train.save_every": 1}))  # trains on, writes a 1-rank checkpoint
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in metrics(one)] == [3]
    shutil.copytree(one / "checkpoints", again / "checkpoints")
    r = torchrun(tiny, again, 2, port + 1, **{"train.steps": 3, **extra})
    assert "written by 1 ranks, resumed on 2" in r.stdout
    a, b = _final_weights(one), _final_weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


TP_SAME = ("loss", "grad_norm", "response_length", "train_accuracy", "student_entropy", "overlap_ratio")


def _same_run(a, b, what):
    for x, y in zip(metrics(a), metrics(b), strict=True):
        for key in TP_SAME:
            # float32 rounding of the vocabulary-parallel reductions (~1e-7 per token) grows through the optimizer
            # steps (two PPO epochs per step: Adam divides by tiny second moments) and the loss is a sum of O(1)
            # terms that cancel to ~0.01-0.05: a few 1e-5 apart by step 2; a wrong rollout or gradient is off by
            # 1e-3 or more
            rel, tol = (1e-4, 5e-6) if key in ("loss", "grad_norm") else (1e-5, 1e-6)
            assert x[key] == pytest.approx(y[key], rel=rel, abs=tol), (what, x["step"], key, x[key], y[key])


@pytest.mark.parametrize("extra", [{"diagnostics.probe_every": 1}, {"loss.renorm_kl": True, "loss.outcome_weight": 0.5},
                                   {"train.update_epochs": 2, "loss.strategy": "union"},
                                   {"loss.tail_kl": True, "loss.strategy": "union"}])
def test_torchrun_tensor_parallel_matches_one_process(tiny, tmp_path, extra):
    """train.tensor_parallel=2 on 2 processes (both models' layers and LM heads split, vocabulary-parallel losses)
    trains exactly like one process: the group's first rank samples with the single process's seed. The
    tensor-parallel teacher's evaluation and continuation probe match too."""
    one, tp = tmp_path / "one", tmp_path / "tp"
    r = run(overrides(tiny, one, **{"train.steps": 2, **extra}))
    assert r.returncode == 0, r.stderr[-3000:]
    torchrun(tiny, tp, 2, 29541 + len(extra) + ("loss.renorm_kl" in extra) + 3 * ("loss.tail_kl" in extra),
             **{"train.steps": 2, "train.tensor_parallel": 2, **extra})
    _same_run(one, tp, "tensor-parallel")
    for kind in ("eval", "probe"):
        assert metrics(one, kind, memory=False) == metrics(tp, kind, memory=False), kind
    assert os.path.isfile(tp / "final" / "model.safetensors")


def test_torchrun_2d_matches_data_parallel(tiny, tmp_path):
    """4 processes as 2 data-parallel x 2 tensor-parallel (FSDP2 over the data-parallel ranks of tensor-parallel
    models, an FSDP-sharded teacher) train like 2 data-parallel processes."""
    dp, both = tmp_path / "dp", tmp_path / "2d"
    torchrun(tiny, dp, 2, 29551, **{"train.steps": 2, "model.teacher_sharding": "fsdp"})
    torchrun(tiny, both, 4, 29552, **{"train.steps": 2, "model.teacher_sharding": "fsdp", "train.tensor_parallel": 2})
    _same_run(dp, both, "2-D")


def test_prompts_beyond_the_context_and_the_micro_batch_budget_are_caught_up_front(tiny, tmp_path):
    """A prompt whose response could run past the models' context (256 positions) is dropped and counted; a
    micro-batch budget below the longest possible sequence, or no prompt left, fails before any step."""
    rows = [json.loads(line) for line in open(tiny["train"])]
    train = tmp_path / "train.jsonl"
    with open(train, "w") as f:
        for r in rows + [{"prompt": "1+" * 130 + "1=", "answer": "131"}]:
            f.write(json.dumps(r) + "\n")
    out = tmp_path / "run"
    r = run(overrides(tiny, out, **{"data.train_path": train, "train.steps": 1, "train.save_every": 0}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(rows)} train prompts (0 over data.max_prompt_tokens, 1 too long for the context of 256" in r.stdout
    r = run(overrides(tiny, tmp_path / "b", **{"train.micro_batch_tokens": 16}))
    assert r.returncode != 0 and "train.micro_batch_tokens=16 is below the longest possible training sequence" \
        in r.stderr and not (tmp_path / "b" / "metrics.jsonl").exists()
    r = run(overrides(tiny, tmp_path / "c", **{"rollout.max_new_tokens": 250, "train.micro_batch_tokens": 512}))
    assert r.returncode != 0 and "too long for the models' context of 256 tokens" in r.stderr


def test_eval_samples_hold_per_token_log_probs(tiny, tmp_path):
    """eval.save_samples: readable responses at every eval with the student's and teacher's per-token log-probs,
    which match a plain forward of the final student."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    r = run(overrides(tiny, out, **{"train.steps": 2, "eval.every": 1, "eval.save_samples": 3,
                                    "train.save_every": 0}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(out / "samples")) == [f"step_{s:06d}.jsonl" for s in (0, 1, 2)]
    rows = [json.loads(line) for line in open(out / "samples" / "step_000002.jsonl")]
    assert len(rows) == 3
    student = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    for row in rows:
        n = len(row["tokens"])
        assert n == len(row["student_logprobs"]) == len(row["teacher_logprobs"]) == len(row["token_rewards"]) > 0
        assert row["reward"] in (0.0, 1.0) and row["prompt"] and "answer" in row
        for s, t, rew in zip(row["student_logprobs"], row["teacher_logprobs"], row["token_rewards"]):
            assert s <= 0 and t <= 0 and abs(rew - (t - s)) < 2e-4
        # the last eval's student is the saved final one: its log-probs are a plain forward's
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + tok.convert_tokens_to_ids(row["tokens"])])
        with torch.no_grad():
            lp = torch.log_softmax(student(ids).logits[0, len(prompt) - 1:-1].float(), -1)
        want = lp.gather(1, ids[0, len(prompt):, None])[:, 0]
        torch.testing.assert_close(torch.tensor(row["student_logprobs"]), want, atol=1e-3, rtol=0)
