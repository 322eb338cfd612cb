"""The fused next-token draw (opdcore.sample_tokens) against its plain-PyTorch twin, its distribution, its errors,
and the HF rollout engine that uses it."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import opdcore
from opdcore import reference as ref
from helpers import ATOL, DTYPES, make_logits


def cdf_gap(x, temperature, ids, uniform):
    """How far each row's target u * total lies from the boundaries of the drawn id's interval of the CDF (0 when
    inside): a kernel and a twin that round differently may disagree only where this is tiny."""
    y = ref._scaled(x, temperature).double()
    p = (y - y.amax(-1, keepdim=True)).exp()
    cdf = p.cumsum(-1)
    target = uniform * cdf[:, -1]
    hi = cdf.gather(1, ids[:, None]).squeeze(1)
    lo = hi - p.gather(1, ids[:, None]).squeeze(1)
    return (torch.clamp(lo - target, min=0) + torch.clamp(target - hi, min=0)) / cdf[:, -1]


@given(n=st.integers(1, 9), v=st.integers(1, 5000), dtype=st.sampled_from(DTYPES),
       temperature=st.sampled_from([1.0, 0.7, 1.9, 0.0]), ties=st.booleans(),
       neg_inf=st.sampled_from([0.0, 0.3, 0.97]), seed=st.integers(0, 2**31))
def test_sample_matches_reference(n, v, dtype, temperature, ties, neg_inf, seed):
    x = make_logits(n, v, dtype, seed, ties=ties, neg_inf_frac=neg_inf)
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    got = opdcore.sample_tokens(x, temperature, uniform=u)
    want_ids, want_lp = ref.sample_tokens(x, u, temperature)
    assert got.ids.dtype == torch.int64 and got.logprobs.dtype == (torch.float64 if dtype == torch.float64
                                                                   else torch.float32)
    assert bool(torch.isfinite(x.gather(1, got.ids[:, None])).all())  # never a masked column
    if temperature == 0:
        assert torch.equal(got.ids, want_ids)  # the first maximum
    else:
        same = got.ids == want_ids
        assert bool((same | (cdf_gap(x, temperature, got.ids, u) < 1e-5)).all())
    lp = ref.log_softmax(x, temperature if temperature > 0 else 1.0).gather(1, got.ids[:, None]).squeeze(1)
    torch.testing.assert_close(got.logprobs, lp, atol=ATOL[dtype] * 5, rtol=1e-5)


def test_sample_edges_of_the_uniform_and_masked_columns():
    x = torch.tensor([[float("-inf"), 0.0, float("-inf"), 1.0, float("-inf")]] * 3)
    u = torch.tensor([0.0, 0.5, 1.0 - 2.0 ** -53], dtype=torch.float64)
    got = opdcore.sample_tokens(x, uniform=u)
    assert got.ids.tolist() == [1, 3, 3]  # u = 0 takes the first column with mass, u -> 1 the last
    p1 = 1 / (1 + math.e)
    torch.testing.assert_close(got.logprobs, torch.tensor([math.log(p1), math.log(1 - p1), math.log(1 - p1)]))


def test_sample_greedy_takes_the_first_maximum_and_no_random_numbers():
    # Greedy must not move the global random stream: ranks that split a greedy evaluation differently (tensor
    # parallelism) would otherwise sample different training rollouts afterwards.
    x = torch.tensor([[1.0, 3.0, 3.0, -2.0], [5.0, 5.0, 5.0, 5.0]])
    state = torch.get_rng_state()
    assert opdcore.sample_tokens(x, 0.0).ids.tolist() == [1, 0]
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_frequencies_follow_the_softmax(dtype):
    # 200k draws of one 3000-column row (several kernel blocks) in one call: every bin within 5 sigma of its
    # probability, and the draws' mean log-prob is the row's negative entropy.
    g = torch.Generator().manual_seed(0)
    row = (torch.randn(3000, generator=g) * 2).to(dtype)
    row[2500:] = -1e4  # a block of negligible mass: only rounding could ever pick it
    n, T = 200_000, 0.8
    got = opdcore.sample_tokens(row.expand(n, -1), T, generator=g)
    p = torch.softmax(row.double() / T, -1)
    counts = torch.bincount(got.ids, minlength=3000).double()
    sigma = (n * p * (1 - p)).sqrt().clamp(min=1)
    assert float(((counts - n * p).abs() / sigma).max()) < 5.5
    assert int(counts[2500:].sum()) == 0
    entropy = -torch.special.xlogy(p, p).sum()
    assert abs(float(got.logprobs.double().mean()) + float(entropy)) < 0.01


def test_sample_non_contiguous_rows():
    base = make_logits(8, 3000, torch.float32, 1)
    x = base[::2, ::2]
    u = torch.rand(4, dtype=torch.float64)
    got = opdcore.sample_tokens(x, uniform=u)
    want = opdcore.sample_tokens(x.contiguous(), uniform=u)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.logprobs, want.logprobs)


@pytest.mark.parametrize("bad, match", [
    ("nan", "scores contains NaN or \\+inf \\(row 1\\)"),
    ("inf", "scores contains NaN or \\+inf \\(row 1\\)"),
    ("all_neg_inf", "scores row 1 is entirely -inf"),
])
def test_sample_rejects_bad_scores(bad, match):
    x = torch.randn(3, 50)
    x[1, 7] = {"nan": float("nan"), "inf": float("inf"), "all_neg_inf": float("-inf")}[bad]
    if bad == "all_neg_inf":
        x[1] = float("-inf")
    with pytest.raises(RuntimeError, match=match):
        opdcore.sample_tokens(x)
    with pytest.raises(ValueError):
        ref.sample_tokens(x, torch.rand(3, dtype=torch.float64))


def test_sample_rejects_bad_arguments():
    x = torch.randn(3, 50)
    with pytest.raises(RuntimeError, match="uniform must lie in \\[0, 1\\)"):
        opdcore.sample_tokens(x, uniform=torch.tensor([0.1, 1.0, 0.2], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="uniform must be \\[rows=3\\]"):
        opdcore.sample_tokens(x, uniform=torch.rand(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="uniform must be float64"):
        opdcore.sample_tokens(x, uniform=torch.rand(3))
    with pytest.raises(RuntimeError, match="temperature must be 0 \\(greedy\\) or a positive"):
        opdcore.sample_tokens(x, -1.0)
    with pytest.raises(RuntimeError, match="scores has no rows"):
        opdcore.sample_tokens(torch.randn(0, 50))
    with pytest.raises(ValueError, match="scores must be a 2-D"):
        opdcore.sample_tokens(torch.randn(50))
    with pytest.raises(RuntimeError, match="scores must be float32"):
        opdcore.sample_tokens(torch.zeros(3, 50, dtype=torch.long))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (0.9, 0.8), (0.0, 1.0)])
def test_hf_engine_records_the_log_probs_of_its_draws(tmp_path, temperature, top_p):
    # The engine's recorded log-prob of every drawn token equals the model's own: log_softmax(logits / T) on
    # the full sequence (top-p: renormalised over the kept nucleus, which holds every drawn token).
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.logits_process import TopPLogitsWarper

    from opdcore.rollout import SamplingConfig
    from opdcore.rollout.hf import HFEngine
    from tiny_setup import make_tiny_run_dir

    paths = make_tiny_run_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(paths["student"]).eval()
    torch.manual_seed(0)
    prompts = [tok("12+34=")["input_ids"], tok("7+8=")["input_ids"]]
    out = HFEngine(model, tok).generate(prompts, SamplingConfig(n=3, temperature=temperature, top_p=top_p,
                                                                max_new_tokens=10))
    assert len(out) == 6
    for r in out:
        assert len(r.rollout_logprobs) == len(r.response_ids) > 0
        with torch.no_grad():
            logits = model(torch.tensor([r.prompt_ids + r.response_ids])).logits[0].float()
        P = len(r.prompt_ids)
        scores = logits[P - 1:P - 1 + len(r.response_ids)]
        if temperature > 0:
            scores = scores / temperature
            if top_p < 1:
                scores = TopPLogitsWarper(top_p)(None, scores.clone())
        lp = torch.log_softmax(scores, -1).gather(1, torch.tensor(r.response_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(r.rollout_logprobs), lp, atol=1e-4, rtol=1e-4)
        if temperature == 0:
            assert r.response_ids == scores.argmax(-1).tolist()


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_sdpa(mask, heads, kv_heads, dtype):
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from opdcore.rollout.decode_attention import decode_attention

    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    B, L, D = 5, 37, 16
    q = torch.randn(B, heads, 1, D, generator=g).to(dtype)
    k = torch.randn(B, kv_heads, L, D, generator=g).to(dtype)
    v = torch.randn(B, kv_heads, L, D, generator=g).to(dtype)
    keep = torch.ones(B, 1, 1, L, dtype=torch.bool)
    keep[1, ..., :9] = False  # left padding
    keep[3, ..., :30] = False
    m = {"none": None, "bool": keep,
         "additive": torch.zeros(B, 1, 1, L).masked_fill(~keep, torch.finfo(torch.float32).min).to(dtype)}[mask]
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    got, _ = decode_attention(module, q, k, v, m, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.3)
    assert got.shape == want.shape == (B, 1, heads, D)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # more than one query (the prefill) is sdpa itself
    q2 = torch.randn(B, heads, 3, D, generator=g).to(dtype)
    m2 = None if m is None else m.expand(B, 1, 3, L)
    assert torch.equal(decode_attention(module, q2, k, v, m2, scaling=0.3)[0],
                       sdpa_attention_forward(module, q2, k, v, m2, scaling=0.3)[0])


def test_hf_engine_decodes_like_sdpa_and_restores_it(tmp_path, monkeypatch):
    # Greedy rollouts of a grouped-query model with left-padded prompts: the same tokens and log-probs as
    # generating on sdpa, and the model is back on sdpa afterwards (its training forwards never see the switch).
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from opdcore.rollout import SamplingConfig
    from opdcore.rollout.hf import HFEngine
    from tiny_setup import make_tiny_run_dir

    tok = AutoTokenizer.from_pretrained(make_tiny_run_dir(tmp_path)["tokenizer"])
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=192,
                                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                         attn_implementation="sdpa")).eval()
    prompts = [tok("12+34=")["input_ids"], tok("7+8=")["input_ids"], tok("100+250=")["input_ids"]]
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=12)
    engine = HFEngine(model, tok)
    fast = engine.generate(prompts, greedy)
    assert model.config._attn_implementation == "sdpa"
    import opdcore.rollout.hf as hf
    monkeypatch.setattr(hf, "_decode_attention", lambda model, enabled: hf._Attention(model, None))  # stay on sdpa
    slow = engine.generate(prompts, greedy)
    for a, b in zip(fast, slow):
        assert a.response_ids == b.response_ids
        torch.testing.assert_close(torch.tensor(a.rollout_logprobs), torch.tensor(b.rollout_logprobs), atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
def test_sample_torch_path_agrees(temperature):
    # The path non-CPU devices take (a few torch ops), checked here on CPU against the kernel.
    from opdcore.ops.sampling import _sample_torch

    x = make_logits(64, 3000, torch.float32, 7, neg_inf_frac=0.3)
    u = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got, want = _sample_torch(x, u, temperature), opdcore.sample_tokens(x, temperature, uniform=u)
    assert bool(((got.ids == want.ids) | (cdf_gap(x, temperature or 1.0, got.ids, u) < 1e-5)).all())
    torch.testing.assert_close(got.logprobs[got.ids == want.ids], want.logprobs[got.ids == want.ids])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hf_engine_shares_each_prompts_prefill_across_its_samples(tmp_path, monkeypatch, temperature):
    # n samples per prompt: the prompt's KV cache is computed once and repeated. Same seed, same rollouts (token
    # for token, log-probs to rounding) as prefilling every sample, including left-padded prompts and a batch that
    # splits a prompt's samples (which falls back to the plain prefill).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import opdcore.rollout.hf as hf
    from opdcore.rollout import SamplingConfig
    from tiny_setup import make_tiny_run_dir

    paths = make_tiny_run_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(paths["student"]).eval()
    prompts = [tok(p)["input_ids"] for p in ("12+34=", "7+8=", "100+250=")]
    sampling = SamplingConfig(n=3, temperature=temperature, max_new_tokens=10)
    calls = []
    real = hf.HFEngine._shared_prompt_cache

    def spy(self, items, ids, mask):
        cache = real(self, items, ids, mask)
        calls.append(cache is not None)
        return cache

    monkeypatch.setattr(hf.HFEngine, "_shared_prompt_cache", spy)
    for batch_size, shared in ((9, [True]), (4, [False, True, False])):  # 4: [a a a b] [b b c c] [c]
        calls.clear()
        torch.manual_seed(0)
        fast = hf.HFEngine(model, tok, batch_size=batch_size).generate(prompts, sampling)
        assert calls == shared
        monkeypatch.setattr(hf.HFEngine, "_shared_prompt_cache", lambda self, *a: None)
        torch.manual_seed(0)
        slow = hf.HFEngine(model, tok, batch_size=batch_size).generate(prompts, sampling)
        monkeypatch.setattr(hf.HFEngine, "_shared_prompt_cache", spy)
        for a, b in zip(fast, slow):
            assert a.response_ids == b.response_ids
            torch.testing.assert_close(torch.tensor(a.rollout_logprobs), torch.tensor(b.rollout_logprobs),
                                       atol=1e-5, rtol=1e-5)
