"""opdcore.integrations.trl against the real TRL 1.16: the opdcore loss equals TRL's own (value and gradient) on the
same batch, the real trainers train with it on tiny CPU models, the diagnostics reach TRL's logs, and bad input
fails with errors that name the argument."""
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration tests need trl (pip install -e .[test])")

from datasets import Dataset  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from opdcore.data.synthetic import build_char_tokenizer, tiny_llama  # noqa: E402
from opdcore.integrations.trl import (OPDCoreDistillationTrainer, OPDCoreGKDTrainer, OPDCoreLoss,  # noqa: E402
                                      trl_divergence)

BETAS = [1.0, 0.0, 0.5]  # TRL's convention: reverse KL, forward KL, JSD(0.5)
PROMPTS = [f"{a}+{b}=" for a, b in zip(range(10, 42, 2), range(37, 5, -2))]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and a shared CI machine's cores are not all ours)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    t = build_char_tokenizer()
    t.padding_side = "left"  # DistillationTrainer generates from left-padded prompts
    return t


def models(tok, dtype=torch.float32, sharp=(3.0, 6.0)):
    """A random tiny student and teacher with scaled LM heads: peaked, LLM-like next-token distributions (the top-k
    set holds most of the mass), the teacher's sharper."""
    s = tiny_llama(len(tok), hidden=32, layers=1, heads=1, tokenizer=tok, seed=1).to(dtype).train()
    t = tiny_llama(len(tok), hidden=32, layers=1, heads=1, tokenizer=tok, seed=2).to(dtype)
    with torch.no_grad():
        s.lm_head.weight.mul_(sharp[0])
        t.lm_head.weight.mul_(sharp[1])
    return s, t


def dataset():
    return Dataset.from_list([{"prompt": p} for p in PROMPTS])


def gkd_collator(tok):
    """Prompt-only batches for on-policy GKD (lmbda=1 generates the completions); no labels, so transformers passes
    no num_items_in_batch and the loss is the token mean over the generated completions."""
    def collate(examples):
        enc = tok([e["prompt"] for e in examples], padding=True, return_tensors="pt")
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "prompts": enc.input_ids,
                "prompt_attention_mask": enc.attention_mask}
    return collate


def gkd_trainer(tok, student, teacher, tmp_path, beta=1.0, steps=1, lr=1e-2, logging_steps=1, **opd):
    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, max_new_tokens=8,
                     lmbda=1.0, beta=beta, temperature=1.0, learning_rate=lr, logging_steps=logging_steps,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return OPDCoreGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset(),
                                 processing_class=tok, data_collator=gkd_collator(tok),
                                 opdcore_loss=OPDCoreLoss(**opd))


def distill_trainer(tok, student, teacher, tmp_path, beta=1.0, steps=1, lr=1e-2, logging_steps=1,
                    temperature=1.0, **opd):
    args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                              max_completion_length=8, beta=beta, temperature=temperature, learning_rate=lr,
                              logging_steps=logging_steps, report_to=[], save_strategy="no", use_cpu=True,
                              bf16=False, disable_tqdm=True, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return OPDCoreDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset(),
                                          processing_class=tok, opdcore_loss=OPDCoreLoss(**opd))


def gkd_batch(seed=0, B=3, L=14, prompt=5):
    """input_ids / attention_mask / labels as GKD's on-policy generation leaves them: -100 on the prompt and on
    padding, a padded tail in row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[0, -4:] = 0
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[am == 0] = -100
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def distill_batch(seed=0, B=3):
    """DistillationTrainer's generated batch: left-padded prompts, right-padded completions."""
    g = torch.Generator().manual_seed(seed)
    pm = torch.ones(B, 5, dtype=torch.long)
    pm[1, :2] = 0
    cm = torch.ones(B, 7, dtype=torch.long)
    cm[0, 4:] = 0
    cm[2, 6:] = 0
    return {"prompt_ids": torch.randint(4, 100, (B, 5), generator=g), "prompt_mask": pm,
            "completion_ids": torch.randint(4, 100, (B, 7), generator=g), "completion_mask": cm,
            "num_items_in_batch": cm.sum() + 3}


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_grads_close(got, ref, rtol):
    assert len(got) == len(ref) > 0
    for a, b in zip(got, ref):
        scale = float(b.abs().max()) + 1e-30
        assert float((a - b).abs().max()) <= rtol * scale


