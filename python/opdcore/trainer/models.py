"""Student and teacher models: loading, vocabulary alignment, the fused-head wrapper, FSDP2 sharding and tensor
parallelism (vocabulary-parallel losses on the LM head's shards)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from opdcore.objectives import FusedHead, LMHead, LogitsHead, ShardHead
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


def _decoder(hf_model: nn.Module) -> nn.Module:
    return hf_model.get_decoder() if hasattr(hf_model, "get_decoder") else hf_model.base_model


@torch.no_grad()
def packs_rows(hf_model: nn.Module) -> bool:
    """Whether the model keeps sequences packed into one row apart, given position ids that restart at 0 with
    each and no attention mask (transformers' packed-sequence masks; a model that ignores them would let a row's
    sequences attend to each other). Checked on the model itself: two short sequences packed into one row must
    give the hidden states they give alone, far closer than what the second gives with the first as its
    context."""
    base = _decoder(hf_model)
    try:
        device = next(hf_model.parameters()).device
        vocab = hf_model.get_input_embeddings().weight.shape[0]
    except (StopIteration, AttributeError):
        return False
    ids = torch.randint(0, vocab, (1, 7), generator=torch.Generator().manual_seed(0)).to(device)
    restart = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device)
    try:
        with _eval_mode_without_grad(base):
            def run(x, **kw):
                return base(input_ids=x, use_cache=False, **kw).last_hidden_state[0].float()
            packed = run(ids, position_ids=restart)[4:]
            alone = run(ids[:, 4:])
            context = run(ids)[4:]  # the second sequence after the first, one sequence
    except Exception:  # noqa: BLE001 - a model that cannot take position ids without a mask does not pack rows
        return False
    err, leak = (packed - alone).norm(), (context - alone).norm()
    return bool(err <= 0.1 * leak + 1e-3 * alone.norm())


def _fused_head_supported(model) -> bool:
    """The fused path computes hidden @ W.T; models that post-process logits need the plain path."""
    cfg = model.config
    return not (getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
                or getattr(model.get_output_embeddings(), "bias", None) is not None)


class OPDModel(nn.Module):
    """A causal LM whose forward ends in a caller's function of its LM head on the response tokens:
    forward(input_ids, attention_mask, pred_index, use) returns use(head), head an opdcore.objectives.LMHead over
    the hidden states at pred_index (flat [B*T] positions whose hidden state predicts a response token): FusedHead
    (hidden states + LM head, never [tokens, vocab] logits), LogitsHead (models that post-process their logits,
    or fused=False) or ShardHead (tensor parallelism: this rank's vocabulary shard). forward(..., generate=kwargs)
    runs transformers' generate instead.

    Everything that touches the LM head happens inside forward(), so with FSDP2 the root unit's parameters
    (embeddings, final norm, LM head) are gathered for exactly that call.
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

    def _hidden(self, input_ids, attention_mask, pred_index, position_ids=None):
        base = _decoder(self.hf)
        with _eval_mode_without_grad(base):
            # no KV cache: nothing decodes after this forward (and with a cache transformers ignores packed rows)
            h = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
        return h.reshape(-1, h.shape[-1])[pred_index]

    def forward(self, input_ids, attention_mask, pred_index=None, use: Optional[Callable[[LMHead], Any]] = None,
                generate: Optional[dict] = None, position_ids=None):
        """position_ids: packed rows (trainer.microbatch), with attention_mask None."""
        if generate is not None:  # transformers generate inside the root forward (see GenerateThroughRoot)
            return self._generate(input_ids, attention_mask, **generate)
        if self.tp_group is not None:
            return use(self._shard_head(self._hidden(input_ids, attention_mask, pred_index, position_ids)))
        if not self.fused:
            with _eval_mode_without_grad(self.hf):
                logits = self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).logits
            return use(LogitsHead(logits.reshape(-1, logits.shape[-1])[pred_index][:, :self.vocab]))
        h = self._hidden(input_ids, attention_mask, pred_index, position_ids)
        w = self.head_weight()  # sliced: its backward allocates a [V, H] zeros only where the head is padded
        keeps = not _is_fsdp(self)  # FSDP frees the gathered LM head when forward returns
        device = h.device.type
        if torch.is_autocast_enabled(device):  # the LM head in the autocast dtype, through opdcore's kernels as is
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return use(FusedHead(h.to(dtype), w.to(dtype), weight_outlives_call=keeps))
        return use(FusedHead(h, w, weight_outlives_call=keeps))

    def head_weight(self) -> torch.Tensor:
        """The LM head's rows of the shared vocabulary (a model that is neither FSDP-sharded nor tensor-parallel)."""
        w = self.hf.get_output_embeddings().weight
        return w if w.shape[0] == self.vocab else w[:self.vocab]

    def _generate(self, input_ids, attention_mask, gather_once: bool = False, **kw):
        if gather_once and _is_fsdp(self):
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

    def _shard_head(self, h) -> ShardHead:
        """Tensor-parallel: this rank holds the LM head rows of one vocabulary shard."""
        head = self.hf.get_output_embeddings()
        _, cols = local_vocab(head.weight, self.vocab)
        w = head.weight.to_local()
        w = w if cols == w.shape[0] else w[:cols]  # a slice's backward would allocate a second weight gradient
        return ShardHead(h, w, self.tp_group, lambda: head(h)[:, :cols])


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
    """The model interface HFEngine uses, generating through OPDModel.forward(generate=...): a sharded model
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
        return self.model(input_ids, attention_mask, generate=dict(kw, gather_once=self.gather_once))


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
