"""Trainer pieces without models: token sets per strategy, aggregation weights, checkpoints, schedules."""
import math
import os
from types import SimpleNamespace

import pytest
import torch

from opdcore.config import Config
from opdcore.objectives import ObjectiveSpec
from opdcore.ops import TokenSet
from opdcore.trainer import checkpoint, step as S
from opdcore.trainer.microbatch import MicroBatch
from opdcore.trainer.schedule import make_scheduler


def _mb(targets, token_seq):
    n = len(targets)
    return MicroBatch([], torch.zeros(1, 1), torch.ones(1, 1), torch.arange(n), torch.tensor(targets),
                      torch.tensor(token_seq), torch.zeros(n), torch.arange(n))


def _scored(s_ids, t_ids):
    s_ids, t_ids = torch.tensor(s_ids), torch.tensor(t_ids)
    n = s_ids.shape[0]
    q = lambda ids: -0.1 * ids.float()  # the teacher's log-prob of an id, whichever pass computed it
    return S.Scored(s_ids, -torch.rand(s_ids.shape), torch.rand(n), -torch.rand(n), t_ids, q(t_ids),
                    q(s_ids), torch.rand(n), -torch.rand(n))


@pytest.mark.parametrize("strategy,expected,mode", [
    ("student", [{1, 2, 3}], "student_p"),
    ("teacher", [{3, 4, 5}], "student_p"),
    ("intersection", [{3}], "student_p"),
    ("union", [{1, 2, 3, 4, 5}], "student_p"),
    ("symmetric_difference", [{1, 2, 4, 5}], "student_p_raw"),
    ("union-intersection", [{1, 2, 4, 5}], "student_p_raw"),
])
def test_token_set_per_strategy(strategy, expected, mode):
    cfg = Config()
    cfg.loss.topk, cfg.loss.strategy = 3, strategy
    sc = _scored([[1, 2, 3]], [[3, 4, 5]])
    ids, valid, tq = S.token_set(sc, _mb([9], [0]), cfg)
    assert [set(ids[0][valid[0]].tolist())] == expected and S.objective_spec(cfg).resolved_weight_mode == mode
    # the teacher log-prob of each id comes from the right source: on-student for S, own top-k for T
    for i, q, v in zip(ids[0].tolist(), tq[0].tolist(), valid[0].tolist()):
        assert q == pytest.approx(-0.1 * i)


def test_sampled_token_set():
    cfg = Config()
    cfg.loss.topk = 0
    sc = _scored([[1]], [[1]])
    ids, valid, tq = S.token_set(sc, _mb([7], [0]), cfg)
    assert ids.tolist() == [[7]] and tq[0, 0] == sc.teacher_sampled_lp[0] and valid.all()
    assert S.objective_spec(cfg).resolved_weight_mode == "none"


def test_aggregation_weights_give_the_configured_mean():
    # two rollouts of lengths 3 and 1, split over two micro-batches; world size 2 doubles the weights
    mbs = [_mb([1, 2], [0, 0]), _mb([3, 4], [0, 1])]
    lengths = {0: 3, 1: 1}
    per_token = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    def total(agg, world=1):
        w = S.token_weights(mbs, lengths, ObjectiveSpec(aggregation=agg, norm_length=8), 4.0, 2.0, world)
        return sum(float((p * x).sum()) for p, x in zip(per_token, w))
    assert total("token-mean") == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert total("seq-mean-token-mean") == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)
    assert total("seq-mean-token-sum") == pytest.approx(((1 + 2 + 3) + 4) / 2)
    assert total("seq-mean-token-sum-norm") == pytest.approx(((1 + 2 + 3) + 4) / 2 / 8)
    assert total("token-mean", world=2) == pytest.approx(2 * (1 + 2 + 3 + 4) / 4)


