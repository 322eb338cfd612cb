"""Faults a user meets: untrusted or damaged checkpoints, full disks, settings that could only fail mid-run.
Each test failed before its fix."""
import dataclasses
import io
import json
import os
import pickle

import pytest
import torch

from opdcore.config import ConfigError, load_config
from opdcore.trainer import checkpoint, safe_dcp
from opdcore.trainer.logger import MetricsLogger


class _RunsCode:
    """Unpickling this runs a shell command that leaves a file behind: proof that code ran."""

    def __init__(self, proof):
        self.proof = str(proof)

    def __reduce__(self):
        return os.system, (f"touch {self.proof}",)


def _save(root, step=1, shards=True):
    """A checkpoint as the trainer writes it: JSON state, RNG file, model/optimizer shards."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()

    def write(folder):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        m, o = get_state_dict(model, opt)
        safe_dcp.save({"model": m, "optimizer": o}, os.path.join(folder, "shards"))

    return checkpoint.save(str(root), step, {"step": step, "sampler": {"offset": 3}}, keep=3,
                           write_shards=write if shards else None), model, opt


def _reseal(path):
    """Rewrite the completion marker's checksums, as someone who tampers with a checkpoint would."""
    marker = os.path.join(path, checkpoint.COMPLETE)
    meta = json.load(open(marker))
    meta["sha256"] = {rel: checkpoint._digest(os.path.join(path, rel)) for rel in checkpoint._files(path)
                      if rel != checkpoint.COMPLETE}
    json.dump(meta, open(marker, "w"))


def _load_shards(path):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    m, o = get_state_dict(model, opt)
    shards = {"model": m, "optimizer": o}
    safe_dcp.load(shards, os.path.join(path, "shards"))
    return shards


