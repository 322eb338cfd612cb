"""opdcore.metrics (METHOD.md section 3 diagnostics) against per-position Python loops over the definitions."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opdcore import metrics as D


def _topk_case(R, V, k, seed, neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(R, V, generator=g, dtype=torch.float64) * 2
    q = p + torch.randn(R, V, generator=g, dtype=torch.float64)  # a correlated teacher
    if neg_inf:
        p[0, 2:] = -math.inf  # fewer reachable tokens than k: -inf entries in the top-k lists
        q[0, 1:] = -math.inf
    lp, lq = p.log_softmax(1), q.log_softmax(1)
    s_lp, s_ids = lp.topk(k, dim=1)
    t_ids = lq.topk(k, dim=1).indices
    return s_ids, s_lp, t_ids, lq.gather(1, s_ids), lp, lq


def _loop_intersection(s_ids, t_ids, lp, lq, r):
    return [int(v) for v in s_ids[r] if int(v) in set(t_ids[r].tolist()) and lp[r, v] > -math.inf
            and lq[r, v] > -math.inf]


@given(R=st.integers(1, 6), V=st.integers(2, 40), k=st.integers(1, 12), seed=st.integers(0, 2**31),
       neg_inf=st.booleans())
def test_overlap_metrics_match_definitions(R, V, k, seed, neg_inf):
    k = min(k, V)
    s_ids, s_lp, t_ids, t_on_s, lp, lq = _topk_case(R, V, k, seed, neg_inf)
    ratio = D.topk_overlap(s_ids, t_ids)
    pm, qm = D.overlap_mass(s_ids, s_lp, t_ids, t_on_s)
    adv, has = D.overlap_advantage(s_ids, s_lp, t_ids, t_on_s)
    ov = D.overlap_stats(s_ids, s_lp, t_ids, t_on_s)  # the same values from one intersection
    for got, want in zip(ov, (ratio, pm, qm, adv, has)):
        assert torch.equal(got, want)
    for r in range(R):
        assert ratio[r].item() == pytest.approx(len(set(s_ids[r].tolist()) & set(t_ids[r].tolist())) / k)
        inter = _loop_intersection(s_ids, t_ids, lp, lq, r)
        assert pm[r].item() == pytest.approx(sum(lp[r, v].exp().item() for v in inter), abs=1e-12)
        assert qm[r].item() == pytest.approx(sum(lq[r, v].exp().item() for v in inter), abs=1e-12)
        assert bool(has[r]) == bool(inter)
        if inter:
            zp = sum(lp[r, v].exp().item() for v in inter)
            zq = sum(lq[r, v].exp().item() for v in inter)
            pbar = {v: lp[r, v].exp().item() / zp for v in inter}
            a = [pbar[v] * (math.log(lq[r, v].exp().item() / zq) - math.log(pbar[v])) for v in inter]
            assert adv[r].item() == pytest.approx(sum(a) / len(a), abs=1e-9)
            assert adv[r].item() <= 1e-12  # -KL(pbar || qbar) / |I|
        else:
            assert adv[r].item() == 0.0


@given(R=st.integers(0, 5), ks=st.integers(0, 6), kt=st.integers(0, 6), span=st.integers(1, 60),
       shift=st.integers(-3, 0), seed=st.integers(0, 2**31))
def test_in_teacher_topk_both_ways_match_the_broadcast(R, ks, kt, span, shift, seed):
    """Small id ranges take the membership table (span <= ks * kt), others the column compares; negative ids
    (never real, but not this helper's to reject) take the compares."""
    g = torch.Generator().manual_seed(seed)
    s_ids = torch.randint(0, span, (R, ks), generator=g) + shift
    t_ids = torch.randint(0, span, (R, kt), generator=g) + shift
    want = (s_ids.unsqueeze(2) == t_ids.unsqueeze(1)).any(2)
    assert torch.equal(D._in_teacher_topk(s_ids, t_ids), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overlap_advantage_far_below_zero(dtype):
    """Log-probs of -300 on the whole intersection (a confident model's tail ids): exp underflows in float32,
    the renormalised advantage must not."""
    s_ids = torch.tensor([[3, 1, 2], [0, 1, 2]])
    t_ids = torch.tensor([[1, 2, 7], [5, 6, 7]])  # row 1: empty intersection
    s_lp = torch.tensor([[-0.01, -300.0, -301.0], [-0.1, -1.0, -2.0]], dtype=dtype)
    t_lp = torch.tensor([[-9.0, -302.0, -300.5], [-1.0, -1.0, -1.0]], dtype=dtype)
    adv, has = D.overlap_advantage(s_ids, s_lp, t_ids, t_lp)
    lp, lq = torch.tensor([-300.0, -301.0], dtype=torch.float64), torch.tensor([-302.0, -300.5], dtype=torch.float64)
    lpb, lqb = lp - lp.logsumexp(0), lq - lq.logsumexp(0)
    want = float((lpb.exp() * (lqb - lpb)).sum() / 2)
    assert has.tolist() == [True, False] and adv[1].item() == 0.0
    assert adv[0].item() == pytest.approx(want, rel=1e-5)


def test_overlap_identical_models():
    s_ids, s_lp, _, _, lp, _ = _topk_case(4, 30, 5, 0)
    adv, has = D.overlap_advantage(s_ids, s_lp, s_ids, s_lp)
    assert has.all() and torch.allclose(adv, torch.zeros(4, dtype=adv.dtype), atol=1e-12)
    assert torch.equal(D.topk_overlap(s_ids, s_ids), torch.ones(4))


def test_entropy_gap_is_per_position():
    ht, hs = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])
    assert torch.equal(D.entropy_gap(ht, hs), torch.tensor([1.0, 1.0]))  # the gap of the means would be 0


