"""opdcore.integrations.verl against the real verl 0.9.1: the functions fetched through verl's registries agree with
opdcore's own loss, a plain-PyTorch recomputation of the reference fork's reward, and verl's own agg_loss and
vanilla policy loss."""
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")  # guard only: setup.sh installs verl
from verl.workers.config import FSDPActorConfig  # noqa: E402

import opdcore  # noqa: E402
from opdcore import reference  # noqa: E402
from opdcore.integrations import verl as opd_verl  # noqa: E402
from opdcore.objectives import aggregate  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
F64 = torch.float64
STRATEGIES = opd_verl.FORK_STRATEGIES
WEIGHTS = opd_verl.FORK_WEIGHT_MODES
B, T, V, K = 3, 5, 24, 4


@pytest.fixture(scope="module", autouse=True)
def registered():
    opd_verl.register()
    opd_verl.register()  # idempotent
    yield


def policy_loss():
    return core_algos.get_policy_loss_fn(opd_verl.POLICY_LOSS_NAME)


def adv_estimator():
    return core_algos.get_adv_estimator_fn(opd_verl.ADV_ESTIMATOR_NAME)


def actor_config(**kw):
    return FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **kw)


def mask_bt():
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, 3:] = False
    m[2, 1:] = False
    return m


class Batch:
    """Student and teacher logits whose top-k sets overlap partly, and the fork's batch tensors from them."""

    def __init__(self, seed=0, k=K, teacher_temperature=1.0):
        g = torch.Generator().manual_seed(seed)
        self.zs = torch.randn(B, T, V, generator=g, dtype=F64) * 2
        self.zt = self.zs + torch.randn(B, T, V, generator=g, dtype=F64) * 1.5
        self.ls = torch.log_softmax(self.zs, -1)
        self.lt = torch.log_softmax(self.zt / teacher_temperature, -1)
        s_lp, self.s_ids = self.ls.topk(k, -1)
        t_lp, self.t_ids = self.lt.topk(k, -1)
        self.mask = mask_bt()
        self.kwargs = dict(student_top_k_ids=self.s_ids, student_top_k_log_probs=s_lp,
                           teacher_on_student_log_probs=self.lt.gather(-1, self.s_ids), teacher_top_k_ids=self.t_ids,
                           teacher_top_k_log_probs=t_lp, student_log_probs_on_teacher_ids=self.ls.gather(-1, self.t_ids))


def fork_rewards(batch, strategy, weight_mode):
    """The fork's distillation reward in plain PyTorch from the full log-softmaxes: set from the loop reference,
    weights softmax-renormalised over the set (raw exp for union-intersection; log-weight 0 for "none")."""
    ids, valid = reference.build_token_set(batch.s_ids.reshape(B * T, -1), batch.t_ids.reshape(B * T, -1), strategy)
    ids, valid = ids.reshape(B, T, -1), valid.reshape(B, T, -1) & batch.mask.unsqueeze(-1)
    slp, tlp = batch.ls.gather(-1, ids), batch.lt.gather(-1, ids)
    src = {"student_p": slp, "teacher_p": tlp, "none": torch.zeros_like(slp)}[weight_mode]
    src = src.masked_fill(~valid, float("-inf"))
    w = src.exp() if strategy == "union-intersection" else torch.softmax(src, -1)
    w = torch.nan_to_num(w, nan=0.0)  # an empty set (intersection) gets no weight
    return ids, valid, torch.where(valid, -(slp - tlp) * w, torch.zeros_like(slp))


def student_logprobs_on(zs_param, ids):
    return torch.log_softmax(zs_param, -1).gather(-1, ids)