def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_run(tmp_path):
    path, _, _ = _save(tmp_path / "ck")
    proof = tmp_path / "code_ran"
    assert checkpoint.load(path)["step"] == 1 and _load_shards(path)  # intact: loads
    # 1. the RNG file (and an older checkpoint's trainer.pt): torch files of tensors and plain values only
    for name in ("rng_rank0.pt", "trainer.pt"):
        if name == "trainer.pt":
            os.remove(os.path.join(path, checkpoint.STATE))
        with open(os.path.join(path, name), "wb") as f:
            pickle.dump({"step": 1, "x": _RunsCode(proof)}, f)
        _reseal(path)
        with pytest.raises(safe_dcp.UnsafeCheckpointError, match=f"{name} holds Python objects beyond tensors"):
            checkpoint.load(path)
        assert not proof.exists()
        torch.save(checkpoint.rng_state() if name.startswith("rng") else {"step": 1}, os.path.join(path, name))
    _reseal(path)
    assert checkpoint.load(path)["step"] == 1
    # 2. DCP's .metadata, which torch itself reads with pickle.load
    meta = os.path.join(path, "shards", safe_dcp.METADATA)
    original = open(meta, "rb").read()
    with open(meta, "wb") as f:
        pickle.dump(_RunsCode(proof), f)
    with pytest.raises(safe_dcp.UnsafeCheckpointError, match=r"\.metadata refers to posix\.system.*nothing in it was run"):
        _load_shards(path)
    assert not proof.exists()
    # ... and metadata that points outside its folder
    md = safe_dcp._MetadataUnpickler(io.BytesIO(original)).load()  # the checked reader reads an intact one
    key = next(iter(md.storage_data))
    md.storage_data[key] = dataclasses.replace(md.storage_data[key], relative_path="../../elsewhere.distcp")
    with open(meta, "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(safe_dcp.UnsafeCheckpointError, match="outside its folder"):
        _load_shards(path)


def test_a_crafted_non_tensor_item_in_the_shards_is_refused(tmp_path):
    """DCP stores non-tensor values (the optimizer's settings) as pickles it loads with weights_only=False."""
    proof = tmp_path / "code_ran"
    folder = str(tmp_path / "shards")
    safe_dcp.save({"lr": _RunsCode(proof)}, folder)
    with pytest.raises(safe_dcp.UnsafeCheckpointError, match="item lr holds objects beyond tensors"):
        safe_dcp.load({"lr": 0.1}, folder)
    assert not proof.exists()
    safe_dcp.save({"lr": 0.25, "betas": (0.9, 0.95)}, folder)  # plain values load
    state = {"lr": 0.1, "betas": (0.0, 0.0)}
    safe_dcp.load(state, folder)
    assert state == {"lr": 0.25, "betas": (0.9, 0.95)}


def test_damaged_checkpoints_are_detected_and_resume_falls_back(tmp_path):
    root = tmp_path / "ck"
    first, model, _ = _save(root, 1)
    second, _, _ = _save(root, 2)
    assert checkpoint.latest_intact(str(root)) == (second, [])
    shard = next(p for p in checkpoint._files(second) if p.endswith(".distcp"))
    with open(os.path.join(second, shard), "r+b") as f:  # a few overwritten bytes load silently in DCP itself
        f.seek(200)
        f.write(b"\x7f\x7f\x7f\x7f")
    path, skipped = checkpoint.latest_intact(str(root))
    assert path == first and skipped == [(second, f"{shard} does not match the checksum recorded when it was "
                                                  f"written (damaged or changed since)")]
    with pytest.raises(ValueError, match=f"checkpoint {second} is damaged: {shard} does not match"):
        checkpoint.load(second)
    os.truncate(os.path.join(first, shard), 10)  # truncated
    assert checkpoint.latest_intact(str(root)) == (None, [(second, skipped[0][1]), (first, skipped[0][1])])
    with pytest.raises(ValueError, match=f"the model and optimizer shards in {first}/shards could not be read"):
        _load_shards(first)  # unchecked, DCP's own error now names the checkpoint
    os.remove(os.path.join(first, "rng_rank0.pt"))
    assert checkpoint.damage(first) == "rng_rank0.pt is missing"


def test_a_failed_checkpoint_write_names_the_disk_and_keeps_the_last_good_one(tmp_path):
    root = tmp_path / "ck"
    good, _, _ = _save(root, 1, shards=False)

    def full_disk(folder):
        raise OSError(28, "No space left on device")

    with pytest.raises(checkpoint.CheckpointWriteError,
                       match=r"checkpoint of step 2 .* failed: the disk is full; [0-9.]+ GiB free on the disk holding"):
        checkpoint.save(str(root), 2, {"step": 2}, keep=2, write_shards=full_disk)
    assert sorted(os.listdir(root)) == [os.path.basename(good)]  # no temporary folder left, step 1 intact
    assert checkpoint.latest_intact(str(root)) == (good, [])


def test_checkpoint_state_is_json_and_rng_round_trips(tmp_path):
    import random

    import numpy as np

    path, _, _ = _save(tmp_path / "ck")
    assert json.load(open(os.path.join(path, checkpoint.STATE)))["sampler"] == {"offset": 3}
    state = checkpoint.load(path)["rng"]
    want = (random.random(), float(np.random.rand()), torch.rand(2))
    random.random(), np.random.rand(), torch.rand(2)
    checkpoint.set_rng_state(state)
    for a, b in zip(want[:2], (random.random(), float(np.random.rand()))):
        assert a == b
    assert torch.equal(torch.rand(2), want[2])


@pytest.mark.parametrize("setting", ["optim.lr=.inf", "optim.lr=nan", "loss.log_ratio_clip=inf",
                                     "optim.betas=[0.9, .nan]", "rollout.temperature=1e9", "optim.lr=3"])
def test_non_finite_or_absurd_settings_are_refused(setting):
    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + " must be"):
        load_config(None, (setting,))


def test_metrics_rows_after_the_resumed_step_are_replaced(tmp_path):
    rows = [{"step": s, "kind": k} for s in range(5) for k in ("train", "eval")]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"step": 5, "kind": "tr')  # cut short by a kill
    MetricsLogger(str(tmp_path), 10, 2, tensorboard=False, progress=False, keep_through=2)
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [0, 0, 1, 1, 2, 2]
    with open(tmp_path / "metrics.jsonl", "a") as f:  # killed just before a row's newline
        f.write('{"step": 2, "kind": "probe"}')
    MetricsLogger(str(tmp_path), 10, 2, tensorboard=False, progress=False, keep_through=2).log(3, {"loss": 1.0})
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [0, 0, 1, 1, 2, 2, 2, 3]
    MetricsLogger(str(tmp_path), 10, 0, tensorboard=False, progress=False, keep_through=-1)  # a restart
    assert open(tmp_path / "metrics.jsonl").read() == ""