# ---- (a) the opdcore loss equals TRL's own ------------------------------------------------------------------

@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("lm_head", ["fused", "logits"])
def test_gkd_loss_equals_trl_float64(tok, tmp_path, beta, lm_head):
    s, t = models(tok, torch.float64)
    tr = gkd_trainer(tok, s, t, tmp_path, beta=beta, lm_head=lm_head, diagnostics="off")
    batch = gkd_batch()
    for n in (None, torch.tensor(23)):
        ref, g_ref = loss_and_grads(s, lambda: GKDTrainer.compute_loss(tr, s, batch, num_items_in_batch=n))
        got, g = loss_and_grads(s, lambda: tr.compute_loss(s, batch, num_items_in_batch=n))
        assert got.dtype == torch.float64 and float(ref) > 0
        assert abs(float(got - ref)) <= 1e-12 * abs(float(ref))
        assert_grads_close(g, g_ref, 1e-10)


@pytest.mark.parametrize("beta", BETAS)
def test_distillation_loss_equals_trl(tok, tmp_path, beta):
    # TRL's chunked kernel computes in float32 whatever the model dtype: compare at float32 accuracy
    s, t = models(tok, torch.float32)
    tr = distill_trainer(tok, s, t, tmp_path, beta=beta, temperature=0.7, diagnostics="every_step")
    batch = distill_batch()
    n = batch["num_items_in_batch"]
    out = {}

    def trl_loss():
        out["trl"] = DistillationTrainer._compute_loss(tr, s, batch, n)
        return out["trl"][0]

    def opd_loss():
        out["opd"] = tr._compute_loss(s, batch, n)
        return out["opd"][0]

    ref, g_ref = loss_and_grads(s, trl_loss)
    got, g = loss_and_grads(s, opd_loss)
    assert abs(float(got - ref)) <= 2e-5 * abs(float(ref))
    assert_grads_close(g, g_ref, 2e-5)
    # TRL's entropy sum and valid-token count (its `entropy` metric) come out the same
    assert int(out["opd"][2]) == int(out["trl"][2]) == int(batch["completion_mask"].sum())
    assert float(out["opd"][1]) == pytest.approx(float(out["trl"][1]), rel=1e-5)
    # and through the public compute_loss (TRL's normaliser from the batch)
    got2, g2 = loss_and_grads(s, lambda: tr.compute_loss(s, batch))
    assert float(got2) == pytest.approx(float(got), rel=1e-6)
    assert_grads_close(g2, g, 1e-5)


def _reference_sparse(kind, zs, zt, k):
    """The sparse losses on full float64 logits, by autograd: the student's top-k set S, p and q full-vocabulary."""
    lp, lq = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ids = lp.detach().topk(k, -1).indices
    lps, lqs = lp.gather(1, ids), lq.gather(1, ids)
    if kind == "renorm_topk_kl":
        lpb, lqb = lps - lps.logsumexp(-1, keepdim=True), lqs - lqs.logsumexp(-1, keepdim=True)
        return (lpb.exp() * (lpb - lqb)).sum(-1)
    if kind == "tail_topk_kl":
        P, Q = lps.exp().sum(-1), lqs.exp().sum(-1)
        return (lps.exp() * (lps - lqs)).sum(-1) + (1 - P) * (torch.log1p(-P) - torch.log1p(-Q))
    w = torch.softmax(lps.detach(), -1)  # topk_opd, student_p weights: -sum sg(r) log p, r = -w (log p - log q)
    r = -w * (lps.detach() - lqs)
    return -(r * lps).sum(-1)


