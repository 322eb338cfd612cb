"""Fake (meta) kernels: output shapes and dtypes of every op, so they trace under torch.compile."""
import torch

lib = torch.library


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@lib.register_fake("opdcore::topk_logprobs")
def _(logits, k, temperature=1.0):
    n = logits.shape[0]
    a = _acc(logits)
    return (logits.new_empty((n, k), dtype=torch.int64), logits.new_empty((n, k), dtype=a),
            logits.new_empty((n,), dtype=a), logits.new_empty((n,), dtype=a))


@lib.register_fake("opdcore::logprobs_at")
def _(logits, ids, temperature=1.0):
    a = _acc(logits)
    return logits.new_empty(ids.shape, dtype=a), logits.new_empty((logits.shape[0],), dtype=a)


@lib.register_fake("opdcore::linear_topk_tiled")
def _(hidden, weight, k, temperature=1.0, kernel=0):
    n = hidden.shape[0]
    return (hidden.new_empty((n, k), dtype=torch.int64), hidden.new_empty((n, k), dtype=torch.float32),
            hidden.new_empty((n,), dtype=torch.float32), hidden.new_empty((n,), dtype=torch.float32))


@lib.register_fake("opdcore::stream_update")
def _(max, sumexp, ent, heap_vals, heap_ids, target_ids, target_vals, logits, vocab_offset, temperature):
    return None


@lib.register_fake("opdcore::stream_merge")
def _(*args):
    return None


@lib.register_fake("opdcore::stream_finalize")
def _(max, sumexp, ent, heap_vals, heap_ids, target_vals):
    return (heap_ids.new_empty(heap_ids.shape), heap_vals.new_empty(heap_vals.shape), max.new_empty(max.shape),
            max.new_empty(max.shape), target_vals.new_empty(target_vals.shape))


@lib.register_fake("opdcore::opd_rewards")
def _(student_logprobs, teacher_logprobs, valid, weight_mode, clip):
    return student_logprobs.new_empty(student_logprobs.shape), student_logprobs.new_empty(student_logprobs.shape[:1])


@lib.register_fake("opdcore::opd_topk_loss_fwd")
def _(logits, ids, teacher_logprobs, valid, weight_mode, temperature, clip):
    a = _acc(logits)
    n = logits.shape[0]
    return (logits.new_empty((n,), dtype=a), logits.new_empty(ids.shape, dtype=a),
            logits.new_empty(ids.shape, dtype=a), logits.new_empty((n,), dtype=a))


@lib.register_fake("opdcore::opd_topk_loss_bwd")
def _(grad_loss, logits, lse, ids, rewards, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@lib.register_fake("opdcore::opd_topk_loss_bwd_chunk_")
def _(chunk, vocab_offset, grad_loss, lse, ids, rewards, temperature):
    return None


@lib.register_fake("opdcore::renorm_kl_fwd")
def _(set_logits, teacher_logprobs, valid, temperature):
    a = _acc(set_logits)
    return (set_logits.new_empty(set_logits.shape[:1], dtype=a), set_logits.new_empty(set_logits.shape, dtype=a),
            set_logits.new_empty(set_logits.shape, dtype=a))


@lib.register_fake("opdcore::renorm_kl_bwd")
def _(grad_loss, pbar, log_ratio, loss, temperature):
    return torch.empty_like(pbar)


def _check_cu_seqlens_meta(cu_seqlens, ref, ref_name):
    # The metadata checks of the CPU kernel, so traced code fails the same way (values are not visible here).
    if cu_seqlens.dtype != torch.int32:
        raise RuntimeError(f"cu_seqlens must be int32 (the flash-attn convention), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1:
        raise RuntimeError(f"cu_seqlens must be 1-D [B+1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.shape[0] < 2:
        raise RuntimeError(f"cu_seqlens must hold B+1 >= 2 entries, got {cu_seqlens.shape[0]} (an empty batch)")
    if cu_seqlens.device != ref.device:
        raise RuntimeError(f"cu_seqlens is on {cu_seqlens.device} but {ref_name} is on {ref.device}")


@lib.register_fake("opdcore::pad_packed")
def _(packed, cu_seqlens, max_seqlen, pad_value=0.0):
    if packed.dim() < 1:
        raise RuntimeError("packed must be at least 1-D [N, ...], got a 0-d tensor")
    _check_cu_seqlens_meta(cu_seqlens, packed, "packed")
    if max_seqlen < 0:
        raise RuntimeError(f"max_seqlen = {max_seqlen} is shorter than the longest sequence in cu_seqlens")
    return packed.new_empty((cu_seqlens.shape[0] - 1, max_seqlen, *packed.shape[1:]))


@lib.register_fake("opdcore::unpad_packed")
def _(padded, cu_seqlens):
    if padded.dim() < 2:
        raise RuntimeError(f"padded must be at least 2-D [B, T, ...], got shape {tuple(padded.shape)}")
    _check_cu_seqlens_meta(cu_seqlens, padded, "padded")
    if padded.shape[0] != cu_seqlens.shape[0] - 1:
        raise RuntimeError(f"padded has {padded.shape[0]} sequences (dim 0) but cu_seqlens describes "
                           f"{cu_seqlens.shape[0] - 1}")
    n = torch.library.get_ctx().new_dynamic_size()  # N = cu_seqlens[-1], a data-dependent size
    return padded.new_empty((n, *padded.shape[2:]))


@lib.register_fake("opdcore::dense_divergence_fwd")
def _(student_logits, teacher_logits, kind, beta, temperature, lse_s=None, lse_t=None):
    n = student_logits.shape[0]
    a = _acc(student_logits)
    return tuple(student_logits.new_empty((n,), dtype=a) for _ in range(4))


@lib.register_fake("opdcore::dense_divergence_bwd")
def _(grad_loss, student_logits, teacher_logits, lse_s, lse_t, aux, kind, beta, temperature):
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


@lib.register_fake("opdcore::sample_tokens")
def _(scores, uniform, temperature=1.0):
    n = scores.shape[0]
    return scores.new_empty((n,), dtype=torch.int64), scores.new_empty((n,), dtype=_acc(scores))