# ---- the trainer end to end (tiny models, a few seconds each) ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_setup import make_tiny_run_dir

    return make_tiny_run_dir(tmp_path_factory.mktemp("tiny"))


def test_a_new_run_never_prunes_or_mixes_with_another_run(tiny, tmp_path):
    """resume=never into a folder holding a longer run used to delete the new run's checkpoints (pruning keeps the
    highest steps) and mix both runs' metrics; now it is refused, or the old run is moved aside."""
    from tiny_setup import metrics, overrides, run

    out = tmp_path / "run"
    assert run(overrides(tiny, out, **{"train.steps": 4})).returncode == 0
    r = run(overrides(tiny, out, **{"train.steps": 2, "train.resume": "never"}))
    assert r.returncode == 2 and "holds another run (config.json, metrics.jsonl, checkpoints, final) and this run " \
        "would not continue it: train.resume=never" in r.stderr and "train.overwrite=true" in r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr  # a setup error is a message
    # resume=auto into a run of other settings is refused too (and nothing of it was touched)
    r = run(overrides(tiny, out, **{"train.steps": 2, "loss.topk": 4}))
    assert r.returncode != 0 and "loss.topk: 8 then, 4 now" in r.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    r = run(overrides(tiny, out, **{"train.steps": 2, "train.resume": "never", "train.overwrite": True}))
    assert r.returncode == 0, r.stderr[-2000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and [m["step"] for m in metrics(aside[0])] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics(out)] == [1, 2] and os.listdir(out / "checkpoints") == ["step_00000002"]
    # under torchrun rank 0 decides for all: every rank refuses (no rank left waiting), or all move on together
    import subprocess
    import sys

    from tiny_setup import TRAIN

    def torchrun(**extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                               "--master-port=29611", TRAIN, *overrides(tiny, out, **{"train.steps": 2, **extra})],
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)

    r = torchrun(**{"train.resume": "never"})
    assert r.returncode != 0 and r.stderr.count("holds another run") == 2
    r = torchrun(**{"train.resume": "never", "train.overwrite": True})
    assert r.returncode == 0, r.stderr[-2000:]
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]) == 2


