"""Aggregation modes and the strategy defaults of opdcore.losses."""
import pytest
import torch

import opdcore
from opdcore import losses, reference as ref


def test_aggregations():
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    mask = torch.tensor([False, True, True, False, True, False])
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    assert losses.aggregate(per_token, mask).item() == pytest.approx((2 + 3 + 5) / 3)
    assert losses.aggregate(per_token, mask, "seq-mean-token-mean", cu).item() == pytest.approx((2.5 + 5) / 2)
    assert losses.aggregate(per_token, mask, "seq-mean-token-sum", cu).item() == pytest.approx((5 + 5) / 2)
    # a sequence with no response tokens is skipped, not averaged in as 0
    mask2 = torch.tensor([False, False, False, True, True, False])
    assert losses.aggregate(per_token, mask2, "seq-mean-token-mean", cu).item() == pytest.approx(4.5)


@pytest.mark.parametrize("call,match", [
    (lambda: losses.aggregate(torch.ones(3), torch.ones(3, dtype=torch.bool), "mean"), "aggregation must be one of"),
    (lambda: losses.aggregate(torch.ones(3), torch.ones(2, dtype=torch.bool)), "must both be"),
    (lambda: losses.aggregate(torch.ones(3), torch.ones(3, dtype=torch.bool), "seq-mean-token-sum"), "needs cu_seqlens"),
    (lambda: losses.aggregate(torch.ones(3), torch.ones(3, dtype=torch.bool), "seq-mean-token-sum",
                              torch.tensor([0, 2], dtype=torch.int32)), "cu_seqlens must be"),
])
def test_aggregate_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_symmetric_difference_defaults_to_raw_student_p():
    assert losses.default_weight_mode("union-intersection") == "student_p_raw"
    assert losses.default_weight_mode("only_stu") == "student_p"
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    teacher = torch.log_softmax(torch.randn(6, 50, generator=g), -1)
    s_ids = opdcore.topk_logprobs(logits, 4).ids
    t_ids = opdcore.topk_logprobs(teacher, 4).ids
    ts = opdcore.build_token_set(s_ids, t_ids, "symmetric_difference", teacher.gather(1, s_ids), teacher.gather(1, t_ids))
    mask = torch.ones(6, dtype=torch.bool)
    loss, out = losses.topk_opd_loss(logits, ts, mask, strategy="symmetric_difference")
    want, _ = ref.opd_topk_loss(logits, ts.ids, ts.teacher_logprobs, ts.valid, "student_p_raw")
    torch.testing.assert_close(loss, want.mean())
    kl, _ = losses.topk_opd_loss(logits, ts, mask, renorm_kl=True)
    torch.testing.assert_close(kl, ref.renorm_topk_kl(logits, ts.ids, ts.teacher_logprobs, ts.valid).mean())
    with pytest.raises(ValueError, match="teacher_logprobs is None"):
        losses.topk_opd_loss(logits, opdcore.build_token_set(s_ids, t_ids, "union"), mask)
