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