def test_resume_refuses_a_planted_pickle_and_falls_back_from_damage(tiny, tmp_path):
    from tiny_setup import metrics, overrides, run

    out = tmp_path / "run"
    args = {"train.steps": 4, "train.save_every": 1, "train.keep_checkpoints": 3}
    assert run(overrides(tiny, out, **{**args, "train.steps": 3})).returncode == 0
    ck = out / "checkpoints"
    # a few bytes changed in the newest checkpoint's shards: resume=auto says so and continues from the one before
    shard = next(p for p in checkpoint._files(str(ck / "step_00000003")) if p.endswith(".distcp"))
    with open(ck / "step_00000003" / shard, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    r = run(overrides(tiny, out, **args))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"checkpoint {ck / 'step_00000003'} is damaged ({shard} does not match" in r.stdout
    assert f"resumed from {ck / 'step_00000002'} at step 2" in r.stdout
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    # a crafted DCP metadata file, checksums resealed: refused before anything in it runs
    proof = tmp_path / "code_ran"
    newest = ck / "step_00000004"
    with open(newest / "shards" / safe_dcp.METADATA, "wb") as f:
        pickle.dump(_RunsCode(proof), f)
    _reseal(str(newest))
    r = run(overrides(tiny, out, **{**args, "train.steps": 5}))
    assert r.returncode != 0 and "refers to posix.system" in r.stderr and "nothing in it was run" in r.stderr
    assert not proof.exists()


def test_degenerate_shapes_get_clear_errors():
    from opdcore.ops import linear_topk
    from opdcore.packing import from_padded, to_padded

    with pytest.raises(ValueError, match="weight has no rows"):
        linear_topk(torch.randn(2, 4), torch.empty(0, 4), 1)
    cu = torch.tensor([[0, 2, 4]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens must be 1-D \[B \+ 1\].*got shape \(1, 3\)"):
        to_padded(torch.randn(4), cu)
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
        from_padded(torch.randn(2, 2), cu)


# ---- the kernel ops: inputs they cannot handle are errors, never silent wrong results --------------------------

def _op_calls():
    """(name, fn(**tensors), tensors) for every public op that takes several tensors."""
    from opdcore import ops

    g = torch.Generator().manual_seed(0)
    N, V, K, H = 3, 40, 4, 8
    x, t = torch.randn(N, V, generator=g), torch.randn(N, V, generator=g)
    ids = torch.randint(0, V, (N, K), generator=g)
    tq = torch.log_softmax(t, -1).gather(1, ids)
    valid = torch.ones(N, K, dtype=torch.bool)
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    tw = torch.ones(N)
    return [
        ("logprobs_at", lambda logits, ids: ops.logprobs_at(logits, ids), dict(logits=x, ids=ids)),
        ("linear_topk", lambda hidden, weight: ops.linear_topk(hidden, weight, 2), dict(hidden=h, weight=w)),
        ("opd_topk_loss", lambda **a: ops.opd_topk_loss(a["logits"], a["ids"], a["tq"], a["valid"]),
         dict(logits=x, ids=ids, tq=tq, valid=valid)),
        ("renorm_topk_kl", lambda **a: ops.renorm_topk_kl(a["logits"], a["ids"], a["tq"], a["valid"]),
         dict(logits=x, ids=ids, tq=tq, valid=valid)),
        ("opd_topk_loss_linear", lambda **a: ops.opd_topk_loss_linear(a["h"], a["w"], a["ids"], a["tq"], a["valid"]),
         dict(h=h, w=w, ids=ids, tq=tq, valid=valid)),
        ("renorm_topk_kl_linear",
         lambda **a: ops.renorm_topk_kl_linear(a["h"], a["w"], a["ids"], a["tq"], a["valid"]),
         dict(h=h, w=w, ids=ids, tq=tq, valid=valid)),
        ("opd_topk_loss_linear_weighted",
         lambda **a: ops.opd_topk_loss_linear_weighted(a["h"], a["w"], a["ids"], a["tq"], a["tw"], a["valid"]),
         dict(h=h, w=w, ids=ids, tq=tq, tw=tw, valid=valid)),
        ("ppo_topk_loss", lambda **a: ops.ppo_topk_loss(a["logits"], a["ids"], a["old"], a["adv"], a["valid"]),
         dict(logits=x, ids=ids, old=tq, adv=torch.randn(N, K, generator=g), valid=valid)),
        ("dense_divergence", lambda s, t: ops.dense_divergence(s, t), dict(s=x, t=t)),
        ("dense_divergence_linear_weighted",
         lambda **a: ops.dense_divergence_linear_weighted(a["h"], a["w"], a["th"], a["tw_"], a["tw"]),
         dict(h=h, w=w, th=h.clone(), tw_=w.clone(), tw=tw)),
        ("build_token_set", lambda s, t: ops.build_token_set(s, t, "union"), dict(s=ids, t=ids.flip(1))),
    ]


@pytest.mark.parametrize("name, fn, tensors", _op_calls(), ids=[c[0] for c in _op_calls()])
def test_ops_refuse_a_tensor_on_another_device_including_meta(name, fn, tensors):
    """A meta tensor among real ones used to come back as a result made of uninitialised memory."""
    fn(**tensors)  # as given: fine
    for arg in tensors:
        moved = {k: (v.to("meta") if k == arg else v) for k, v in tensors.items()}
        with pytest.raises(ValueError, match=r"is on (meta|cpu) but \w+ is on (cpu|meta): every tensor argument must "
                                             r"be on one device"):
            fn(**moved)


def test_float_ids_are_refused_not_truncated():
    from opdcore.ops import build_token_set, logprobs_at, opd_topk_loss

    x, ids = torch.randn(2, 10), torch.tensor([[1, 2], [3, 4]])
    for call in (lambda: build_token_set(ids.float() + 0.6, None), lambda: logprobs_at(x, ids.double()),
                 lambda: opd_topk_loss(x, ids.float(), torch.full((2, 2), -1.0))):
        with pytest.raises(TypeError, match="must be an int32 or int64 tensor"):
            call()


@pytest.mark.parametrize("op", ["opd_topk_loss", "renorm_topk_kl", "opd_topk_loss_linear", "ppo_topk_loss"])
def test_logits_passed_for_teacher_log_probs_are_refused(op):
    """The top-k losses take log-probs; a positive value at a valid entry means logits (PPO refused it already)."""
    name, fn, tensors = next(c for c in _op_calls() if c[0] == op)
    key = "old" if op == "ppo_topk_loss" else "tq"
    logits_like = tensors[key] + 5.0
    with pytest.raises(ValueError, match=r"holds a positive log-prob at a valid set entry \(logits instead of "
                                         r"log-probs\?\) in row 0"):
        fn(**{**tensors, key: logits_like})
    invalid_there = tensors["valid"].clone()
    invalid_there[:] = False  # ... where no entry is valid, the values are never read: accepted
    fn(**{**tensors, key: logits_like, "valid": invalid_there})


def test_stream_state_refuses_overlapping_chunks():
    from hypothesis import given, settings, strategies as st

    from opdcore.ops import StreamState, topk_logprobs

    x = torch.randn(3, 60)
    want = topk_logprobs(x, 4)

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.integers(1, 59), min_size=1, max_size=5, unique=True), st.integers(0, 59), st.integers(1, 20),
           st.booleans())
    def check(cuts, start, width, merge):
        bounds = [0, *sorted(cuts), 60]
        parts = list(zip(bounds[:-1], bounds[1:]))
        a, b = StreamState(3, 4), StreamState(3, 4)
        for i, (lo, hi) in enumerate(reversed(parts)):  # any order, split between two states
            (a if i % 2 or not merge else b).update(x[:, lo:hi], lo)
        if merge:
            a.merge(b)
        got = a.finalize()
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.lse, want.lse)
        end = min(60, start + width)
        with pytest.raises(ValueError, match="overlapping .* already streamed into this state"):
            a.update(x[:, start:end], start)  # every id is already in
        fresh = StreamState(3, 4).update(x[:, start:end], start)
        with pytest.raises(ValueError, match="overlapping"):
            a.merge(fresh)

    check()