def test_sequence_mean_reward():
    r = torch.tensor([1.0, 3.0, -2.0, 0.5])
    seq = torch.tensor([0, 0, 2, 2])
    out = D.sequence_mean_reward(r, seq, 3)
    assert out[0].item() == 2.0 and math.isnan(out[1].item()) and out[2].item() == -0.75


@given(scores=st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, math.nan]), min_size=0, max_size=30),
       seed=st.integers(0, 1000))
def test_auroc_matches_pair_count(scores, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (len(scores),), generator=g).double().tolist()
    if labels:
        labels[0] = math.nan  # an ungraded response is left out
    pairs = [(s, y) for s, y in zip(scores, labels) if not (math.isnan(s) or math.isnan(y))]
    pos = [s for s, y in pairs if y == 1]
    neg = [s for s, y in pairs if y == 0]
    got = D.auroc(scores, labels)
    if not pos or not neg:
        assert math.isnan(got)
        return
    want = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    assert got == pytest.approx(want, abs=1e-12)


def test_auroc_extremes():
    assert D.auroc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    assert D.auroc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    assert D.auroc([1.0, 1.0], [0, 1]) == 0.5


def test_gap_recovery():
    assert D.gap_recovery(0.2, 0.6, 1.0) == pytest.approx(0.5)
    assert math.isnan(D.gap_recovery(0.5, 0.7, 0.4))  # the teacher is not ahead: nothing to recover


def test_position_profile():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    positions = torch.tensor([0, 1, 4, 9, 100])
    sums, counts = D.position_profile(values, positions, bucket_width=4, num_buckets=3)
    assert sums.tolist() == [3.0, 3.0, 9.0] and counts.tolist() == [2.0, 1.0, 2.0]  # the last bucket is open
    sums, counts = D.position_profile(values, positions, 4, 3, mask=torch.tensor([True, False, True, True, True]))
    assert sums.tolist() == [1.0, 3.0, 9.0] and counts.tolist() == [1.0, 1.0, 2.0]


