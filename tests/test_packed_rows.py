"""Packed rows (train.pack_rows): several sequences per row of the model's forward, kept apart by restarting
position ids, must give every response token the hidden state, log-probs and gradient it gets with one
right-padded sequence per row."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from opdcore.data.synthetic import tiny_llama
from opdcore.rollout import Rollout
from opdcore.trainer import microbatch
from opdcore.trainer.models import OPDModel, packs_rows


@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), extra=st.integers(0, 20))
def test_row_layout_places_every_sequence_once_within_its_row(lengths, extra):
    width = max(lengths) + extra
    place = microbatch.row_layout(lengths, width)
    used = {}
    for n, (row, col) in zip(lengths, place):
        assert 0 <= col and col + n <= width
        for c in range(col, col + n):
            assert (row, c) not in used
            used[(row, c)] = True
    rows = max(r for r, _ in place) + 1
    assert sum(lengths) <= rows * width
    assert set(r for r, _ in place) == set(range(rows))  # no empty row


def test_row_layout_is_first_fit_decreasing():
    assert microbatch.row_layout([5, 3, 2, 4, 1], 5) == [(0, 0), (2, 0), (2, 3), (1, 0), (1, 4)]
    with pytest.raises(ValueError, match="does not fit rows of 4"):
        microbatch.row_layout([3, 5], 4)


def _rollouts(V, seed=0):
    """Lengths that pack: one long sequence and several short ones."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 14), (2, 3), (3, 2), (1, 4), (4, 1), (2, 2)]  # (prompt, response)
    return [Rollout(i % 3, torch.randint(0, V, (p,), generator=g).tolist(),
                    torch.randint(0, V, (r,), generator=g).tolist(), [-0.5 - i] * r, True)
            for i, (p, r) in enumerate(shapes)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_give_the_padded_rows_hidden_states_and_gradients(dtype):
    V = 40
    model = OPDModel(tiny_llama(V, hidden=32, layers=2, heads=2, seed=3).to(dtype), V)
    rollouts = _rollouts(V)
    padded, = microbatch.build(rollouts, 10_000, "cpu")
    packed, = microbatch.build(rollouts, 10_000, "cpu", pack_rows=True)
    assert packed.attention_mask is None and packed.position_ids.shape == packed.input_ids.shape
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]  # 6 sequences in fewer rows
    for name in ("targets", "token_seq", "positions", "rollout_logprobs"):
        assert torch.equal(getattr(packed, name), getattr(padded, name)), name
    assert packed.indices == padded.indices
    flat = packed.input_ids.reshape(-1)
    assert torch.equal(flat[packed.pred_index + 1], packed.targets)
    probe = torch.randn(packed.num_tokens, 32, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, mb in (("padded", padded), ("packed", packed)):
        model.zero_grad(set_to_none=True)
        hidden = model(mb.input_ids, mb.attention_mask, mb.pred_index, lambda head: head.hidden,
                       position_ids=mb.position_ids)
        (hidden.float() * probe).sum().backward()
        out[name] = (hidden.detach().float(), [p.grad.float().clone() for p in model.parameters() if p.grad is not None])
    assert len(out["packed"][1]) == len(out["padded"][1]) > 10  # every backbone weight (the head has no part)
    for a, b in zip([out["packed"][0]] + out["packed"][1], [out["padded"][0]] + out["padded"][1]):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:  # other shapes round differently in bfloat16, and sums of cancelling terms most
            assert (a - b).norm() <= 2e-2 * b.norm()


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 2**31))
def test_packed_rows_give_the_padded_rows_log_probs(seed):
    """Random lengths, the fused scoring path the trainer runs (top-k, entropy, sampled-token log-probs)."""
    V = 30
    g = torch.Generator().manual_seed(seed)
    model = OPDModel(tiny_llama(V, hidden=16, layers=1, heads=2, seed=seed % 1000), V)
    n = int(torch.randint(1, 9, (1,), generator=g))
    rollouts = [Rollout(i, torch.randint(0, V, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist(),
                        torch.randint(0, V, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist(),
                        None, True) for i in range(n)]
    scores = []
    for pack in (False, True):
        mb, = microbatch.build(rollouts, 10_000, "cpu", pack_rows=pack)
        with torch.no_grad():
            scores.append(model(mb.input_ids, mb.attention_mask, mb.pred_index,
                                lambda head: head.score(4, 1.0, mb.targets[:, None]), position_ids=mb.position_ids))
    a, b = scores
    assert torch.equal(a.ids, b.ids) or torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    for x, y in ((a.logprobs, b.logprobs), (a.entropy, b.entropy), (a.target_logprobs, b.target_logprobs)):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


def test_packs_rows_on_real_models():
    """transformers' Llama keeps packed sequences apart (float32 and bfloat16); Mamba, a state-space model whose
    state runs through the whole row, does not, so the trainer keeps one sequence per row for it."""
    from transformers import MambaConfig, MambaForCausalLM

    assert packs_rows(tiny_llama(40, hidden=32, layers=2, heads=2, seed=0))
    assert packs_rows(tiny_llama(40, hidden=32, layers=2, heads=2, seed=0).to(torch.bfloat16))
    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=40, hidden_size=16, state_size=4, num_hidden_layers=2,
                                         expand=2, conv_kernel=3)).eval()
    assert not packs_rows(mamba)