def test_non_differentiable_ops_do_not_promise_a_gradient():
    from opdcore.ops import StreamState, linear_topk, logprobs_at, topk_logprobs

    x = torch.randn(3, 20, requires_grad=True)
    h, w = torch.randn(3, 4, requires_grad=True), torch.randn(20, 4, requires_grad=True)
    outs = [*topk_logprobs(x, 3), *logprobs_at(x, torch.tensor([[1], [2], [3]])), *linear_topk(h, w, 3),
            *StreamState(3, 2).update(x, 0).finalize()]
    assert not any(t.requires_grad for t in outs)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e5, 1e6])
def test_large_common_offsets_keep_log_softmax_accuracy(offset):
    """Log-probs as (v - max) - log s: at offset 1e6 v - (max + log s) lost 3e-2 that torch.log_softmax keeps."""
    from opdcore.ops import logprobs_at, opd_topk_loss, topk_logprobs

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(16, 500, generator=g, dtype=torch.float64) * 3 + offset).float()
    exact = torch.log_softmax(x.double(), -1)
    torch_err = (torch.log_softmax(x, -1).double() - exact).abs().max().item()
    r = topk_logprobs(x, 8)
    ids = torch.randint(0, 500, (16, 5), generator=g)
    for got, want in ((r.logprobs, exact.gather(1, r.ids)), (logprobs_at(x, ids)[0], exact.gather(1, ids)),
                      (opd_topk_loss(x, ids, torch.full((16, 5), -3.0)).student_logprobs, exact.gather(1, ids))):
        assert (got.double() - want).abs().max().item() <= max(4 * torch_err, 2e-6)