def test_largest_reward_token():
    slp = torch.tensor([-0.1, -3.0, -0.7])
    tlp = torch.tensor([-0.2, -0.1, -0.7])
    r, diff = D.largest_reward_token(slp, tlp)
    assert r == pytest.approx(2.9) and diff == pytest.approx(math.exp(-3.0) - math.exp(-0.1))
    assert all(math.isnan(x) for x in D.largest_reward_token(torch.empty(0), torch.empty(0)))


def test_errors_name_the_argument():
    ids = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="student_ids and teacher_ids"):
        D.topk_overlap(ids, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="student_logprobs"):
        D.overlap_mass(ids, torch.zeros(3, 5), ids, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="teacher_on_student_logprobs"):
        D.overlap_advantage(ids, torch.zeros(3, 4), ids, torch.zeros(3))
    with pytest.raises(ValueError, match="num_seqs"):
        D.sequence_mean_reward(torch.zeros(2), torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="labels"):
        D.auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="differ in length"):
        D.auroc([0.1], [0, 1])
    with pytest.raises(ValueError, match="bucket_width"):
        D.position_profile(torch.zeros(2), torch.zeros(2, dtype=torch.long), 0, 3)
    with pytest.raises(ValueError, match="positions must be >= 0"):
        D.position_profile(torch.zeros(2), torch.tensor([0, -1]), 2, 3)
    with pytest.raises(ValueError, match="student_entropy"):
        D.entropy_gap(torch.zeros(3), torch.zeros(2))


def test_ppo_clip_counts():
    slp = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.3, 0.3]], dtype=torch.float64))
    old = torch.log(torch.tensor([[0.25, 0.2, 0.1], [0.3, 0.6, 0.3]], dtype=torch.float64))  # ratios 2, 1, 1 | 1, .5, 1
    adv = torch.tensor([[1.0, 0.0, -1.0], [2.0, -1.0, 1.0]], dtype=torch.float64)
    coef = torch.tensor([[0.0, 0.0, -1.0], [2.0, 0.0, 1.0]], dtype=torch.float64)  # ratio 2 (A > 0), 0.5 (A < 0) clipped
    valid = torch.tensor([[True, True, True], [True, True, False]])
    clipped, counted, dev, top = D.ppo_clip_counts(slp, old, adv, coef, valid).tolist()
    assert (clipped, counted) == (2.0, 4.0)  # the zero advantage and the invalid entry are not counted
    assert math.isclose(dev, 1.0 + 0.5, rel_tol=1e-12) and math.isclose(top, 2.0, rel_tol=1e-12)
    with pytest.raises(ValueError, match="coefficients must have the shape of student_logprobs"):
        D.ppo_clip_counts(slp, old, adv, coef[:, :2], valid)


def test_set_mass_drift_decomposes_the_reward_weighted_gradient():
    """lbar = KL(pbar || qbar) + log(P/Q), and the student_p-weighted set loss's gradient is
    grad KL(pbar || qbar) + lbar * grad log P (METHOD.md 2.3), checked with autograd in float64."""
    from opdcore.metrics import set_mass_drift

    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 30, generator=g, dtype=torch.float64, requires_grad=True)
    lq_full = torch.log_softmax(torch.randn(5, 30, generator=g, dtype=torch.float64), -1)
    ids = torch.stack([torch.randperm(30, generator=g)[:6] for _ in range(5)])
    lp = torch.log_softmax(z, -1).gather(1, ids)
    lq = lq_full.gather(1, ids)
    lbar, kl = set_mass_drift(lp.detach(), lq)
    P, Q = lp.detach().logsumexp(1), lq.logsumexp(1)
    pbar = (lp.detach() - P[:, None]).exp()
    torch.testing.assert_close(lbar, (pbar * (lp.detach() - lq)).sum(1))
    torch.testing.assert_close(lbar, kl + P - Q)
    qbar_log = lq - Q[:, None]
    w = pbar * (lp.detach() - lq)  # student_p weights times l: the loss is sum sg(w) log p
    (grad_loss,) = torch.autograd.grad((w * lp).sum(), z, retain_graph=True)
    log_pbar = lp - lp.logsumexp(1, keepdim=True)
    kl_live = (log_pbar.exp() * (log_pbar - qbar_log)).sum()
    (grad_kl,) = torch.autograd.grad(kl_live, z, retain_graph=True)
    (grad_logP,) = torch.autograd.grad(lp.logsumexp(1), z, grad_outputs=lbar)
    torch.testing.assert_close(grad_loss, grad_kl + grad_logP)
    # a masked entry is left out; an empty set gives 0
    valid = torch.ones(5, 6, dtype=torch.bool)
    valid[0, 0], valid[1] = False, False
    lbar_m, kl_m = set_mass_drift(lp.detach(), lq, valid)
    want0, _ = set_mass_drift(lp.detach()[:1, 1:], lq[:1, 1:])
    torch.testing.assert_close(lbar_m[0], want0[0])
    assert lbar_m[1] == 0 and kl_m[1] == 0 and torch.isfinite(lbar_m).all()


