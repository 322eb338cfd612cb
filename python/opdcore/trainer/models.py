"""Student and teacher models: loading, vocabulary alignment, the fused-head wrapper, FSDP2 sharding and tensor
parallelism (vocabulary-parallel losses on the LM head's shards)."""
from __future__ import annotations

import contextlib
from typing import Dict

import torch
import torch.nn as nn

import opdcore
from opdcore import parallel as P
from opdcore.metrics import ppo_clip_counts
from opdcore.ops import (dense_divergence_linear_weighted, opd_topk_loss_linear_weighted, ppo_topk_loss,
                         ppo_topk_loss_linear_weighted, renorm_topk_kl_linear, tail_topk_kl_linear_weighted)
from opdcore.parallel.tensor_parallel import local_vocab

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # generation pads finished rows; the loss never reads padding
    return tok


def load_causal_lm(path: str, dtype: str, device: torch.device, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    return model.to(device)


def vocab_limit(student, teacher, student_tok, teacher_tok) -> int:
    """The shared real vocabulary size; raises if the two models do not share a tokenizer.

    LM heads are often padded past the tokenizer (e.g. 151936 rows for 151665 tokens); padded rows are never
    real tokens, so both models are scored on the first len(tokenizer) rows and differing padding is fine.
    """
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
        diff = sorted(set(s.items()) ^ set(t.items()), key=lambda kv: kv[1])[:5]
        raise ValueError("student and teacher tokenizers differ (OPD needs one shared vocabulary): "
                         f"{len(s)} vs {len(t)} tokens; first differences {diff}")
    n = len(student_tok)
    for name, m in (("student", student), ("teacher", teacher)):
        rows = m.get_output_embeddings().weight.shape[0]
        if rows < n:
            raise ValueError(f"the {name} LM head has {rows} rows but the tokenizer has {n} tokens")
    return n


def _fused_head_supported(model) -> bool:
    """The fused path computes hidden @ W.T; models that post-process logits need the plain path."""
    cfg = model.config
    return not (getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
                or getattr(model.get_output_embeddings(), "bias", None) is not None)


class OPDModel(nn.Module):
    """A causal LM whose forward returns per-response-token results computed from its hidden states:
    mode "score" the top-k / log-prob extraction, mode "loss" / "renorm_kl" / "tail_kl" / "dense" the loss
    summed with token_weights (mode "loss" given ppo terms: the PPO surrogate's, with its clip counts), mode
    "head" what the dense divergences need of the teacher: (hidden [R, H], LM head [V, H]) with the fused head,
    else ([R, V] logits, None).

    Everything that touches the LM head happens inside forward(), so with FSDP2 the root unit's parameters
    (embeddings, final norm, LM head) are gathered for exactly that call. `pred_index` holds flat [B*T]
    positions whose hidden state predicts a response token (the position before it).
    """

    def __init__(self, hf_model: nn.Module, vocab: int, fused: bool = True, tp_group=None):
        super().__init__()
        self.hf = hf_model
        self.vocab = vocab
        self.fused = fused and _fused_head_supported(hf_model)
        self.tp_group = tp_group  # set: hf_model is tensor-parallel (opdcore.parallel.tensor_parallel.parallelize)
        if tp_group is not None and not _fused_head_supported(hf_model):
            raise ValueError(f"tensor parallelism needs a plain LM head (no logit soft-capping, scale or bias); "
                             f"{type(hf_model).__name__} post-processes its logits")

    def _hidden(self, input_ids, attention_mask, pred_index):
        base = self.hf.get_decoder() if hasattr(self.hf, "get_decoder") else self.hf.base_model
        with _eval_mode_without_grad(base):
            h = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return h.reshape(-1, h.shape[-1])[pred_index]

    def forward(self, input_ids, attention_mask, pred_index, mode: str, **kw):
        if mode == "generate":  # transformers generate inside the root forward (see GenerateThroughRoot)
            if kw.pop("gather_once", False) and _is_fsdp(self):
                with _gathered(self):
                    return self.hf.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
            if self.tp_group is None:
                return self.hf.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
            # the column-parallel head returns this rank's vocabulary shard; decoding needs every token's logit
            hook = self.hf.get_output_embeddings().register_forward_hook(_gather_vocab_shards)
            try:
                return self.hf.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
            finally:
                hook.remove()
        if self.tp_group is not None:
            return self._forward_tp(self._hidden(input_ids, attention_mask, pred_index), mode, **kw)
        if not self.fused:
            with _eval_mode_without_grad(self.hf):
                logits = self.hf(input_ids=input_ids, attention_mask=attention_mask).logits
            logits = logits.reshape(-1, logits.shape[-1])[pred_index][:, :self.vocab]
            return self._from_logits(logits, mode, **kw)
        h = self._hidden(input_ids, attention_mask, pred_index)
        w = self.hf.get_output_embeddings().weight
        w = w if w.shape[0] == self.vocab else w[:self.vocab]  # a slice's backward allocates a [V, H] zeros
        device = h.device.type
        if torch.is_autocast_enabled(device):  # the LM head in the autocast dtype, through opdcore's kernels as is
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return self._fused(h.to(dtype), w.to(dtype), mode, **kw)
        return self._fused(h, w, mode, **kw)

    def _fused(self, h, w, mode, **kw):
        if mode == "head":
            # FSDP frees the gathered LM head when forward returns: a sharded model hands over its logits instead
            return (h @ w.T, None) if _is_fsdp(self) else (h, w)
        if mode == "dense" and kw["teacher_head"][1] is None:  # the teacher gave logits: form the student's too
            return self._from_logits(h @ w.T, mode, **kw)
        if mode == "score":
            return opdcore.linear_topk(h, w, kw["k"], temperature=kw["temperature"], ids=kw["ids"])
        head = SetLossHead(hidden=h, weight=w)
        if mode == "loss":  # the gradient is formed in the forward: three head matmuls instead of four
            return _reward_losses(head, kw)
        if mode == "renorm_kl":
            loss = (renorm_topk_kl_linear(h, w, kw["ids"], kw["teacher_logprobs"], kw["valid"],
                                          temperature=kw["temperature"]) * kw["token_weights"]).sum()
        elif mode == "tail_kl":  # needs the full normaliser: row blocks, gradient formed in the forward
            loss = tail_topk_kl_linear_weighted(h, w, kw["ids"], kw["teacher_logprobs"], kw["token_weights"],
                                                kw["valid"], temperature=kw["temperature"])[0]
        elif mode == "dense":  # one [rows, V] block of each model's logits at a time, gradient in the forward
            t_h, t_w = (x.to(h.dtype) for x in kw["teacher_head"])  # model.teacher_dtype may differ
            loss = dense_divergence_linear_weighted(h, w, t_h, t_w, kw["token_weights"], kw["divergence"],
                                                    beta=kw["beta"], temperature=kw["temperature"],
                                                    teacher_logit_scale=kw["teacher_scale"])[0]
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return loss + _outcome_loss(head, kw)

    def _forward_tp(self, h, mode, **kw):
        """Tensor-parallel: this rank holds the LM head rows of one vocabulary shard. Extraction and the top-k loss
        stream the shard from hidden states; renorm_kl and the dense divergences take the shard's logits
        [R, V/tp] (the column-parallel head all-reduces the hidden states' gradient across the group); the
        vocabulary-parallel ops combine the shards."""
        head, g = self.hf.get_output_embeddings(), self.tp_group
        _, cols = local_vocab(head.weight, self.vocab)
        w = head.weight.to_local()
        w = w if cols == w.shape[0] else w[:cols]  # a slice's backward would allocate a second weight gradient
        if mode == "score":
            with torch.no_grad():
                return P.vocab_parallel_linear_topk(h, w, kw["k"], ids=kw["ids"], temperature=kw["temperature"],
                                                    group=g)
        if mode == "loss":  # fused with the head shard: gradients formed in the forward, d hidden summed inside
            return _reward_losses(SetLossHead(hidden=h, weight=w, group=g), kw)
        if mode == "tail_kl":
            loss = P.vocab_parallel_tail_topk_kl_linear_weighted(h, w, kw["ids"], kw["teacher_logprobs"],
                                                                 kw["token_weights"], kw["valid"],
                                                                 temperature=kw["temperature"], group=g)[0]
            return loss + _outcome_loss(SetLossHead(hidden=h, weight=w, group=g), kw)
        logits = head(h)[:, :cols]
        if mode == "head":
            return logits, None
        if mode == "renorm_kl":
            per_token = P.vocab_parallel_renorm_topk_kl(logits, kw["ids"], kw["teacher_logprobs"], kw["valid"],
                                                        temperature=kw["temperature"], group=g)
        elif mode == "dense":
            t_logits = kw["teacher_head"][0] * kw["teacher_scale"]
            if t_logits.shape != logits.shape:
                raise ValueError(f"loss.dense with tensor parallelism needs student and teacher LM heads of the "
                                 f"same size (the same vocabulary shards): shard {tuple(logits.shape)} vs "
                                 f"{tuple(t_logits.shape)}")
            per_token = P.vocab_parallel_dense_divergence(logits, t_logits.to(logits.dtype), kw["divergence"],
                                                          beta=kw["beta"], temperature=kw["temperature"], group=g)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return (per_token * kw["token_weights"]).sum() + _outcome_loss(SetLossHead(logits=logits, group=g), kw)

    def _from_logits(self, logits, mode, **kw):
        if mode == "head":
            return logits, None
        if mode == "score":
            with torch.no_grad():
                top = opdcore.topk_logprobs(logits, max(kw["k"], 1), kw["temperature"])
                tgt, _ = opdcore.logprobs_at(logits, kw["ids"], kw["temperature"])
            k = kw["k"]
            return opdcore.ops.StreamResult(top.ids[:, :k], top.logprobs[:, :k], top.lse, top.entropy, tgt)
        head = SetLossHead(logits=logits)
        if mode == "loss":
            return _reward_losses(head, kw)
        if mode == "renorm_kl":
            per_token = opdcore.renorm_topk_kl(logits, kw["ids"], kw["teacher_logprobs"], kw["valid"],
                                               temperature=kw["temperature"])
        elif mode == "tail_kl":
            per_token = opdcore.tail_topk_kl(logits, kw["ids"], kw["teacher_logprobs"], kw["valid"],
                                             temperature=kw["temperature"]).loss
        elif mode == "dense":
            t_x, t_w = kw["teacher_head"]
            t_logits = (t_x if t_w is None else t_x @ t_w.T) * kw["teacher_scale"]
            per_token = opdcore.dense_divergence(logits, t_logits.to(logits.dtype), kw["divergence"],
                                                 beta=kw["beta"], temperature=kw["temperature"])
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return (per_token * kw["token_weights"]).sum() + _outcome_loss(head, kw)


class SetLossHead:
    """Where a reward-weighted set loss reads the student's logits: hidden states and an LM head (row blocks,
    gradients formed in the forward, never [R, V]) or logits; on one device, or this rank's vocabulary shard of
    them (group set). weighted() is the token-weighted sum of the OPD loss or, given ppo = (old log-probs,
    advantages, PPOClip), of the PPO surrogate, and the kernel's per-token result."""

    def __init__(self, hidden=None, weight=None, logits=None, group=None):
        self.hidden, self.weight, self.logits, self.group = hidden, weight, logits, group

    def weighted(self, ids, token_weights, valid=None, *, temperature, teacher_logprobs=None, weight_mode="none",
                 log_ratio_clip=0.0, ppo=None, check_logprobs=True):
        tp = {} if self.group is None else {"group": self.group}
        if ppo is not None:
            old, adv, clip = ppo
            args = (ids, old, adv)
            opts = dict(temperature=temperature, clip_low=clip.low, clip_high=clip.high, dual_clip=clip.dual, **tp)
            fused, plain = ((P.vocab_parallel_ppo_topk_loss_linear_weighted, P.vocab_parallel_ppo_topk_loss) if tp
                            else (ppo_topk_loss_linear_weighted, ppo_topk_loss))
        else:
            args = (ids, teacher_logprobs)
            opts = dict(weight_mode=weight_mode, temperature=temperature, log_ratio_clip=log_ratio_clip,
                        check_logprobs=check_logprobs, **tp)
            fused, plain = ((P.vocab_parallel_opd_topk_loss_linear_weighted, P.vocab_parallel_opd_topk_loss) if tp
                            else (opd_topk_loss_linear_weighted, opdcore.opd_topk_loss))
        if self.logits is None:
            return fused(self.hidden, self.weight, *args, token_weights, valid, **opts)
        out = plain(self.logits, *args, valid, **opts)
        return (out.loss * token_weights).sum(), out


def _reward_losses(head: SetLossHead, kw):
    """mode "loss": the reward-weighted set loss plus the outcome term; with kw["ppo"] (several updates per
    batch) both as PPO surrogates, returned with the main loss's clip counts (opdcore.metrics)."""
    ppo = kw.get("ppo")
    total, out = head.weighted(kw["ids"], kw["token_weights"], kw["valid"], temperature=kw["temperature"],
                               teacher_logprobs=kw["teacher_logprobs"], weight_mode=kw["weight_mode"],
                               log_ratio_clip=kw["log_ratio_clip"],
                               ppo=None if ppo is None else (ppo.old_logprobs, ppo.advantages, ppo.clip))
    total = total + _outcome_loss(head, kw)
    if ppo is None:
        return total
    return total, ppo_clip_counts(out.student_logprobs, ppo.old_logprobs, ppo.advantages, out.coefficients,
                                  kw["valid"])


def _outcome_loss(head: SetLossHead, kw):
    """The hybrid outcome term (METHOD.md 2.6), -A log p(y_t) weighted by loss.outcome_weight, through the set-loss
    kernels: with one update per batch as the OPD loss with q := p_rollout * e^A and weight 1 (its reward
    -(log p - log q) is A while p is the rollout-time p); with several, as a PPO surrogate on the sampled token."""
    if kw.get("outcome") is None:
        return 0.0
    sampled, lp_rollout, adv = kw["outcome"]
    ppo = kw.get("ppo")
    weights = kw["token_weights"] * kw["outcome_weight"]
    if ppo is not None:
        return head.weighted(sampled, weights, temperature=kw["temperature"],
                             ppo=(lp_rollout[:, None], adv[:, None], ppo.clip))[0]
    return head.weighted(sampled, weights, temperature=kw["temperature"],
                         teacher_logprobs=(lp_rollout + adv)[:, None], check_logprobs=False)[0]


def _gather_vocab_shards(head, _inputs, logits_shard):
    """Forward hook of a column-parallel LM head: the full [..., V] logits from every rank's [..., V_r] shard."""
    from torch.distributed.tensor import DTensor, Shard

    shape = (*logits_shard.shape[:-1], head.weight.shape[0])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(logits_shard, head.weight.device_mesh, [Shard(logits_shard.dim() - 1)],
                              run_check=False, shape=shape, stride=stride).full_tensor()


@contextlib.contextmanager
def _eval_mode_without_grad(module: nn.Module):
    """A no-grad forward (scoring) of a training model in eval mode: gradient checkpointing would otherwise
    wrap every layer for a backward that never comes (and warn that no input requires grad)."""
    if not (module.training and not torch.is_grad_enabled()):
        yield
        return
    module.eval()
    try:
        yield
    finally:
        module.train()


@contextlib.contextmanager
def _gathered(model: nn.Module):
    """FSDP2 units keep their gathered parameters from their first forward until the block ends: one all-gather
    per unit for a whole generate call instead of one per decoding step (peak memory: the full model)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(True, recurse=False)


class GenerateThroughRoot:
    """The model interface HFEngine uses, generating through OPDModel.forward(mode="generate"): a sharded model
    (FSDP2 unit per layer plus the OPDModel root holding embeddings, final norm and LM head) must be entered
    through the root's forward, which gathers the root's parameters and sets up the layers' hooks. gather_once:
    an FSDP model keeps its parameters gathered through all decoding steps of a call (see _gathered)."""

    def __init__(self, model: OPDModel, gather_once: bool = False):
        self.model = model
        self.gather_once = gather_once

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def parameters(self):
        return self.model.parameters()

    def get_output_embeddings(self):
        return self.model.hf.get_output_embeddings()

    @property
    def generation_config(self):
        return self.model.hf.generation_config

    def generate(self, input_ids, attention_mask, **kw):
        return self.model(input_ids, attention_mask, None, "generate", gather_once=self.gather_once, **kw)


def decoder_layers(hf_model: nn.Module):
    """The transformer blocks (each becomes one FSDP2 unit), found by the model's _no_split_modules."""
    names = set(getattr(hf_model, "_no_split_modules", None) or [])
    layers = [m for m in hf_model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(hf_model).__name__} for FSDP sharding")
    return layers


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard(model: OPDModel, mesh=None) -> OPDModel:
    """FSDP2: one unit per decoder layer plus the root (embeddings, final norm, LM head), over `mesh` (the
    data-parallel dimension when tensor parallelism is on; default: all ranks)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model.hf):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state_dict(model: OPDModel, sharded: bool) -> Dict[str, torch.Tensor]:
    """Unsharded Hugging Face-named weights (CPU) on every rank."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload would leave the full weights on rank 0 only; every rank's rollout replica needs them
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        sd = {k: v.detach().cpu() for k, v in sd.items()}
    else:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k[len("hf."):]: v for k, v in sd.items() if k.startswith("hf.")}
