"""opdcore.objectives: the aggregation modes (against a direct computation), the spec's checks and defaults, and
every objective equal on the three LM heads (logits, fused, and the plain reference) in float64."""
import dataclasses

import pytest
import torch

import opdcore
from opdcore import reference as ref
from opdcore.objectives import (FusedHead, LogitsHead, ObjectiveSpec, Terms, aggregate, aggregation_weights,
                                default_weight_mode, make_objective, token_set)
from opdcore.ops.policy import PPOClip


def test_aggregations():
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    mask = torch.tensor([False, True, True, False, True, False])
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    assert aggregate(per_token, mask).item() == pytest.approx((2 + 3 + 5) / 3)
    assert aggregate(per_token, mask, "seq-mean-token-mean", cu).item() == pytest.approx((2.5 + 5) / 2)
    assert aggregate(per_token, mask, "seq-mean-token-sum", cu).item() == pytest.approx((5 + 5) / 2)
    # verl's Dr. GRPO mode: the sequence sums over a constant, not the sequence's length
    assert aggregate(per_token, mask, "seq-mean-token-sum-norm", cu, norm_length=4).item() == \
        pytest.approx((5 + 5) / 2 / 4)
    # a sequence with no response tokens is skipped, not averaged in as 0
    mask2 = torch.tensor([False, False, False, True, True, False])
    assert aggregate(per_token, mask2, "seq-mean-token-mean", cu).item() == pytest.approx(4.5)
    # the weights the trainer forms are the same definition
    w = aggregation_weights(torch.tensor([2.0, 2.0, 1.0]), "seq-mean-token-mean", 3.0, 2.0)
    torch.testing.assert_close(w, torch.tensor([0.25, 0.25, 0.5]))


@pytest.mark.parametrize("call,match", [
    (lambda: aggregate(torch.ones(3), torch.ones(3, dtype=torch.bool), "mean"), "aggregation must be one of"),
    (lambda: aggregate(torch.ones(3), torch.ones(2, dtype=torch.bool)), "must both be"),
    (lambda: aggregate(torch.ones(3), torch.ones(3, dtype=torch.bool), "seq-mean-token-sum"), "needs cu_seqlens"),
    (lambda: aggregate(torch.ones(3), torch.ones(3, dtype=torch.bool), "seq-mean-token-sum",
                       torch.tensor([0, 2], dtype=torch.int32)), "cu_seqlens must be"),
    (lambda: aggregate(torch.ones(3), torch.ones(3, dtype=torch.bool), "seq-mean-token-sum-norm",
                       torch.tensor([0, 3], dtype=torch.int32)), "needs norm_length > 0"),
])
def test_aggregate_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("kw,match", [
    (dict(loss="kl"), "loss must be one of"), (dict(topk=-1), "topk must be >= 0"),
    (dict(topk=0, loss="renorm_kl"), "needs topk > 0"), (dict(strategy="both"), "strategy must be one of"),
    (dict(weight_mode="p"), "weight_mode must be"), (dict(divergence="tv"), "divergence must be one of"),
    (dict(temperature=0.0), "temperature must be > 0"), (dict(aggregation="sum"), "aggregation must be"),
])
def test_spec_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ObjectiveSpec(**kw)


def test_weight_mode_defaults():
    assert default_weight_mode("union-intersection") == "student_p_raw"
    assert default_weight_mode("only_stu") == "student_p"
    assert ObjectiveSpec(topk=0, weight_mode="teacher_p").resolved_weight_mode == "none"  # the sampled token: 1
    assert ObjectiveSpec(strategy="symmetric_difference").resolved_weight_mode == "student_p_raw"
    assert ObjectiveSpec(weight_mode="teacher_p").resolved_weight_mode == "teacher_p"