# ---- rewards, advantages and the loss for every strategy and weight mode ----------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("weight_mode", WEIGHTS)
def test_registered_loss_matches_opdcore_and_plain_pytorch(strategy, weight_mode):
    batch = Batch(seed=STRATEGIES.index(strategy) * 7 + WEIGHTS.index(weight_mode))
    cfg = opd_verl.VerlOPDConfig(log_prob_top_k=K, top_k_strategy=strategy, reward_weight_mode=weight_mode)
    out = opd_verl.compute_opd_rewards(cfg, batch.mask, **batch.kwargs)

    ids, valid, r_fork = fork_rewards(batch, strategy, weight_mode)
    assert torch.equal(out.ids, ids) and torch.equal(out.valid, valid)
    torch.testing.assert_close(out.rewards, r_fork, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.token_rewards, r_fork.sum(-1), rtol=1e-12, atol=1e-12)
    if strategy != "union-intersection":  # opdcore's reference names the same weights
        r_ref, loss_ref = reference.opd_rewards(out.student_log_probs.reshape(B * T, -1),
                                                out.teacher_log_probs.reshape(B * T, -1),
                                                valid.reshape(B * T, -1), weight_mode)
        torch.testing.assert_close(out.rewards.reshape(B * T, -1), r_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.loss.reshape(-1), loss_ref, rtol=1e-12, atol=1e-12)

    adv, returns = adv_estimator()(token_level_rewards=out.rewards, response_mask=batch.mask, config=None)
    torch.testing.assert_close(adv, r_fork * batch.mask.unsqueeze(-1))
    torch.testing.assert_close(returns, adv)
    # the estimator itself masks: the fork hands it rewards that are not zero outside the response
    raw = torch.randn(B, T, out.rewards.shape[-1], dtype=F64)
    adv_raw, _ = adv_estimator()(token_level_rewards=raw, response_mask=batch.mask, config=None, index=None)
    torch.testing.assert_close(adv_raw, raw * batch.mask.unsqueeze(-1))
    adv2, _ = adv_estimator()(token_level_rewards=raw[..., 0], response_mask=batch.mask.long(), config=None)
    torch.testing.assert_close(adv2, raw[..., 0] * batch.mask)

    # verl's call, the fork's actor: log p on the set ids with gradient, old = the same detached (ratio 1)
    zs = batch.zs.clone().requires_grad_()
    lp = student_logprobs_on(zs, out.ids)
    pg_loss, metrics = policy_loss()(old_log_prob=lp.detach(), log_prob=lp, advantages=adv,
                                     response_mask=batch.mask, loss_agg_mode="token-mean",
                                     config=actor_config(), rollout_is_weights=None)
    (g_verl,) = torch.autograd.grad(pg_loss, zs)
    n_tok = batch.mask.sum()
    # value: the fork's pg_loss, sum_set w*l = -sum of the rewards, token-mean
    torch.testing.assert_close(pg_loss, -r_fork.sum(-1)[batch.mask].sum() / n_tok, rtol=1e-6, atol=1e-12)

    # opdcore's own kernel loss on the same set (the kernel's weight mode), token-mean
    zk = batch.zs.clone().reshape(B * T, V).requires_grad_()
    own = opdcore.opd_topk_loss(zk, out.ids.reshape(B * T, -1), out.teacher_log_probs.reshape(B * T, -1),
                                valid.reshape(B * T, -1), weight_mode=cfg.weight_mode)
    own_total = aggregate(own.loss, batch.mask.reshape(-1), "token-mean")
    own_value = float(own_total.detach())
    (g_own,) = torch.autograd.grad(own_total, zk)
    torch.testing.assert_close(g_verl.reshape(B * T, V), g_own, rtol=1e-10, atol=1e-12)
    assert metrics["actor/opdcore_loss"] == pytest.approx(own_value, rel=1e-10, abs=1e-12)

    # plain PyTorch: -sum sg(r) log p through autograd, with the fork's rewards
    zp = batch.zs.clone().requires_grad_()
    plain = -(r_fork * student_logprobs_on(zp, ids)).sum(-1)[batch.mask].sum() / n_tok
    (g_plain,) = torch.autograd.grad(plain, zp)
    # opdcore's aggregation weights are float32 (1/N rounded): 1e-7 relative against a float64 recomputation
    torch.testing.assert_close(g_verl, g_plain, rtol=1e-6, atol=1e-12)
    assert float(pg_loss.detach()) != pytest.approx(own_value)  # the two values differ: hence both are logged


