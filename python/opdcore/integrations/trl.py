"""opdcore's objectives inside TRL 1.16's on-policy distillation trainers.

Two drop-in subclasses replace the trainer's loss and keep everything else of TRL (generation, batching, gradient
accumulation, DDP/FSDP wrappers, logging):

    OPDCoreDistillationTrainer(trl.DistillationTrainer)          hooks DistillationTrainer._compute_loss
    OPDCoreGKDTrainer(trl.experimental.gkd.GKDTrainer)           hooks GKDTrainer.compute_loss (use lmbda=1)

Both take `opdcore_loss=OPDCoreLoss(...)`:

    loss="dense"            exact full-vocabulary divergence with TRL's `beta` convention (0: forward KL(q || p),
                            1: reverse KL(p || q), else the generalised JSD), opdcore.ops.dense_divergence_linear_weighted
    loss="topk_opd"         reward-weighted top-k OPD loss (METHOD.md 2.3), opdcore.ops.opd_topk_loss_linear_weighted
    loss="renorm_topk_kl"   exact renormalised top-k reverse KL (2.4), opdcore.ops.renorm_topk_kl_linear
    loss="tail_topk_kl"     top-k reverse KL with a rest-of-vocabulary bin (2.4), opdcore.ops.tail_topk_kl_linear_weighted

The sparse losses score the teacher's top-k (and its log-probs on the student's set) with opdcore.linear_topk from
the teacher's last hidden states, no grad. Response tokens and the normaliser are TRL's own: the completion tokens
(GKD: shifted labels != -100; DistillationTrainer: completion_mask, times tool_mask), each weighted 1 / (TRL's
token count: `num_items_in_batch` when the trainer passes it, else the local valid-token count), so the opdcore loss
is a drop-in for TRL's value and gradient.

LM head requirement (lm_head="auto" | "fused" | "logits"): the fused path reads each model's last hidden state and
its LM-head weight and never forms [tokens, vocab] logits for the student. That needs a plain linear head: no
bias, no final-logit soft-capping (a constant logit scale, e.g. Cohere's logit_scale, is folded into the hidden
states). Llama / SmolLM2 / Qwen2 / Mistral heads qualify. With lm_head="auto" other heads fall back to the models'
full logits (correct, not memory-efficient); lm_head="fused" raises instead. The GKD hook asks the model for
output_hidden_states (and logits_to_keep=1 where the model takes it) and checks, every step, that the last hidden
state times the head reproduces the model's own last logits; a model whose last hidden state is not the head's
input is caught there.

Diagnostics (opdcore.metrics, on the student's top-k set; logged through TRL's metrics dict as "opdcore/..." at
the trainer's logging steps): topk_overlap, overlap_mass_student / _teacher, entropy_gap, student_entropy,
teacher_entropy, set_mass (P of the student's top-k), lbar and drift_share (the set-mass drift of METHOD.md 2.3).
With the dense loss they cost two extra no-grad LM-head passes, so by default they run only on steps TRL logs.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from opdcore import metrics
from opdcore.objectives import FusedHead, LMHead, LogitsHead, ObjectiveSpec, Terms, make_objective
from opdcore.ops import DEFAULT_BLOCK_ELEMENTS, WEIGHT_MODES, build_token_set, canonical_strategy

import trl
from trl import DistillationTrainer
from trl.experimental.gkd import GKDTrainer

__all__ = ["OPDCoreLoss", "OPDCoreGKDTrainer", "OPDCoreDistillationTrainer", "LOSSES", "trl_divergence",
           "opdcore_objective"]

TRL_VERSION = "1.16.0"
LOSSES = ("dense", "topk_opd", "renorm_topk_kl", "tail_topk_kl")
_OBJECTIVES = {"dense": "dense", "topk_opd": "reward_weighted", "renorm_topk_kl": "renorm_kl",
               "tail_topk_kl": "tail_kl"}  # their opdcore.objectives names
LM_HEAD_MODES = ("auto", "fused", "logits")
DIAGNOSTICS = ("logging_steps", "every_step", "off")

if trl.__version__ != TRL_VERSION:  # the hooks override TRL internals (_compute_loss, compute_loss's contract)
    warnings.warn(f"opdcore.integrations.trl was written against trl=={TRL_VERSION}; trl {trl.__version__} is "
                  "installed: check the loss against TRL's own (tests/test_integration_trl.py)", stacklevel=2)


@dataclass
class OPDCoreLoss:
    """Which opdcore objective replaces the TRL trainer's loss (see the module docstring).

    loss: one of LOSSES. topk: the set size k of the sparse losses and of the diagnostics. strategy: the token set
    of the sparse losses (opdcore.ops.STRATEGIES: student, teacher, intersection, union, symmetric_difference, or
    the reference fork's aliases). weight_mode: topk_opd's weights (default student_p; student_p_raw for
    symmetric_difference, as the reference). log_ratio_clip: clip log p - log q to [-c, c] in topk_opd /
    tail_topk_kl (0: off). lm_head: "auto" | "fused" | "logits". diagnostics: "logging_steps" (default: only on
    optimizer steps that TRL logs), "every_step" or "off". max_block_elements: the fused kernels' [rows, V] block
    budget (logits elements per block)."""

    loss: str = "dense"
    topk: int = 16
    strategy: str = "student"
    weight_mode: Optional[str] = None
    log_ratio_clip: float = 0.0
    lm_head: str = "auto"
    diagnostics: str = "logging_steps"
    max_block_elements: int = DEFAULT_BLOCK_ELEMENTS

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"OPDCoreLoss.loss must be one of {LOSSES}, got {self.loss!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"OPDCoreLoss.topk must be an int >= 1, got {self.topk!r}")
        try:
            self.strategy = canonical_strategy(self.strategy)
        except ValueError as e:
            raise ValueError(f"OPDCoreLoss.strategy: {e}") from None
        if self.weight_mode is not None:
            if self.loss != "topk_opd":
                raise ValueError(f"OPDCoreLoss.weight_mode applies only to loss='topk_opd', got loss={self.loss!r}")
            if self.weight_mode not in WEIGHT_MODES:
                raise ValueError(f"OPDCoreLoss.weight_mode must be one of {WEIGHT_MODES}, got {self.weight_mode!r}")
        if not (isinstance(self.log_ratio_clip, (int, float)) and self.log_ratio_clip >= 0):
            raise ValueError(f"OPDCoreLoss.log_ratio_clip must be >= 0 (0: off), got {self.log_ratio_clip!r}")
        if self.log_ratio_clip > 0 and self.loss != "topk_opd":
            raise ValueError(f"OPDCoreLoss.log_ratio_clip applies to loss='topk_opd', got loss={self.loss!r}")
        if self.loss == "dense" and self.strategy != "student":
            raise ValueError("OPDCoreLoss.strategy applies to the sparse losses, not loss='dense'")
        if self.lm_head not in LM_HEAD_MODES:
            raise ValueError(f"OPDCoreLoss.lm_head must be one of {LM_HEAD_MODES}, got {self.lm_head!r}")
        if self.diagnostics not in DIAGNOSTICS:
            raise ValueError(f"OPDCoreLoss.diagnostics must be one of {DIAGNOSTICS}, got {self.diagnostics!r}")
        if isinstance(self.max_block_elements, bool) or not isinstance(self.max_block_elements, int) \
                or self.max_block_elements < 1:
            raise ValueError(f"OPDCoreLoss.max_block_elements must be an int >= 1, got {self.max_block_elements!r}")

    def spec(self, beta: float, temperature: float) -> ObjectiveSpec:
        """The opdcore.objectives spec of this loss, with TRL's beta (dense loss) and temperature."""
        divergence, b = trl_divergence(beta) if self.loss == "dense" else ("reverse_kl", 0.5)
        return ObjectiveSpec(loss=_OBJECTIVES[self.loss], topk=self.topk, strategy=self.strategy,
                             weight_mode=self.weight_mode or "auto", log_ratio_clip=float(self.log_ratio_clip),
                             divergence=divergence, beta=b, temperature=temperature, teacher_temperature=temperature)


def trl_divergence(beta: float, name: str = "beta"):
    """(opdcore divergence, opdcore beta) for TRL's beta: 0 forward KL(q || p), 1 reverse KL(p || q), else the
    generalised JSD beta KL(q || m) + (1 - beta) KL(p || m), m = (1 - beta) p + beta q (the same convention)."""
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (0: forward KL, 1: reverse KL, else JSD), got {beta}")
    if beta == 0.0:
        return "forward_kl", 0.5
    if beta == 1.0:
        return "reverse_kl", 0.5
    return "jsd", beta


# ---- one model's side of the loss: (hidden states, head weight) or logits, on the N valid response tokens ----

def _rows(head: LMHead) -> torch.Tensor:
    """The [N, ...] tensor a head holds per response token (hidden states or logits)."""
    return head.hidden if isinstance(head, FusedHead) else head.logits()


def _config_scale_softcap(model):
    """(logit scale, soft-cap or None) of a model's head, read the way TRL's DistillationTrainer reads them."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        ls = config.logits_scaling
        scale = ls if getattr(config, "model_type", "") == "hyperclovax" else 1 / ls
    return (1.0 if scale is None else float(scale)), getattr(config, "final_logit_softcapping", None)


def plain_head(model):
    """(head module, logit scale, None) when the model's LM head is plain linear (fused path possible), else
    (head or None, scale, the reason it is not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    scale, softcap = _config_scale_softcap(base)
    weight = getattr(head, "weight", None)
    if head is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return head, scale, "the model has no linear output embedding (get_output_embeddings())"
    if getattr(head, "bias", None) is not None:
        return head, scale, "its LM head has a bias"
    if softcap is not None:
        return head, scale, f"its logits are soft-capped (final_logit_softcapping={softcap})"
    return head, scale, None


def _fused_side(hidden: torch.Tensor, weight: torch.Tensor, scale: float, max_block_elements: int) -> FusedHead:
    """The fused side from the valid rows' hidden states [N, H] and the head weight, in one dtype: under mixed
    precision (bfloat16 autocast, float32 master weights) the head is cast to the hidden states' dtype, the
    precision TRL's own chunked loss projects in (opdcore accumulates in float32 either way; the cast is
    differentiable); otherwise the hidden states take the weight's dtype."""
    if hasattr(weight, "full_tensor"):  # an FSDP2-sharded head (DTensor): gather it once, as TRL does
        weight = weight.full_tensor()
    if hidden.dtype != weight.dtype:
        half = (torch.float16, torch.bfloat16)
        if hidden.dtype in half and torch.is_autocast_enabled(hidden.device.type):
            weight = weight.to(hidden.dtype)
        else:
            hidden = hidden.to(weight.dtype)
    return FusedHead(hidden * scale if scale != 1.0 else hidden, weight, max_block_elements=max_block_elements)


# ---- the objective --------------------------------------------------------------------------------------------

def _diagnostic_sums(s, t) -> Dict[str, torch.Tensor]:
    """Local sums over the batch's response tokens (callers add ranks, then divide by "tokens")."""
    lq_s = t.target_logprobs
    ov = metrics.overlap_stats(s.ids, s.logprobs, t.ids, lq_s)
    lbar, _ = metrics.set_mass_drift(s.logprobs, lq_s)
    drift_sq, kl_sq = metrics.drift_gradient_norms(s.logprobs, lq_s)
    d = {
        "tokens": torch.tensor(float(s.ids.shape[0]), dtype=torch.float64, device=s.ids.device),
        "topk_overlap": ov.ratio.double().sum(),
        "overlap_mass_student": ov.mass_student.double().sum(),
        "overlap_mass_teacher": ov.mass_teacher.double().sum(),
        "entropy_gap": metrics.entropy_gap(t.entropy, s.entropy).double().sum(),
        "student_entropy": s.entropy.double().sum(),
        "teacher_entropy": t.entropy.double().sum(),
        "set_mass": s.logprobs.double().logsumexp(-1).exp().sum(),
        "lbar": lbar.double().sum(),
        "drift_sq": drift_sq.sum(),
        "kl_sq": kl_sq.sum(),
    }
    return d


def _zero_diagnostics(device) -> Dict[str, torch.Tensor]:
    names = ("tokens", "topk_overlap", "overlap_mass_student", "overlap_mass_teacher", "entropy_gap",
             "student_entropy", "teacher_entropy", "set_mass", "lbar", "drift_sq", "kl_sq")
    return {n: torch.zeros((), dtype=torch.float64, device=device) for n in names}


def opdcore_objective(cfg: OPDCoreLoss, student: LMHead, teacher: LMHead, token_weights: torch.Tensor, *,
                      beta: float, temperature: float, diagnose: bool = False):
    """(loss = sum_t token_weights[t] * loss_t, diagnostic sums or None) of cfg's objective on the N response
    tokens, through opdcore.objectives; `beta` in TRL's convention (dense loss only). The student's head carries
    the gradient."""
    n = _rows(student).shape[0]
    if n != _rows(teacher).shape[0]:
        raise ValueError(f"student and teacher cover {n} and {_rows(teacher).shape[0]} response tokens")
    if n == 0:  # TRL returns a zero with a gradient path for a batch without completion tokens
        zero = _rows(student).sum() * 0.0 + (student.weight.sum() * 0.0 if isinstance(student, FusedHead) else 0.0)
        return zero, (_zero_diagnostics(zero.device) if diagnose else None)
    vocab = student.weight.shape[0] if isinstance(student, FusedHead) else _rows(student).shape[1]
    if cfg.topk > vocab and (diagnose or cfg.loss != "dense"):
        raise ValueError(f"OPDCoreLoss.topk={cfg.topk} exceeds the vocabulary ({vocab})")
    spec = cfg.spec(beta, temperature)
    with torch.autocast(token_weights.device.type, enabled=False):  # opdcore accumulates in float32 itself
        s = t = None
        if diagnose or spec.loss != "dense":  # the set comes from the current (= rollout) student, no grad
            with torch.no_grad():
                s = student.score(spec.topk, temperature, None)
                t = teacher.score(spec.topk, temperature, s.ids)
        if spec.loss == "dense":
            empty = token_weights.new_zeros((n, 0))
            terms = Terms(empty.long(), empty, empty.bool(), token_weights, teacher=teacher)
        else:
            ts = build_token_set(s.ids, t.ids, spec.strategy, teacher_logprobs_on_student=t.target_logprobs,
                                 teacher_topk_logprobs=t.logprobs)
            terms = Terms(ts.ids, ts.teacher_logprobs, ts.valid, token_weights)
        total = make_objective(spec)(student, terms).loss
    return total, (_diagnostic_sums(s, t) if diagnose else None)


def _token_weights(rows: int, denominator, device, dtype) -> torch.Tensor:
    """Every response token's weight in TRL's reduction: 1 / denominator (a count, tensor or number)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if isinstance(denominator, torch.Tensor):
        return torch.ones(rows, dtype=acc, device=device) / denominator.to(device=device, dtype=acc)
    return torch.full((rows,), 1.0 / float(denominator), dtype=acc, device=device)


# ---- what both trainers share ---------------------------------------------------------------------------------

class _OPDCoreMixin:
    opdcore_loss: OPDCoreLoss

    def _opdcore_init(self, opdcore_loss):
        if opdcore_loss is None:
            opdcore_loss = OPDCoreLoss()
        if not isinstance(opdcore_loss, OPDCoreLoss):
            raise TypeError(f"opdcore_loss must be an opdcore.integrations.trl.OPDCoreLoss, got "
                            f"{type(opdcore_loss).__name__}")
        return opdcore_loss

    def _opdcore_check_beta(self):
        trl_divergence(self.beta, "args.beta")

    def _opdcore_head(self, unwrapped, role: str):
        """(head, scale, use_fused) for a model under cfg.lm_head: raises for lm_head='fused' on a head that is not
        plain, warns once and falls back to logits for 'auto'."""
        head, scale, reason = plain_head(unwrapped)
        mode = self.opdcore_loss.lm_head
        if mode == "logits":
            return head, scale, False
        if reason is None and id(unwrapped) not in self._opdcore_logits_only:
            return head, scale, True
        reason = reason or self._opdcore_logits_only.get(id(unwrapped))
        if mode == "fused":
            raise ValueError(f"OPDCoreLoss.lm_head='fused' needs a plain linear LM head (no bias, no soft-capping) "
                             f"whose input is the last hidden state, but the {role}: {reason}. Use lm_head='auto' "
                             "(full logits for this model) or 'logits'.")
        if (role, reason) not in self._opdcore_warned:
            self._opdcore_warned.add((role, reason))
            warnings.warn(f"opdcore: the {role}'s LM head is not plain ({reason}); scoring it from full logits",
                          stacklevel=3)
        return head, scale, False

    def _opdcore_diagnose_now(self) -> bool:
        mode = self.opdcore_loss.diagnostics
        if mode == "off":
            return False
        if mode == "every_step" or not self.model.training:
            return True
        strategy = str(getattr(self.args.logging_strategy, "value", self.args.logging_strategy))
        if strategy == "no":
            return False
        if strategy != "steps":  # epoch logging: which step logs is not known here
            return True
        every = getattr(self.state, "logging_steps", None) or self.args.logging_steps
        every = max(1, int(math.ceil(every * self.state.max_steps)) if every < 1 else int(every))
        step = self.state.global_step  # optimizer steps done; the current one is step + 1
        return (step + 1) % every == 0 or (self.args.logging_first_step and step == 0)

    def _opdcore_record(self, sums: Optional[Dict[str, torch.Tensor]]) -> None:
        """Add ranks' diagnostic sums and append the means to TRL's metrics dict (logged at its logging steps)."""
        if sums is None:
            return
        names = list(sums)
        local = torch.stack([sums[n].detach().double() for n in names]).to(self.accelerator.device)
        total = dict(zip(names, self.accelerator.gather(local).reshape(-1, len(names)).sum(0).tolist()))
        n = total.pop("tokens")
        if n <= 0:
            return
        mode = "train" if self.model.training else "eval"
        d, k = total.pop("drift_sq"), total.pop("kl_sq")
        for name, value in total.items():
            self._metrics[mode][f"opdcore/{name}"].append(value / n)
        self._metrics[mode]["opdcore/drift_share"].append(d ** 0.5 / (d ** 0.5 + k ** 0.5) if d + k > 0 else 0.0)


def _accepts(model, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


# ---- TRL's DistillationTrainer --------------------------------------------------------------------------------

class OPDCoreDistillationTrainer(_OPDCoreMixin, DistillationTrainer):
    """trl.DistillationTrainer with opdcore's loss: `opdcore_loss=OPDCoreLoss(...)`; every other argument is
    DistillationTrainer's. Hooks `_compute_loss` (the loss inside TRL's forward redirection, from the backbones'
    last hidden states, as TRL's own chunked loss) and keeps TRL's generation, normaliser and `entropy` metric."""

    def __init__(self, *args, opdcore_loss: Optional[OPDCoreLoss] = None, **kwargs):
        self.opdcore_loss = self._opdcore_init(opdcore_loss)
        self._opdcore_logits_only: Dict[int, str] = {}
        self._opdcore_warned = set()
        self._opdcore_pending = None
        super().__init__(*args, **kwargs)
        self._opdcore_check_beta()
        if self.teacher_model is None:
            raise ValueError("OPDCoreDistillationTrainer needs a local teacher_model (its hidden states and LM head)")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._opdcore_pending = None
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        # outside the DDP/FSDP-wrapped forward: the gather in _opdcore_record is a collective (as TRL's entropy)
        self._opdcore_record(self._opdcore_pending)
        self._opdcore_pending = None
        return out

    def _side(self, unwrapped, hidden, mask, role):
        head, scale, fused = self._opdcore_head(unwrapped, role)
        weight = head.weight
        hidden = hidden.to(weight.device)
        rows = hidden[mask]
        if fused:
            return _fused_side(rows, weight, scale, self.opdcore_loss.max_block_elements)
        _, softcap = _config_scale_softcap(unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model")
                                           else unwrapped)
        z = head(rows.to(weight.dtype)).float() * scale  # TRL's order: head (with bias), scale, then soft-cap
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return LogitsHead(z)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        completion_mask = inputs["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal_keys = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                           "token_type_ids", "mm_token_type_ids", "image_position_ids")
        mm = {k: inputs[k] for k in multimodal_keys if k in inputs}

        s_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep, **mm)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            t_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher, self._get_last_hidden_state,
                                                 unwrapped_teacher, input_ids, attention_mask, logits_to_keep, **mm)
        mask = (loss_mask != 0).to(s_hidden.device)
        student = self._side(unwrapped_student, s_hidden, mask, "student")
        with torch.no_grad():
            teacher = self._side(unwrapped_teacher, t_hidden.to(s_hidden.device), mask, "teacher")
        n_valid = mask.sum()
        denominator = n_valid.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        ref = _rows(student)
        weights = _token_weights(ref.shape[0], denominator, ref.device, ref.dtype)
        diagnose = self._opdcore_diagnose_now()
        loss, sums = opdcore_objective(self.opdcore_loss, student, teacher, weights, beta=self.beta,
                                       temperature=self.temperature, diagnose=diagnose)
        self._opdcore_pending = sums
        # TRL logs the mean student entropy from this sum; NaN (left out of TRL's averages) when not computed
        entropy_sum = sums["student_entropy"].float() if sums is not None else torch.tensor(
            math.nan, device=n_valid.device)
        return loss, entropy_sum.detach(), n_valid


# ---- TRL's GKDTrainer (experimental) --------------------------------------------------------------------------

class OPDCoreGKDTrainer(_OPDCoreMixin, GKDTrainer):
    """trl.experimental.gkd.GKDTrainer with opdcore's loss: `opdcore_loss=OPDCoreLoss(...)`; every other argument is
    GKDTrainer's. For on-policy distillation set GKDConfig(lmbda=1.0). Hooks `compute_loss`: both models run
    through their (DDP-)wrappers with output_hidden_states; the loss is at temperature 1 like GKD's
    generalized_jsd_loss, over shifted labels != -100, divided by num_items_in_batch when the trainer passes it
    (as GKD does), else by the batch's valid-token count."""

    def __init__(self, *args, opdcore_loss: Optional[OPDCoreLoss] = None, **kwargs):
        self.opdcore_loss = self._opdcore_init(opdcore_loss)
        self._opdcore_logits_only: Dict[int, str] = {}
        self._opdcore_warned = set()
        super().__init__(*args, **kwargs)
        self._opdcore_check_beta()

    def _side(self, wrapped, unwrapped, input_ids, attention_mask, mask, role) -> LMHead:
        head, scale, fused = self._opdcore_head(unwrapped, role)
        if fused:
            kw = {"output_hidden_states": True, "use_cache": False}
            if _accepts(unwrapped, "logits_to_keep"):
                kw["logits_to_keep"] = 1  # only the last position's logits (for the check below)
            out = wrapped(input_ids=input_ids, attention_mask=attention_mask, **kw)
            states = getattr(out, "hidden_states", None)
            reason = None
            if not states:
                reason = "it returns no hidden_states"
            else:
                last = states[-1]
                with torch.no_grad():  # the last hidden state must be the head's input: check the last position
                    ref = F.linear(last[:, -1].to(head.weight.dtype), head.weight).float() * scale
                    got = out.logits[:, -1].float()
                    # relative to the logits' norm: bfloat16 autocast (TRL's CPU/GPU default) rounds both sides
                    if ref.shape != got.shape or float((ref - got).norm()) > 2e-2 * max(float(got.norm()), 1e-6):
                        reason = "its last hidden state times the LM head does not reproduce its logits"
            if reason is None:
                return _fused_side(last[:, :-1][mask], head.weight, scale, self.opdcore_loss.max_block_elements)
            self._opdcore_logits_only[id(unwrapped)] = reason
            head, scale, fused = self._opdcore_head(unwrapped, role)  # raises for lm_head='fused'
        out = wrapped(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return LogitsHead(out.logits[:, :-1][mask])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        mask = inputs["labels"][:, 1:] != -100  # GKD's masking: completion tokens of the shifted labels
        student = self._side(model, self.accelerator.unwrap_model(model), input_ids, attention_mask, mask,
                             "student")
        self.teacher_model.eval()
        with torch.no_grad():
            teacher = self._side(self.teacher_model, self.accelerator.unwrap_model(self.teacher_model), input_ids,
                                 attention_mask, mask.to(input_ids.device), "teacher")
        if num_items_in_batch is None:
            denominator = mask.sum().clamp(min=1)
        else:  # GKD's normaliser; transformers counted it on the collator's labels, before on-policy generation
            denominator = num_items_in_batch
            if float(denominator) <= 0 and bool(mask.any()):
                raise ValueError(
                    "num_items_in_batch is 0 but the batch has completion tokens: transformers counts it on the "
                    "collator's labels before GKD's on-policy generation replaces them (TRL would divide by 0). "
                    "Give the collator's batches no 'labels' (lmbda=1 generates them) or labels that mark the "
                    "reference completions.")
        ref = _rows(student)
        weights = _token_weights(ref.shape[0], denominator, ref.device, ref.dtype)
        loss, sums = opdcore_objective(self.opdcore_loss, student, teacher, weights, beta=self.beta,
                                       temperature=1.0, diagnose=self._opdcore_diagnose_now())
        self._opdcore_record(sums)
        if return_outputs:  # evaluation asks for logits: one extra no-grad forward, as TRL's SFTTrainer does
            with torch.no_grad():
                outputs = model(input_ids=input_ids, attention_mask=attention_mask)
            return loss, outputs
        return loss
