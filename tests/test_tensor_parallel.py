"""Tensor parallelism on 2 real processes (gloo): a DTensor-parallelized tiny Llama and the trainer's model wrapper
against the same model in one process: hidden states, every objective, the full gradient of every parameter
and its clipped norm; tied embeddings stay tied; unsupported models fail with a clear error."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

from gloo_workers import spawn
from opdcore.data.synthetic import tiny_llama
from opdcore.objectives import ObjectiveSpec, Terms, make_objective
from opdcore.parallel.tensor_parallel import clip_grad_norm, local_vocab, parallelize, tensor_parallel_plan
from opdcore.trainer.models import GenerateThroughRoot, OPDModel


V, PAD, K = 61, 3, 5  # an odd vocabulary plus padded LM-head rows: uneven shards with padding on the last


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    pred = torch.tensor([1, 2, 3, 9 + 4, 9 + 7, 18 + 2, 18 + 5])
    sets = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(len(pred))])
    tq = (torch.randn(len(pred), K, generator=g) - 2).log_softmax(1)
    valid = torch.rand(len(pred), K, generator=g) > 0.2
    valid[:, 0] = True
    w = torch.rand(len(pred), generator=g)
    return ids, mask, pred, sets, tq, valid, w


SPECS = [ObjectiveSpec(topk=K, temperature=0.9, log_ratio_clip=4.0, weight_mode="student_p"),
         ObjectiveSpec(topk=K, loss="renorm_kl", temperature=0.9),
         ObjectiveSpec(topk=K, loss="tail_kl", temperature=0.9),
         ObjectiveSpec(loss="dense", divergence="jsd", beta=0.3, temperature=0.9),
         ObjectiveSpec(topk=K, temperature=0.9, log_ratio_clip=4.0, outcome_weight=0.5)]


def _terms(spec, batch, teacher_head=None):
    ids, mask, pred, sets, tq, valid, w = batch
    outcome = None
    if spec.outcome_weight:
        outcome = (sets[:, :1], -torch.rand(len(pred), generator=torch.Generator().manual_seed(1)),
                   torch.randn(len(pred), generator=torch.Generator().manual_seed(2)))
    return Terms(sets, tq, valid, w, outcome=outcome, teacher=teacher_head)


def _full_grads(model: nn.Module):
    from torch.distributed.tensor import DTensor

    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in model.named_parameters()}


def _matches_one_process(rank, world, tied):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    batch = _batch()
    ids, mask, pred = batch[:3]
    make = lambda: tiny_llama(V + PAD, hidden=64, layers=2, heads=4, tie_word_embeddings=tied, seed=3)  # noqa
    ref_t, tp_t = OPDModel(make(), V), OPDModel(parallelize(make(), mesh), V, tp_group=mesh.get_group())
    if tied:
        assert tp_t.hf.get_output_embeddings().weight is tp_t.hf.get_input_embeddings().weight
    off, cols = local_vocab(tp_t.hf.get_output_embeddings().weight, V)
    score = lambda head: head.score(K, 0.9, batch[3])  # noqa: E731
    with torch.no_grad():
        s_ref, s_tp = ref_t(ids, mask, pred, score), tp_t(ids, mask, pred, score)
        t_head_ref = ref_t(ids, mask, pred, lambda head: head.as_teacher())
        t_head_tp = tp_t(ids, mask, pred, lambda head: head.as_teacher())
    assert torch.equal(s_ref.ids, s_tp.ids)
    torch.testing.assert_close(s_tp.logprobs, s_ref.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_tp.lse, s_ref.lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_tp.target_logprobs, s_ref.target_logprobs, rtol=1e-5, atol=1e-5)
    # greedy decoding through the root (what the teacher's evaluation and probe run) sees the whole vocabulary
    prompt = ids[:2, :4]
    gen = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(GenerateThroughRoot(tp_t).generate(prompt, **gen), ref_t.hf.generate(prompt, **gen))
    torch.testing.assert_close(t_head_tp.logits(), t_head_ref.logits()[:, off:off + cols], rtol=1e-5, atol=1e-5)
    for spec in SPECS:
        mode = spec.loss
        ref_s, tp_s = OPDModel(make(), V), OPDModel(parallelize(make(), mesh), V, tp_group=mesh.get_group())
        objective = make_objective(spec)
        loss_ref = ref_s(ids, mask, pred, lambda head: objective(head, _terms(spec, batch, t_head_ref))).loss
        loss_tp = tp_s(ids, mask, pred, lambda head: objective(head, _terms(spec, batch, t_head_tp))).loss
        torch.testing.assert_close(loss_tp, loss_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{mode}: {m}")
        loss_ref.backward()
        loss_tp.backward()
        g_ref, g_tp = _full_grads(ref_s), _full_grads(tp_s)
        assert g_ref.keys() == g_tp.keys()
        for name in g_ref:
            torch.testing.assert_close(g_tp[name], g_ref[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{mode} grad {name}: {m}")
        # the global norm of the mixed plain / DTensor gradients, and the clipped gradients
        norm_ref = float(torch.nn.utils.clip_grad_norm_(list(ref_s.parameters()), 0.05))
        norm_tp = clip_grad_norm(list(tp_s.parameters()), 0.05)
        assert norm_tp == pytest.approx(norm_ref, rel=1e-5), (mode, norm_tp, norm_ref)
        g_ref, g_tp = _full_grads(ref_s), _full_grads(tp_s)
        for name in g_ref:
            torch.testing.assert_close(g_tp[name], g_ref[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_tensor_parallel_model_matches_one_process(tmp_path, tied):
    spawn(functools.partial(_matches_one_process, tied=tied), 2, tmp_path)


def test_plan_and_divisibility_errors():
    m = tiny_llama(V, hidden=64, layers=1, heads=2)
    plan = tensor_parallel_plan(m)
    assert {n.rsplit(".", 1)[-1] for n in plan} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj", "lm_head"}
    with pytest.raises(ValueError, match="no tensor-parallel plan for Sequential"):
        tensor_parallel_plan(nn.Sequential(nn.Linear(4, 4)))
    from opdcore.parallel.tensor_parallel import _check_divisible

    with pytest.raises(ValueError, match="needs num_attention_heads divisible by 4; LlamaForCausalLM has "
                                         "num_attention_heads=2"):
        _check_divisible(m, 4)


def test_clip_grad_norm_on_plain_tensors_matches_torch():
    ps = [nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, qs):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    want = float(torch.nn.utils.clip_grad_norm_(ps, 0.5))
    assert clip_grad_norm(qs, 0.5) == pytest.approx(want, rel=1e-6)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q.grad, p.grad)
    assert clip_grad_norm(qs, 0.0) == pytest.approx(0.5, rel=1e-5)  # 0: measured, not clipped