def test_union_intersection_none_is_one_per_id_as_in_the_fork():
    batch = Batch(seed=3)
    cfg = opd_verl.VerlOPDConfig(log_prob_top_k=K, top_k_strategy="union-intersection", reward_weight_mode="none")
    assert cfg.strategy == "symmetric_difference" and cfg.weight_mode == "none_raw"
    out = opd_verl.compute_opd_rewards(cfg, batch.mask, **batch.kwargs)
    l = out.student_log_probs - out.teacher_log_probs
    assert out.valid.sum() > 0
    torch.testing.assert_close(out.rewards, torch.where(out.valid, -l, torch.zeros_like(l)))
    # opdcore's renormalised "none" (1/|set|) only on request
    plain = opd_verl.VerlOPDConfig(log_prob_top_k=K, top_k_strategy="union-intersection",
                                   reward_weight_mode="none", fork_fidelity=False)
    assert plain.weight_mode == "none"
    out2 = opd_verl.compute_opd_rewards(plain, batch.mask, **batch.kwargs)
    size = out.valid.sum(-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(out2.rewards, out.rewards / size)
    for mode, raw in (("student_p", "student_p_raw"), ("teacher_p", "teacher_p_raw")):
        assert opd_verl.kernel_weight_mode("union-intersection", mode) == raw
        assert opd_verl.kernel_weight_mode("union", mode) == mode


def test_without_none_raw_the_fork_mapping_refuses(monkeypatch):
    monkeypatch.setattr(opdcore.ops, "WEIGHT_MODES", tuple(m for m in opdcore.ops.WEIGHT_MODES if m != "none_raw"))
    with pytest.raises(NotImplementedError, match="none_raw"):
        opd_verl.VerlOPDConfig(top_k_strategy="union-intersection", reward_weight_mode="none")
    assert opd_verl.VerlOPDConfig(top_k_strategy="union", reward_weight_mode="none").weight_mode == "none"


def test_sampled_token_opd_matches_opdcore_and_verl_vanilla():
    batch = Batch(seed=11)
    y = torch.randint(0, V, (B, T))
    old = batch.ls.gather(-1, y[..., None])[..., 0]
    tq = batch.lt.gather(-1, y[..., None])[..., 0]
    cfg = opd_verl.VerlOPDConfig(log_prob_top_k=0)
    out = opd_verl.compute_opd_rewards(cfg, batch.mask, old_log_probs=old, teacher_log_probs=tq)
    torch.testing.assert_close(out.rewards, torch.where(batch.mask, tq - old, torch.zeros_like(tq)))
    assert out.ids is None and out.rewards.shape == (B, T)
    adv, _ = adv_estimator()(token_level_rewards=out.rewards, response_mask=batch.mask, config=None)

    zs = batch.zs.clone().requires_grad_()
    lp = torch.log_softmax(zs, -1).gather(-1, y[..., None])[..., 0]
    conf = actor_config(clip_ratio_high=0.28)
    ours, _ = policy_loss()(old_log_prob=lp.detach(), log_prob=lp, advantages=adv, response_mask=batch.mask,
                            loss_agg_mode="seq-mean-token-mean", config=conf, rollout_is_weights=None)
    (g_ours,) = torch.autograd.grad(ours, zs)
    zk = batch.zs.clone().reshape(B * T, V).requires_grad_()
    own = opdcore.opd_topk_loss(zk, y.reshape(-1, 1), tq.reshape(-1, 1), batch.mask.reshape(-1, 1), weight_mode="none")
    cu = torch.arange(0, B * T + 1, T)
    (g_own,) = torch.autograd.grad(aggregate(own.loss, batch.mask.reshape(-1), "seq-mean-token-mean", cu), zk)
    torch.testing.assert_close(g_ours.reshape(B * T, V), g_own, rtol=1e-7, atol=1e-12)

    # off-policy with importance weights: the same value and gradient as verl's own vanilla loss
    g = torch.Generator().manual_seed(5)
    old_off = lp.detach() + 1.2 * torch.randn(B, T, generator=g, dtype=F64)
    isw = torch.rand(B, T, generator=g, dtype=F64) + 0.5
    adv_off = torch.randn(B, T, generator=g, dtype=F64) * batch.mask
    lp = torch.log_softmax(zs, -1).gather(-1, y[..., None])[..., 0]  # a fresh graph: the one above is spent
    old_off[0, :2] = lp.detach()[0, :2] - 2.0  # ratio e^2 > clip_ratio_c = 3 ...
    adv_off[0, :2] = torch.tensor([-1.0, 0.5], dtype=F64)  # ... with A < 0: the dual clip holds
    for mode in opd_verl.LOSS_AGG_MODES:
        kw = dict(old_log_prob=old_off, advantages=adv_off, response_mask=batch.mask, loss_agg_mode=mode,
                  config=conf, rollout_is_weights=isw)
        a, ma = policy_loss()(log_prob=lp, **kw)
        b, mb = core_algos.get_policy_loss_fn("vanilla")(log_prob=lp, **kw)
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
        ga = torch.autograd.grad(a, zs, retain_graph=True)
        gb = torch.autograd.grad(b, zs, retain_graph=True)
        torch.testing.assert_close(ga[0], gb[0], rtol=1e-7, atol=1e-12)
        assert ma["actor/pg_clipfrac_lower"] > 0  # the dual clip is exercised
        for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
            assert ma[key] == pytest.approx(mb[key], rel=1e-6, abs=1e-12), key  # verl: float32 fractions


# ---- aggregation ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", opd_verl.LOSS_AGG_MODES)
@pytest.mark.parametrize("info", [{}, {"dp_size": 2, "batch_num_tokens": 11, "global_batch_size": 5},
                                  {"loss_scale_factor": 9}])
def test_agg_loss_equals_verls(mode, info):
    g = torch.Generator().manual_seed(1)
    loss_mat = torch.randn(4, 6, generator=g, dtype=F64)
    loss_mask = torch.rand(4, 6, generator=g) > 0.4
    loss_mask[3] = False  # a sequence without loss tokens is not averaged in
    ours = opd_verl.agg_loss(loss_mat, loss_mask, mode, **info)
    theirs = core_algos.agg_loss(loss_mat, loss_mask.to(F64), mode, **info)
    torch.testing.assert_close(ours, theirs.to(F64), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_policy_loss_aggregation_and_gradient(mode):
    """Through verl's global_batch_info (what ppo_loss sets) and through config.loss_scale_factor."""
    batch = Batch(seed=21)
    cfg = opd_verl.VerlOPDConfig(log_prob_top_k=K, top_k_strategy="union", reward_weight_mode="student_p")
    out = opd_verl.compute_opd_rewards(cfg, batch.mask, **batch.kwargs)
    adv, _ = adv_estimator()(token_level_rewards=out.rewards, response_mask=batch.mask, config=None)
    zk = batch.zs.clone().reshape(B * T, V).requires_grad_()
    own = opdcore.opd_topk_loss(zk, out.ids.reshape(B * T, -1), out.teacher_log_probs.reshape(B * T, -1),
                                out.valid.reshape(B * T, -1), weight_mode=cfg.weight_mode)
    total = aggregate(own.loss, batch.mask.reshape(-1), mode, torch.arange(0, B * T + 1, T), norm_length=9.0)
    (g_own,) = torch.autograd.grad(total, zk)
    for conf in (actor_config(loss_agg_mode=mode, loss_scale_factor=9),
                 actor_config(loss_agg_mode=mode)):
        if not conf.loss_scale_factor:
            conf.global_batch_info.update(dp_size=1, batch_num_tokens=None, global_batch_size=None,
                                          loss_scale_factor=9)
        zs = batch.zs.clone().requires_grad_()
        lp = student_logprobs_on(zs, out.ids)
        pg, metrics = policy_loss()(old_log_prob=lp.detach(), log_prob=lp, advantages=adv, response_mask=batch.mask,
                                    loss_agg_mode=mode, config=conf, rollout_is_weights=None)
        want = core_algos.agg_loss(-adv.sum(-1), batch.mask.to(F64), mode, loss_scale_factor=9)
        torch.testing.assert_close(pg, want, rtol=1e-6, atol=1e-12)
        (g,) = torch.autograd.grad(pg, zs)
        torch.testing.assert_close(g.reshape(B * T, V), g_own, rtol=1e-6, atol=1e-12)
        assert metrics["actor/opdcore_loss"] == pytest.approx(float(total.detach()), rel=1e-6)


def test_global_batch_info_scales_like_verl():
    """dp_size / global token count: each rank's share of the global token-mean."""
    batch = Batch(seed=4)
    adv = torch.randn(B, T, K, dtype=F64)
    lp = student_logprobs_on(batch.zs.clone().requires_grad_(), batch.s_ids)
    conf = actor_config()
    conf.global_batch_info.update(dp_size=4, batch_num_tokens=40, global_batch_size=12, loss_scale_factor=None)
    pg, _ = policy_loss()(old_log_prob=lp.detach(), log_prob=lp, advantages=adv, response_mask=batch.mask,
                          loss_agg_mode="token-mean", config=conf, rollout_is_weights=None)
    want = (-adv.sum(-1) * batch.mask).sum() / 40 * 4
    torch.testing.assert_close(pg, want)


# ---- several updates per batch: the PPO surrogate on the set, gradients in float64 --------------------------------

def test_off_policy_topk_matches_reference_ppo_and_gradcheck():
    batch = Batch(seed=8)
    g = torch.Generator().manual_seed(2)
    ids = batch.s_ids
    old = batch.ls.gather(-1, ids) + 1.2 * torch.randn(B, T, K, generator=g, dtype=F64)  # some ratios beyond 3
    adv = torch.randn(B, T, K, generator=g, dtype=F64) * batch.mask.unsqueeze(-1)
    conf = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    zs = batch.zs.clone().requires_grad_()
    lp = student_logprobs_on(zs, ids)
    pg, metrics = policy_loss()(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=batch.mask,
                                loss_agg_mode="token-mean", config=conf, rollout_is_weights=None)
    zr = batch.zs.clone().reshape(B * T, V).requires_grad_()
    per_tok = reference.ppo_topk_loss(zr, ids.reshape(B * T, K), old.reshape(B * T, K), adv.reshape(B * T, K),
                                      clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    want = aggregate(per_tok, batch.mask.reshape(-1), "token-mean")
    torch.testing.assert_close(pg, want, rtol=1e-10, atol=1e-12)
    (g1,) = torch.autograd.grad(pg, zs, retain_graph=True)
    (g2,) = torch.autograd.grad(want, zr)
    torch.testing.assert_close(g1.reshape(B * T, V), g2, rtol=1e-10, atol=1e-12)
    assert 0 < metrics["actor/pg_clipfrac"] < 1 and metrics["actor/pg_clipfrac_lower"] > 0  # both clips active
    # opdcore's value -sum sg(coef) log p: its gradient w.r.t. log p is the surrogate's, so it equals <grad, log p>
    (g_lp,) = torch.autograd.grad(pg, lp)
    assert metrics["actor/opdcore_loss"] == pytest.approx(float((g_lp * lp).sum().detach()), rel=1e-10, abs=1e-12)

    lp_leaf = lp.detach().clone().requires_grad_()
    fn = lambda x: policy_loss()(old_log_prob=old, log_prob=x, advantages=adv, response_mask=batch.mask,  # noqa: E731
                                 loss_agg_mode="seq-mean-token-sum-norm", config=conf, rollout_is_weights=None)[0]
    assert torch.autograd.gradcheck(fn, (lp_leaf,))


# ---- configuration, example and errors ----------------------------------------------------------------------------

def test_config_from_verl_and_the_example_yaml():
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((ROOT / "examples" / "verl_opd.yaml").read_text())
    assert cfg["algorithm"]["adv_estimator"] == opd_verl.ADV_ESTIMATOR_NAME
    assert cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] == opd_verl.POLICY_LOSS_NAME
    c = opd_verl.VerlOPDConfig.from_verl(cfg)
    assert (c.log_prob_top_k, c.top_k_strategy, c.reward_weight_mode, c.loss_agg_mode) == (
        16, "only_stu", "student_p", "token-mean")
    from omegaconf import OmegaConf
    fork = OmegaConf.create({"actor_rollout_ref": {
        "rollout": {"log_prob_top_k": 8, "top_k_strategy": "union-intersection", "reward_weight_mode": "teacher_p",
                    "teacher_temperature": 0.5},
        "actor": {"loss_agg_mode": "seq-mean-token-sum-norm", "loss_scale_factor": 4096}}})
    c = opd_verl.VerlOPDConfig.from_verl(fork)
    assert (c.log_prob_top_k, c.weight_mode, c.teacher_temperature, c.loss_agg_mode, c.loss_scale_factor) == (
        8, "teacher_p_raw", 0.5, "seq-mean-token-sum-norm", 4096)


def test_example_runs():
    import runpy
    mod = runpy.run_path(str(ROOT / "examples" / "verl_opd.py"), run_name="verl_opd_example")
    res = mod["main"](["--strategy", "union", "--top-k", "4"])
    assert res["reward_after"] > res["reward_before"]  # one step toward the teacher on the scored set


@pytest.mark.parametrize("kwargs, match", [
    ({"top_k_strategy": "both"}, "top_k_strategy"),
    ({"reward_weight_mode": "entropy"}, "reward_weight_mode"),
    ({"loss_agg_mode": "seq-sum"}, "loss_agg_mode"),
    ({"log_prob_top_k": -1}, "log_prob_top_k"),
    ({"teacher_temperature": 0.0}, "teacher_temperature"),
    ({"loss_scale_factor": 0}, "loss_scale_factor"),
    ({"log_ratio_clip": -1.0}, "log_ratio_clip"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        opd_verl.VerlOPDConfig(**kwargs)


def test_reward_errors():
    batch = Batch(seed=1)
    union = opd_verl.VerlOPDConfig(log_prob_top_k=K, top_k_strategy="union")
    kw = dict(batch.kwargs)
    with pytest.raises(ValueError, match="teacher_top_k_ids is required"):
        opd_verl.compute_opd_rewards(union, batch.mask, **{**kw, "teacher_top_k_ids": None})
    with pytest.raises(ValueError, match=r"student_top_k_log_probs must be \[3, 5, 4\]"):
        opd_verl.compute_opd_rewards(union, batch.mask, **{**kw, "student_top_k_log_probs": kw[
            "student_top_k_log_probs"][..., :2]})
    with pytest.raises(ValueError, match="student_top_k_ids must be"):  # the config's k is not the tensors'
        opd_verl.compute_opd_rewards(opd_verl.VerlOPDConfig(log_prob_top_k=K + 1), batch.mask, **kw)
    with pytest.raises(ValueError, match="positive log-prob"):
        opd_verl.compute_opd_rewards(union, batch.mask, **{**kw, "teacher_on_student_log_probs": batch.zt.gather(
            -1, batch.s_ids).abs()})
    with pytest.raises(ValueError, match="non-finite"):
        bad = kw["teacher_top_k_log_probs"].clone()
        bad[0, 0, 0] = float("nan")
        opd_verl.compute_opd_rewards(union, batch.mask, **{**kw, "teacher_top_k_log_probs": bad})
    with pytest.raises(ValueError, match="response_mask must be"):
        opd_verl.compute_opd_rewards(union, batch.mask.reshape(-1), **kw)
    with pytest.raises(ValueError, match="teacher_log_probs is required"):
        opd_verl.compute_opd_rewards(opd_verl.VerlOPDConfig(log_prob_top_k=0), batch.mask,
                                     old_log_probs=torch.zeros(B, T))
    # padding outside the response is never read: garbage there is fine
    kw2 = {**kw, "teacher_top_k_log_probs": kw["teacher_top_k_log_probs"].clone()}
    kw2["teacher_top_k_log_probs"][2, 3] = float("nan")
    assert torch.isfinite(opd_verl.compute_opd_rewards(union, batch.mask, **kw2).rewards).all()


def test_loss_and_estimator_errors():
    mask = mask_bt()
    lp2, lp3 = torch.zeros(B, T, dtype=F64), torch.zeros(B, T, K, dtype=F64)
    call = lambda **kw: policy_loss()(**{"old_log_prob": lp3, "log_prob": lp3, "advantages": lp3,  # noqa: E731
                                         "response_mask": mask, "loss_agg_mode": "token-mean",
                                         "config": actor_config(), "rollout_is_weights": None, **kw})
    with pytest.raises(ValueError, match="stock verl"):
        call(old_log_prob=lp2, log_prob=lp2)
    with pytest.raises(ValueError, match="old_log_prob must have the shape"):
        call(old_log_prob=lp2)
    with pytest.raises(ValueError, match="log_prob must be"):
        call(response_mask=mask[:, :3])
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        call(loss_agg_mode="sequence-mean")
    with pytest.raises(ValueError, match="rollout_is_weights must be"):
        call(rollout_is_weights=torch.ones(B, T, K))
    with pytest.raises(ValueError, match="clip_ratio_c"):
        call(config={"clip_ratio_c": 1.0})
    with pytest.raises(ValueError, match="format_mask"):
        call(format_mask=torch.ones(B + 1))
    with pytest.raises(TypeError):
        call(unknown_tensor=lp3)  # a misspelt keyword is not swallowed
    # the fork's actor's format_mask drops whole sequences
    a, _ = call(advantages=torch.ones(B, T, K, dtype=F64), format_mask=torch.tensor([1, 0, 1]))
    b, _ = call(advantages=torch.ones(B, T, K, dtype=F64), response_mask=mask & torch.tensor([[1], [0], [1]]).bool())
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="token_level_rewards must be"):
        adv_estimator()(token_level_rewards=torch.zeros(B, T + 1), response_mask=mask)
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        opd_verl.agg_loss(lp2, mask, "mean")
    with pytest.raises(ValueError, match="batch_num_tokens is required"):
        opd_verl.agg_loss(lp2, mask, "token-mean", dp_size=2)


def test_registration_refuses_a_clash_and_reports_missing_verl(monkeypatch):
    assert opd_verl.is_registered()
    assert core_algos.get_policy_loss_fn(opd_verl.POLICY_LOSS_NAME) is opd_verl.compute_policy_loss_opd
    assert core_algos.get_adv_estimator_fn(opd_verl.ADV_ESTIMATOR_NAME) is opd_verl.compute_token_reward_advantage
    monkeypatch.setitem(core_algos.POLICY_LOSS_REGISTRY, opd_verl.POLICY_LOSS_NAME, lambda **kw: None)
    with pytest.raises(ValueError, match="already has a different function"):
        opd_verl.register()
    monkeypatch.undo()
    monkeypatch.setitem(core_algos.ADV_ESTIMATOR_REGISTRY, opd_verl.ADV_ESTIMATOR_NAME, lambda **kw: None)
    with pytest.raises(ValueError, match="opdcore_token_reward"):
        opd_verl.register()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo", None)
    with pytest.raises(ImportError, match="pip install --no-deps verl==0.9.1"):
        opd_verl.register()
    assert not opd_verl.is_registered()


def test_import_without_verl_and_registration_in_a_verl_plugin():
    """Importing the module never needs verl; VERL_USE_EXTERNAL_MODULES registers in any process importing verl."""
    env = dict(os.environ)
    blocked = textwrap.dedent("""
        import sys
        sys.modules["verl"] = None  # as if verl were not installed
        from opdcore.integrations import verl as v
        assert not v.is_registered()
        try:
            v.register()
        except ImportError as e:
            print("ImportError:", e)
    """)
    check = textwrap.dedent("""
        import verl
        from verl.trainer.ppo import core_algos as ca
        from opdcore.integrations import verl as v
        assert ca.get_policy_loss_fn("opdcore_topk_opd") is v.compute_policy_loss_opd
        assert ca.get_adv_estimator_fn("opdcore_token_reward") is v.compute_token_reward_advantage
        print("registered")
    """)
    run = lambda code, e: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,  # noqa: E731
                                           stderr=subprocess.PIPE, text=True, env=e)
    procs = [run(blocked, env), run(check, {**env, "VERL_USE_EXTERNAL_MODULES": "opdcore.integrations.verl_plugin"})]  # side by side
    (out1, err1), (out2, err2) = (p.communicate(timeout=120) for p in procs)
    assert procs[0].returncode == 0, err1[-2000:]
    assert "ImportError: opdcore.integrations.verl needs verl" in out1
    assert procs[1].returncode == 0 and "registered" in out2, err2[-2000:]