def test_checkpoint_atomic_and_resume_helpers(tmp_path):
    root = str(tmp_path / "ck")
    assert checkpoint.latest(root) is None
    torch.manual_seed(3)
    p1 = checkpoint.save(root, 1, {"step": 1, "x": [0, 1, 2]}, keep=2)
    checkpoint.save(root, 2, {"step": 2}, keep=2)
    after_2 = torch.rand(2)
    checkpoint.save(root, 3, {"step": 3}, keep=2)
    assert not os.path.exists(p1)  # pruned to the newest two
    os.makedirs(os.path.join(root, "step_00000009.tmp"))  # a kill mid-write leaves only a temporary folder
    os.makedirs(os.path.join(root, "step_00000008"))  # or a folder without its completion marker
    assert checkpoint.latest(root).endswith("step_00000003")
    state = checkpoint.load(checkpoint.latest(root))
    assert state["step"] == 3
    checkpoint.set_rng_state(checkpoint.load(os.path.join(root, "step_00000002"))["rng"])
    assert torch.equal(torch.rand(2), after_2)  # the RNG state saved at step 2 reproduces the draws after it
    with open(os.path.join(root, "step_00000003", checkpoint.STATE), "w") as f:
        f.write("garbage")
    with pytest.raises(ValueError, match="is damaged: trainer.json does not match the checksum"):
        checkpoint.load(os.path.join(root, "step_00000003"))
    with pytest.raises(ValueError, match="corrupt or unreadable"):  # unchecked, it still fails clearly
        checkpoint.load(os.path.join(root, "step_00000003"), check=False)
    with pytest.raises(ValueError, match="not a complete opdcore checkpoint"):
        checkpoint.load(os.path.join(root, "step_00000008"))


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(0)
    state = checkpoint.rng_state()
    a = torch.rand(3)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_schedules(kind):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(opt, kind, warmup=2, total=10, min_ratio=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    if kind == "constant":
        assert lrs[-1] == 1.0
    else:
        assert lrs[-1] < lrs[2] and min(lrs) >= 0.1 - 1e-9
    with pytest.raises(ValueError, match="schedule must be"):
        make_scheduler(opt, "step", 0, 10)


def test_grpo_advantages():
    adv = S.grpo_advantages([0, 0, 0, 0, 1, 1], [1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(adv[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    assert adv[4:].tolist() == [0.0, 0.0]  # all-correct group: no outcome signal


def test_outcome_term_is_a_policy_gradient_on_the_sampled_token():
    """The hybrid term reuses the OPD kernel with q := p * e^A, so its reward is exactly the advantage A and its
    gradient that of -A * log p(y)."""
    import opdcore

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 40, (5, 1), generator=g)
    adv = torch.randn(5, generator=g, dtype=torch.float64)
    lp0 = torch.log_softmax(logits.detach(), -1).gather(1, y).squeeze(1)
    out = opdcore.opd_topk_loss(logits, y, (lp0 + adv)[:, None], weight_mode="none")
    torch.testing.assert_close(out.rewards.squeeze(1), adv)
    out.loss.sum().backward()
    x2 = logits.detach().clone().requires_grad_(True)
    (-(adv * torch.log_softmax(x2, -1).gather(1, y).squeeze(1))).sum().backward()
    torch.testing.assert_close(logits.grad, x2.grad)


def test_micro_batches_match_the_busiest_rank(monkeypatch):
    """Each FSDP forward is a collective: a rank with fewer micro-batches than another must run as many,
    rebalancing its rollouts and padding with None (replayed at weight 0 by update())."""
    from opdcore.rollout import Rollout
    from opdcore.trainer import dist, microbatch

    rollouts = [Rollout(i, [1, 5, 6, 8][:4 - i], [7] * (3 + i), [-1.0] * (3 + i), True) for i in range(3)]
    alone = microbatch.build(rollouts, max_tokens=64, device="cpu")
    assert len(alone) == 1 and alone[0].num_tokens == 3 + 4 + 5
    mb = alone[0]
    # pred_index points at the position before each response token, targets are the response tokens
    flat = mb.input_ids.reshape(-1)
    assert torch.equal(flat[mb.pred_index + 1], mb.targets) and (mb.targets == 7).all()
    assert torch.equal(mb.rollout_logprobs, torch.full((12,), -1.0))
    assert mb.positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]  # within each response
    monkeypatch.setattr(dist, "all_reduce", lambda values, op="sum": torch.tensor([5.0]))
    busy = microbatch.build(rollouts, max_tokens=64, device="cpu")
    assert len(busy) == 5 and sum(m is not None for m in busy) == 3
    assert sorted(i for m in busy if m is not None for i in m.indices) == [0, 1, 2]


class _ScalarStudent(torch.nn.Module):
    """A one-parameter "model" that is its own LM head: its set loss is w * sum(token_weights) (or `value`)."""

    def __init__(self, value=None, calls=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.value, self.calls = value, calls

    def forward(self, input_ids, attention_mask, pred_index, use, position_ids=None):
        return use(self)

    def set_loss(self, ids, teacher_logprobs, token_weights, valid=None, **kw):
        if self.calls is not None:
            self.calls.append(float(token_weights.sum()))
        loss = (self.w * (token_weights if self.value is None else self.value)).sum()
        return loss, SimpleNamespace(rewards=torch.zeros(ids.shape))


def _one_set(n):
    return TokenSet(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.bool), torch.zeros(n, 1))


def test_update_replays_a_micro_batch_at_weight_zero():
    calls = []
    student = _ScalarStudent(calls=calls)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    mb = _mb([1, 2], [0, 0])
    out = S.update(student, opt, [mb, None], [_one_set(2), None], [torch.tensor([0.5, 0.5]), None], Config(),
                   list(student.parameters()))
    assert calls == [1.0, 0.0]  # the padded slot ran (a collective under FSDP) but contributed nothing
    assert out["loss"] == 1.0 and out["grad_norm"] == pytest.approx(1.0)


def test_non_finite_gradient_skips_the_step():
    student = _ScalarStudent(value=float("inf"))
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="skipping this optimizer step"):
        out = S.update(student, opt, [_mb([1], [0])], [_one_set(1)], [torch.ones(1)],
                       Config(), list(student.parameters()))
    assert out["step_skipped"] == 1.0 and student.w.item() == 1.0


def test_sequence_diagnostics_over_micro_batches():
    """rbar per response from whichever micro-batch holds it; AUROC against the grades; the largest |reward|."""
    from opdcore.rollout import Rollout
    from opdcore.trainer import metrics as M

    def scored(slp, tlp):
        n = len(slp)
        return S.Scored(None, None, torch.zeros(n), torch.tensor(slp), None, None, None, torch.zeros(n),
                        torch.tensor(tlp))

    rollouts = [Rollout(0, [1], [2, 3], None, True) for _ in range(4)]
    # response 1 and 3 in the first micro-batch, 0 and 2 in the second; rbar = 1.5, -1.0, 0.5, -0.25
    mbs = [_mb([5, 5, 5, 5], [1, 1, 3, 3]), None, _mb([5, 5, 5], [0, 2, 2])]
    sc = [scored([0.0, 0.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.5]), None,
          scored([-2.5, -1.0, -2.0], [-1.0, -0.5, -1.5])]
    out = M._sequence_diagnostics(rollouts, [1.0, 0.0, 1.0, float("nan")], mbs, sc)
    assert out["reward_auroc"] == 1.0  # correct responses 0 (1.5) and 2 (0.5) both above incorrect 1 (-1.0)
    out = M._sequence_diagnostics(rollouts, [0.0, 0.0, 1.0, 1.0], mbs, sc)
    assert out["reward_auroc"] == 0.5  # correct {0.5, -0.25} vs incorrect {1.5, -1.0}: 2 of 4 pairs
    assert out["largest_token_reward"] == 1.5
    assert out["p_minus_q_at_largest_reward"] == pytest.approx(math.exp(-2.5) - math.exp(-1.0))


def test_mini_batch_groups_partition_the_micro_batches():
    for count in range(1, 9):
        for m in range(1, count + 1):
            groups = S.mini_batch_groups(count, m)
            assert len(groups) == m and all(groups) and sum(groups, []) == list(range(count))
            assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_merge_updates():
    one = {"loss": 1.0, "grad_norm": 2.0, "step_skipped": 0.0}
    assert S.merge_updates([one]) is one
    a = dict(one, clip_counts=torch.tensor([1.0, 4.0, 0.5, 1.3], dtype=torch.float64))
    b = {"loss": 3.0, "grad_norm": float("inf"), "step_skipped": 1.0,
         "clip_counts": torch.tensor([2.0, 4.0, 0.25, 1.1], dtype=torch.float64)}
    out = S.merge_updates([a, b])
    assert out["loss"] == 2.0 and out["grad_norm"] == float("inf") and out["step_skipped"] == 1.0
    assert out["optimizer_steps"] == 2.0 and out["clip_counts"].tolist() == [3.0, 8.0, 0.75, 1.3]


def _tiny_student_batch(seed=0):
    """A real tiny student and teacher (OPDModel) and one micro-batch of 3 rollouts."""
    from opdcore.data.synthetic import tiny_llama
    from opdcore.rollout import Rollout
    from opdcore.trainer import microbatch
    from opdcore.trainer.models import OPDModel

    V = 40
    student = OPDModel(tiny_llama(V, hidden=32, layers=1, heads=2, seed=seed), V)
    teacher = OPDModel(tiny_llama(V, hidden=32, layers=1, heads=2, seed=seed + 1), V).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    rollouts = [Rollout(i % 2, torch.randint(0, V, (3,), generator=g).tolist(),
                        torch.randint(0, V, (4 + i,), generator=g).tolist(), None, True) for i in range(3)]
    return student, teacher, microbatch.build(rollouts, 10_000, "cpu")


@pytest.mark.parametrize("extra", [{}, {"loss.strategy": "union"}, {"loss.topk": 0, "loss.outcome_weight": 0.5},
                                   {"loss.strategy": "teacher", "loss.fused_lm_head": False}])
def test_first_ppo_update_is_the_single_update(extra):
    """Several updates per batch: the first optimizer step (student = the one that scored the rollouts, ratio 1)
    has the gradient of the plain OPD update, for the scored and the re-scored (teacher-id) sets alike."""
    from opdcore.config import load_config

    overrides = {"loss.topk": 6, "loss.log_ratio_clip": 5.0, **extra}
    cfg = load_config(None, tuple(f"{k}={v}" for k, v in overrides.items()))
    student, teacher, mbs = _tiny_student_batch()
    student.fused = cfg.loss.fused_lm_head
    scored = [S.score(student, teacher, mb, cfg) for mb in mbs]
    sets = [S.token_set(sc, mb, cfg) for sc, mb in zip(scored, mbs)]
    lengths = {i: n for mb in mbs for i, n in zip(*mb.token_seq.unique(return_counts=True))}
    lengths = {int(i): int(n) for i, n in lengths.items()}
    n_tok = sum(mb.num_tokens for mb in mbs)
    weights = S.token_weights(mbs, lengths, S.objective_spec(cfg), float(n_tok), float(len(lengths)), 1)
    adv = S.grpo_advantages([0, 1, 0], [1.0, 0.0, 0.0]) if cfg.loss.outcome_weight else None
    outcome = S.outcome_terms(mbs, scored, adv)
    params = list(student.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    grads = []
    for policy in (None, [S.policy_terms(student, mb, sc, ts, cfg) for mb, sc, ts in zip(mbs, scored, sets)]):
        out = S.update(student, opt, mbs, sets, weights, cfg, params, outcome, teacher=teacher, policy=policy)
        grads.append([p.grad.clone() for p in params])
        assert ("clip_counts" in out) == (policy is not None)
    assert out["clip_counts"][0] == 0 and out["clip_counts"][1] > 0  # nothing clipped at ratio 1
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_rollout_correction_is_a_truncated_importance_weight():
    mb = _mb([1, 2, 3, 4], [0, 0, 1, 1])
    mb.rollout_logprobs = torch.tensor([-1.0, -2.0, float("nan"), -0.5])
    sc = S.Scored(None, None, torch.zeros(4), torch.tensor([-1.5, -0.5, -1.0, -0.5]), None, None, None,
                  torch.zeros(4), torch.zeros(4))
    w = S.rollout_correction(mb, sc, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([math.exp(-0.5), 2.0, 1.0, 1.0]))  # e^1.5 capped; unknown: 1


def test_resume_refuses_changed_run_settings():
    """A rerun into an output folder resumes only a run with the same run-defining settings; logging, length,
    evaluation and parallelism may change."""
    from opdcore.config import Config, to_dict
    from opdcore.trainer.loop import changed_settings

    saved = to_dict(Config())
    now = Config()
    now.train.steps, now.train.threads, now.eval.every, now.train.tensor_parallel = 500, 3, 7, 2
    assert changed_settings(saved, to_dict(now)) == []
    now.loss.topk, now.optim.lr = 4, 3e-4
    assert changed_settings(saved, to_dict(now)) == [("loss.topk", 16, 4), ("optim.lr", 1e-6, 3e-4)]
    assert changed_settings(None, to_dict(now)) == []  # a checkpoint without a config
    older = {k: {kk: vv for kk, vv in v.items() if kk != "autocast"} for k, v in saved.items()}
    assert changed_settings(older, to_dict(Config())) == []  # settings added since compare as unchanged


def test_update_leaves_no_stale_autocast_copies():
    """An update inside a bfloat16 autocast block: a forward after the optimizer step must see the new weights,
    not the bfloat16 copies autocast cached before it."""
    from opdcore.config import load_config

    cfg = load_config(None, ("loss.topk=6", "model.autocast=bfloat16", "optim.lr=0.5"))
    student, teacher, mbs = _tiny_student_batch()
    params = list(student.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    mb = mbs[0]

    def hidden():
        return student.hf.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).last_hidden_state

    with torch.autocast("cpu", dtype=torch.bfloat16):
        sc = S.score(student, teacher, mb, cfg)
        hidden()  # caches bfloat16 copies of the weights
        S.update(student, opt, mbs, [S.token_set(sc, mb, cfg)], [torch.full((mb.num_tokens,), 0.1)], cfg, params)
        after = hidden()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = hidden()
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("extra", [{}, {"loss.strategy": "union"}, {"loss.topk": 0, "loss.outcome_weight": 0.5},
                                   {"loss.dense": "jsd", "loss.teacher_temperature": 0.7},
                                   {"loss.tail_kl": True, "loss.strategy": "teacher"},
                                   {"loss.renorm_kl": True, "rollout.temperature": 0.8},
                                   {"model.autocast": "bfloat16"}])
def test_scoring_in_the_update_equals_a_separate_student_pass(extra):
    """train.score_in_update: the student's scores taken inside the update's forward and the teacher's log-probs
    on its top-k from the kept teacher hidden states give the scores, sets and gradient of the separate pass."""
    from opdcore.config import load_config

    overrides = {"loss.topk": 6, "loss.log_ratio_clip": 5.0, **extra}
    cfg = load_config(None, tuple(f"{k}={v}" for k, v in overrides.items()))
    student, teacher, mbs = _tiny_student_batch()
    n_tok = sum(mb.num_tokens for mb in mbs)
    weights = S.token_weights(mbs, {0: 4, 1: 5, 2: 6}, S.objective_spec(cfg), float(n_tok), 3.0, 1)
    adv = S.grpo_advantages([0, 1, 0], [1.0, 0.0, 0.0]) if cfg.loss.outcome_weight else None
    params = list(student.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    bf16 = cfg.model.autocast != "none"
    with S.autocast(cfg, torch.device("cpu")):
        scored = [S.score(student, teacher, mb, cfg) for mb in mbs]
        kept = [S.score_teacher(teacher, mb, cfg) for mb in mbs]
    sets = [S.token_set(sc, mb, cfg) for sc, mb in zip(scored, mbs)]
    out_a = S.update(student, opt, mbs, sets, weights, cfg, params, S.outcome_terms(mbs, scored, adv), teacher=teacher)
    grads_a = [p.grad.clone() for p in params]
    filled = [None] * len(mbs)
    out_b = S.update(student, opt, mbs, filled, weights, cfg, params, teacher=teacher, scored=kept, advantages=adv)
    grads_b = [p.grad.clone() for p in params]
    tol = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(scored, kept):
        for name in ("student_ids", "teacher_ids"):
            assert (getattr(a, name) is None) == (getattr(b, name) is None)
            if getattr(a, name) is not None and not bf16:
                assert torch.equal(getattr(a, name), getattr(b, name)), name
        for name in ("student_logprobs", "student_entropy", "student_sampled_lp", "teacher_on_student_lp",
                     "teacher_sampled_lp", "teacher_entropy"):
            if getattr(a, name) is not None:
                torch.testing.assert_close(getattr(b, name), getattr(a, name), **tol, msg=name)
        assert b.teacher_hidden is None  # not held past the update
    for ta, tb in zip(sets, filled):
        if not bf16:
            assert torch.equal(ta.ids, tb.ids) and torch.equal(ta.valid, tb.valid)
    assert out_b["loss"] == pytest.approx(out_a["loss"], rel=2e-2 if bf16 else 1e-5, abs=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, **(dict(rtol=5e-2, atol=5e-3) if bf16 else dict(rtol=1e-4, atol=1e-6)))