@pytest.mark.parametrize("kind", ["topk_opd", "renorm_topk_kl", "tail_topk_kl"])
def test_sparse_losses_equal_reference_float64(tok, tmp_path, kind):
    s, t = models(tok, torch.float64)
    k = 8
    results = {}
    for lm_head in ("fused", "logits"):
        tr = gkd_trainer(tok, s, t, tmp_path, lm_head=lm_head, loss=kind, topk=k, diagnostics="off")
        results[lm_head] = loss_and_grads(s, lambda: tr.compute_loss(s, gkd_batch()))
    batch = gkd_batch()
    mask = batch["labels"][:, 1:] != -100

    def ref_loss():
        zs = s(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        with torch.no_grad():
            zt = t(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        return _reference_sparse(kind, zs, zt, k).sum() / mask.sum()

    ref, g_ref = loss_and_grads(s, ref_loss)
    for lm_head, (got, g) in results.items():
        assert abs(float(got - ref)) <= 1e-10 * max(1.0, abs(float(ref))), lm_head
        assert_grads_close(g, g_ref, 1e-9)


# ---- (b) training through the real trainers lowers the divergence ----------------------------------------------

def _reverse_kl(student, teacher, batch):
    """Token-mean reverse KL on a fixed batch, plain PyTorch (the yardstick, independent of opdcore)."""
    with torch.no_grad():
        mask = batch["labels"][:, 1:] != -100
        zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        lp, lq = torch.log_softmax(zs.double(), -1), torch.log_softmax(zt.double(), -1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _fixed_batches(tok, student):
    """The student's own samples for 8 prompts before training, as GKD's and DistillationTrainer's batches."""
    enc = tok(PROMPTS[:8], padding=True, return_tensors="pt")
    with torch.no_grad():
        seq = student.generate(**enc, max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=tok.pad_token_id)
    P = enc.input_ids.shape[1]
    labels = seq.clone()
    labels[:, :P] = -100
    am = torch.cat([enc.attention_mask, torch.ones_like(seq[:, P:])], 1)
    gkd = {"input_ids": seq, "attention_mask": am, "labels": labels}
    distill = {"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask, "completion_ids": seq[:, P:],
               "completion_mask": torch.ones_like(seq[:, P:])}
    return gkd, distill


@pytest.mark.parametrize("trainer,loss", [("gkd", "dense"), ("distillation", "dense"), ("gkd", "renorm_topk_kl"),
                                          ("distillation", "tail_topk_kl"), ("distillation", "topk_opd")])
def test_training_lowers_loss(tok, tmp_path, trainer, loss):
    """8 steps of the real trainer (on-policy generation, AdamW) lower the objective on a fixed batch of the
    student's samples: the loss itself for the divergences, the full reverse KL for topk_opd (a surrogate whose
    value is not a divergence)."""
    s, t = models(tok)
    make = gkd_trainer if trainer == "gkd" else distill_trainer
    tr = make(tok, s, t, tmp_path, steps=8, lr=1e-2, loss=loss, topk=16, diagnostics="off",
              **({"log_ratio_clip": 5.0} if loss == "topk_opd" else {}))
    gkd, distill = _fixed_batches(tok, s)

    def measure():
        if loss == "topk_opd":
            return _reverse_kl(s, t, gkd)
        with torch.no_grad():
            return float(tr.compute_loss(s, gkd if trainer == "gkd" else distill))

    before = measure()
    tr.train()
    after = measure()
    losses = [r["loss"] for r in tr.state.log_history if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert before > 0 and after < 0.85 * before, (before, after)


# ---- (c) the diagnostics in TRL's logs ------------------------------------------------------------------------

KEYS = ["opdcore/topk_overlap", "opdcore/overlap_mass_student", "opdcore/overlap_mass_teacher",
        "opdcore/entropy_gap", "opdcore/student_entropy", "opdcore/teacher_entropy", "opdcore/set_mass",
        "opdcore/lbar", "opdcore/drift_share"]


def _check_row(row):
    for key in KEYS:
        assert key in row and math.isfinite(row[key]), key
    for key in ("opdcore/topk_overlap", "opdcore/overlap_mass_student", "opdcore/set_mass", "opdcore/drift_share"):
        assert 0.0 <= row[key] <= 1.0, key
    assert row["opdcore/entropy_gap"] >= 0
    assert row["opdcore/entropy_gap"] >= abs(row["opdcore/teacher_entropy"] - row["opdcore/student_entropy"]) - 1e-9


def test_diagnostics_logged_distillation(tok, tmp_path):
    s, t = models(tok)
    tr = distill_trainer(tok, s, t, tmp_path, steps=3, loss="dense")
    tr.train()
    rows = [r for r in tr.state.log_history if "loss" in r]
    assert len(rows) == 3
    for row in rows:
        _check_row(row)
        # TRL's own entropy metric is the student's entropy opdcore computed
        assert row["entropy"] == pytest.approx(row["opdcore/student_entropy"], rel=1e-5)


def test_diagnostics_only_on_logging_steps_gkd(tok, tmp_path):
    s, t = models(tok)
    tr = gkd_trainer(tok, s, t, tmp_path, steps=4, logging_steps=2, loss="topk_opd", topk=8)
    computed = []
    record = tr._opdcore_record  # count which steps compute them (the record itself runs unchanged)
    tr._opdcore_record = lambda sums: (computed.append((tr.state.global_step, sums is not None)), record(sums))[1]
    tr.train()
    rows = [r for r in tr.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        _check_row(row)
    # optimizer steps 2 and 4 log (global_step 1 and 3 while they run): only they pay for the diagnostics
    assert computed == [(0, False), (1, True), (2, False), (3, True)]
    assert sum(1 for r in rows for k in KEYS if k in r) == 2 * len(KEYS)


def test_diagnostics_off(tok, tmp_path):
    s, t = models(tok)
    tr = distill_trainer(tok, s, t, tmp_path, steps=2, loss="renorm_topk_kl", topk=8, diagnostics="off")
    tr.train()
    rows = [r for r in tr.state.log_history if "loss" in r]
    assert rows and not any(k.startswith("opdcore/") for r in rows for k in r)


# ---- (d) error paths ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,needle", [
    ({"loss": "kl"}, "OPDCoreLoss.loss"),
    ({"topk": 0}, "OPDCoreLoss.topk"),
    ({"topk": 2.5}, "OPDCoreLoss.topk"),
    ({"loss": "topk_opd", "strategy": "everything"}, "OPDCoreLoss.strategy"),
    ({"loss": "dense", "strategy": "union"}, "OPDCoreLoss.strategy"),
    ({"loss": "dense", "weight_mode": "student_p"}, "OPDCoreLoss.weight_mode"),
    ({"loss": "topk_opd", "weight_mode": "sqrt"}, "OPDCoreLoss.weight_mode"),
    ({"loss": "renorm_topk_kl", "log_ratio_clip": 5.0}, "OPDCoreLoss.log_ratio_clip"),
    ({"loss": "topk_opd", "log_ratio_clip": -1.0}, "OPDCoreLoss.log_ratio_clip"),
    ({"lm_head": "dense"}, "OPDCoreLoss.lm_head"),
    ({"diagnostics": "sometimes"}, "OPDCoreLoss.diagnostics"),
    ({"max_block_elements": 0}, "OPDCoreLoss.max_block_elements"),
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        OPDCoreLoss(**kwargs)


def test_beta_mapping_and_range():
    assert trl_divergence(0.0)[0] == "forward_kl" and trl_divergence(1.0)[0] == "reverse_kl"
    assert trl_divergence(0.3) == ("jsd", 0.3)
    with pytest.raises(ValueError, match="args.beta"):
        trl_divergence(1.5, "args.beta")


def test_bad_trainer_arguments(tok, tmp_path):
    s, t = models(tok)
    with pytest.raises(TypeError, match="opdcore_loss"):
        OPDCoreGKDTrainer(model=s, teacher_model=t, args=GKDConfig(output_dir=str(tmp_path), use_cpu=True),
                          processing_class=tok, data_collator=gkd_collator(tok), train_dataset=dataset(),
                          opdcore_loss={"loss": "dense"})
    tr = gkd_trainer(tok, s, t, tmp_path, loss="renorm_topk_kl", topk=200)  # the vocabulary is 100
    with pytest.raises(ValueError, match="OPDCoreLoss.topk"):
        tr.compute_loss(s, gkd_batch())
    # GKD divides by num_items_in_batch: transformers' count of all-masked collator labels is 0
    with pytest.raises(ValueError, match="num_items_in_batch"):
        gkd_trainer(tok, s, t, tmp_path).compute_loss(s, gkd_batch(), num_items_in_batch=torch.tensor(0))


def test_head_with_bias(tok, tmp_path):
    """A biased LM head: lm_head='fused' refuses it by name, 'auto' falls back to logits and equals TRL's loss."""
    s, t = models(tok, torch.float64)
    for m in (s, t):
        m.lm_head = torch.nn.Linear(32, m.config.vocab_size, bias=True, dtype=torch.float64)
        torch.nn.init.normal_(m.lm_head.bias, std=0.5)
    batch = gkd_batch()
    with pytest.raises(ValueError, match="bias"):
        gkd_trainer(tok, s, t, tmp_path, lm_head="fused").compute_loss(s, batch)
    tr = gkd_trainer(tok, s, t, tmp_path, lm_head="auto", diagnostics="every_step")
    with pytest.warns(UserWarning, match="bias"):
        got, g = loss_and_grads(s, lambda: tr.compute_loss(s, batch))
    ref, g_ref = loss_and_grads(s, lambda: GKDTrainer.compute_loss(tr, s, batch))
    assert abs(float(got - ref)) <= 1e-12 * float(ref)
    assert_grads_close(g, g_ref, 1e-10)
    # DistillationTrainer: TRL's chunked loss adds the bias; the fallback does the same
    s32, t32 = s.float(), t.float()
    trd = distill_trainer(tok, s32, t32, tmp_path, lm_head="auto", diagnostics="off")
    db = distill_batch()
    with pytest.warns(UserWarning, match="bias"):
        got, g = loss_and_grads(s32, lambda: trd._compute_loss(s32, db, db["num_items_in_batch"])[0])
    ref, g_ref = loss_and_grads(s32, lambda: DistillationTrainer._compute_loss(trd, s32, db,
                                                                               db["num_items_in_batch"])[0])
    assert abs(float(got - ref)) <= 2e-5 * float(ref)
    assert_grads_close(g, g_ref, 2e-5)


def test_head_input_is_not_last_hidden_state(tok, tmp_path):
    """Logits the model transforms after its head (here a hook doubling them) are caught by GKD's per-step check."""
    s, t = models(tok, torch.float64)
    s.lm_head.register_forward_hook(lambda mod, inp, out: out * 2.0)
    batch = gkd_batch()
    with pytest.raises(ValueError, match="does not reproduce its logits"):
        gkd_trainer(tok, s, t, tmp_path, lm_head="fused").compute_loss(s, batch)
    tr = gkd_trainer(tok, s, t, tmp_path, lm_head="auto", diagnostics="off")
    with pytest.warns(UserWarning, match="does not reproduce"):
        got = tr.compute_loss(s, batch)
    ref = GKDTrainer.compute_loss(tr, s, batch)
    assert abs(float(got - ref)) <= 1e-12 * float(ref)


def test_bf16_autocast_matches_trl(tok, tmp_path):
    """Under bfloat16 autocast with float32 weights (TRL's mixed precision) the head is projected in bfloat16 like
    TRL's chunked loss: the two agree to bfloat16 accuracy."""
    s, t = models(tok, torch.float32)
    tr = distill_trainer(tok, s, t, tmp_path, diagnostics="off")
    batch = distill_batch()
    n = batch["num_items_in_batch"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, g_ref = loss_and_grads(s, lambda: DistillationTrainer._compute_loss(tr, s, batch, n)[0])
        got, g = loss_and_grads(s, lambda: tr._compute_loss(s, batch, n)[0])
    assert abs(float(got - ref)) <= 2e-3 * abs(float(ref))
    num = sum(float((a - b).square().sum()) for a, b in zip(g, g_ref)) ** 0.5
    den = sum(float(b.square().sum()) for b in g_ref) ** 0.5
    assert num <= 2e-2 * den


@pytest.mark.parametrize("args", [["--steps", "2"], ["--trainer", "gkd", "--loss", "topk_opd", "--steps", "2"]])
def test_example_runs(args, tmp_path):
    """examples/trl_opd.py as a user runs it: TRL's real trainer on tiny models, opdcore's loss, logged lines."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "trl_opd.py")
    out = subprocess.run([sys.executable, script, *args, "--output-dir", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step=2" in out.stdout and "topk_overlap=" in out.stdout, out.stdout[-2000:]