def test_drift_gradient_norms_match_autograd():
    """The two parts of the reward-weighted set loss's logit gradient, lbar * grad log P and grad KL(pbar || qbar),
    against autograd in float64: over the whole vocabulary with tail_sq, over the set's logits without it."""
    from opdcore.metrics import drift_gradient_norms, drift_share, set_mass_drift

    g = torch.Generator().manual_seed(5)
    R, V, K = 6, 40, 7
    z = torch.randn(R, V, generator=g, dtype=torch.float64, requires_grad=True)
    lq_full = torch.log_softmax(2 * torch.randn(R, V, generator=g, dtype=torch.float64), -1)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(R)])
    lp_full = torch.log_softmax(z, -1)
    lp, lq = lp_full.gather(1, ids), lq_full.gather(1, ids)
    lbar, _ = set_mass_drift(lp.detach(), lq)
    log_pbar = lp - lp.logsumexp(1, keepdim=True)
    kl = (log_pbar.exp() * (log_pbar - (lq - lq.logsumexp(1, keepdim=True)))).sum()
    (g_kl,) = torch.autograd.grad(kl, z, retain_graph=True)
    (g_drift,) = torch.autograd.grad(lp.logsumexp(1), z, grad_outputs=lbar)
    in_set = torch.zeros(R, V, dtype=torch.bool).scatter_(1, ids, True)
    p = lp_full.detach().exp()
    tail_sq = torch.where(in_set, torch.zeros_like(p), p).square().sum(1)
    d, k = drift_gradient_norms(lp.detach(), lq, tail_sq=tail_sq)
    torch.testing.assert_close(d, g_drift.square().sum(1))
    torch.testing.assert_close(k, g_kl.square().sum(1))
    d_set, k_set = drift_gradient_norms(lp.detach(), lq)
    torch.testing.assert_close(d_set, torch.where(in_set, g_drift, 0.0).square().sum(1))
    torch.testing.assert_close(k_set, k)
    share = drift_share(d, k)
    assert 0 < share < 1
    assert share == pytest.approx(g_drift.norm().item() / (g_drift.norm().item() + g_kl.norm().item()))
    # the exact renormalised KL has no drift; a teacher equal to the student on the set gives no gradient at all
    same = drift_gradient_norms(lp.detach(), lp.detach())
    assert float(same[0].max()) < 1e-24 and float(same[1].max()) < 1e-24
    assert math.isnan(drift_share(*same)) or drift_share(*same) < 1e-6
    # masked entries count as outside the set's computation; an all-masked position gives 0
    valid = torch.ones(R, K, dtype=torch.bool)
    valid[0] = False
    dm, km = drift_gradient_norms(lp.detach(), lq, valid)
    assert dm[0] == 0 and km[0] == 0 and torch.allclose(dm[1:], d_set[1:])
    with pytest.raises(ValueError, match="tail_sq"):
        drift_gradient_norms(lp.detach(), lq, tail_sq=tail_sq[:2])