def _case(seed=0, n=7, v=50, h=12, k=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    t_hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    t_weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    sampled = torch.randint(0, v, (n,), generator=g)
    tw = torch.rand(n, generator=g, dtype=torch.float64)
    return hidden, weight, t_hidden, t_weight, sampled, tw, k


def _terms(spec, hidden, weight, t_hidden, t_weight, sampled, tw, temperature=1.0):
    s = opdcore.linear_topk(hidden, weight, spec.topk, temperature=temperature, ids=sampled[:, None])
    t_ids = sampled[:, None] if spec.topk == 0 else torch.cat([s.ids, sampled[:, None]], 1)
    t = opdcore.linear_topk(t_hidden, t_weight, spec.topk, temperature=spec.teacher_temperature, ids=t_ids)
    k = spec.topk
    ts = token_set(spec, sampled, t.target_logprobs[:, -1], s.ids if k else None, t.ids if k else None,
                   t.target_logprobs[:, :k] if k else None, t.logprobs if k else None)
    return ts, Terms(ts.ids, ts.teacher_logprobs, ts.valid, tw, teacher=FusedHead(t_hidden, t_weight))


SPECS = [ObjectiveSpec(topk=4), ObjectiveSpec(topk=4, strategy="union", log_ratio_clip=1.0),
         ObjectiveSpec(topk=4, strategy="symmetric_difference"), ObjectiveSpec(topk=0),
         ObjectiveSpec(topk=4, loss="renorm_kl", strategy="intersection"), ObjectiveSpec(topk=4, loss="tail_kl"),
         ObjectiveSpec(loss="dense", divergence="jsd", beta=0.3, temperature=0.8, teacher_temperature=1.3),
         ObjectiveSpec(loss="dense", divergence="forward_kl")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.loss}-{s.topk}-{s.strategy}-{s.divergence}")
def test_objective_same_on_every_head_and_equal_to_reference(spec):
    """make_objective(spec) on the fused head (hidden states + LM head), on logits, and the plain-PyTorch
    definition: value and gradient to 1e-10 in float64."""
    hidden, weight, t_hidden, t_weight, sampled, tw, _ = _case()
    ts, terms = _terms(spec, hidden, weight, t_hidden, t_weight, sampled, tw)
    objective = make_objective(spec)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = objective(FusedHead(h1, w1), terms)
    fused.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = objective(LogitsHead(h2 @ w2.T), dataclasses.replace(terms, teacher=LogitsHead(t_hidden @ t_weight.T)))
    plain.loss.backward()
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-8, atol=1e-10)
    logits = hidden @ weight.T
    if spec.loss == "reward_weighted":
        per, _ = ref.opd_topk_loss(logits, ts.ids, ts.teacher_logprobs, ts.valid, spec.resolved_weight_mode,
                                   spec.temperature, spec.log_ratio_clip)
        r, _ = ref.opd_rewards(torch.log_softmax(logits / spec.temperature, -1).gather(1, ts.ids),
                               ts.teacher_logprobs, ts.valid, spec.resolved_weight_mode, spec.log_ratio_clip)
        torch.testing.assert_close(fused.pg_loss, -(r.sum(1) * tw).sum(), rtol=1e-10, atol=1e-12)
    elif spec.loss == "renorm_kl":
        per = ref.renorm_topk_kl(logits, ts.ids, ts.teacher_logprobs, ts.valid)
    elif spec.loss == "tail_kl":
        per = ref.tail_topk_kl(logits, ts.ids, ts.teacher_logprobs, ts.valid)
    else:
        per = ref.dense_divergence(logits, t_hidden @ t_weight.T * spec.teacher_scale, spec.divergence, spec.beta,
                                   spec.temperature)
    torch.testing.assert_close(fused.loss, (per * tw).sum(), rtol=1e-10, atol=1e-12)


def test_ppo_and_outcome_terms():
    """With spec.ppo and the rollout-time student's log-probs, the surrogate's first step has the plain loss's
    gradient (ratio 1), its clip counts come back; the outcome term adds -w A log p(y) either way."""
    hidden, weight, t_hidden, t_weight, sampled, tw, _ = _case(1)
    spec = ObjectiveSpec(topk=4, outcome_weight=0.5)
    ts, terms = _terms(spec, hidden, weight, t_hidden, t_weight, sampled, tw)
    lp = torch.log_softmax(hidden @ weight.T, -1)
    adv = torch.randn(len(sampled), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    terms.outcome = (sampled[:, None], lp.gather(1, sampled[:, None])[:, 0], adv)
    grads = []
    for ppo in (None, PPOClip()):
        s = dataclasses.replace(spec, ppo=ppo)
        old = lp.gather(1, ts.ids)
        t = dataclasses.replace(terms, ppo=(old, opdcore.ops.opd_rewards(old, ts.teacher_logprobs, ts.valid)[0]))
        h = hidden.clone().requires_grad_()
        out = make_objective(s)(FusedHead(h, weight), t)
        out.loss.backward()
        grads.append(h.grad)
        assert (out.clip_counts is not None) == (ppo is not None)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)
    # the outcome term alone: -0.5 * sum_t w_t A_t log p(y_t)
    h = hidden.clone().requires_grad_()
    out = make_objective(spec)(FusedHead(h, weight), dataclasses.replace(terms, ids=terms.ids[:, :0],
                                                                          teacher_logprobs=terms.teacher_logprobs[:, :0],
                                                                          valid=terms.valid[:, :0]))
    want = -(0.5 * tw * adv * torch.log_softmax(h @ weight.T, -1).gather(1, sampled[:, None])[:, 0]).sum()
    g_out, = torch.autograd.grad(out.loss, h)
    g_want, = torch.autograd.grad(want, h)
    torch.testing.assert_close(g_out, g_want, rtol=1e-8, atol=1e-10)


def test_objective_errors():
    hidden, weight, t_hidden, t_weight, sampled, tw, _ = _case()
    _, terms = _terms(ObjectiveSpec(topk=4), hidden, weight, t_hidden, t_weight, sampled, tw)
    with pytest.raises(ValueError, match="terms.teacher"):
        make_objective(ObjectiveSpec(loss="dense"))(FusedHead(hidden, weight), dataclasses.replace(terms, teacher=None))
    with pytest.raises(ValueError, match="terms.ppo"):
        make_objective(ObjectiveSpec(topk=4, ppo=PPOClip()))(FusedHead(hidden, weight), terms)


@pytest.mark.parametrize("v,m", [(40, 8), (3000, 8)])  # the whole-logits path (small vocabulary) and the gather
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_logprobs_at(v, m, dtype):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(50, 16, generator=g).to(dtype)
    weight = torch.randn(v, 16, generator=g).to(dtype)
    ids = torch.randint(0, v, (50, m), generator=g)
    head = FusedHead(hidden, weight)
    lse = head.score(4, 0.7, None).lse
    got = head.logprobs_at(ids, 0.7, lse, rows=16)
    want = torch.log_softmax((hidden @ weight.T).float() / 0.7, -1).gather(1, ids)
    torch.testing.assert_close(got, want, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-5)
    assert (got <= 0).all()
