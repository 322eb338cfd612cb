"""Plain-PyTorch twins of every opdcore kernel: simple, slow, obviously right.

The oracle for the property tests and for the runtime `verify` mode. Never imported by hot code.
Conventions match the kernels: y = logits.float() * (1 / temperature) (float64 stays float64); top-k order
is value descending with ties to the lower id; every reduction accumulates in float32 (float64 for float64).
"""
from __future__ import annotations

import torch


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.to(acc) * (1.0 / temperature)  # the scalar is rounded to acc, as in the kernels


def log_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(_scaled(logits, temperature), dim=-1)


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """(ids, logprobs, lse, entropy); ties in value go to the lower id (stable descending sort)."""
    y = _scaled(logits, temperature)
    lse = torch.logsumexp(y, dim=-1)
    lp = y - lse[:, None]
    p = lp.exp()
    entropy = -(torch.where(p > 0, p * lp, torch.zeros_like(p))).sum(-1)
    order = torch.sort(y, dim=-1, descending=True, stable=True).indices[:, :k]
    return order, lp.gather(1, order), lse, entropy


def logprobs_at(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0):
    y = _scaled(logits, temperature)
    lse = torch.logsumexp(y, dim=-1)
    return y.gather(1, ids.long()) - lse[:, None], lse


def sample_tokens(scores: torch.Tensor, uniform: torch.Tensor, temperature: float = 1.0):
    """(ids [rows], logprobs [rows]): the first id whose cumulative probability exceeds uniform * total, by
    cumsum + searchsorted (temperature 0: the first maximum, log-prob under softmax(scores)). Columns of zero
    probability are never drawn. Validates like the kernel."""
    if not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be 0 (greedy) or a positive finite number, got {temperature}")
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty [rows, vocab] tensor, got {tuple(scores.shape)}")
    if uniform.shape != (scores.shape[0],) or uniform.dtype != torch.float64:
        raise ValueError(f"uniform must be float64 [rows={scores.shape[0]}], got {uniform.dtype} "
                         f"{tuple(uniform.shape)}")
    y = _scaled(scores, temperature if temperature > 0 else 1.0)
    if bool((y.isnan() | (y == float("inf"))).any()):
        raise ValueError("scores contains NaN or +inf")
    if bool((y == float("-inf")).all(-1).any()):
        raise ValueError("scores has a row that is entirely -inf: no token has probability")
    lp = torch.log_softmax(y, dim=-1)
    if temperature == 0:
        ids = y.argmax(-1)  # the first maximum
    else:
        if bool(((uniform < 0) | (uniform >= 1)).any()):
            raise ValueError("uniform must lie in [0, 1)")
        p = (y - y.amax(-1, keepdim=True)).exp().double()
        cdf = p.cumsum(-1)
        ids = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).squeeze(1)
        last = (p > 0).cumsum(-1).argmax(-1)  # the last column with mass: where rounding leaves the target
        ids = torch.minimum(ids, last)
    return ids, lp.gather(1, ids[:, None]).squeeze(1)


_RAW = {"student_p_raw": "student", "teacher_p_raw": "teacher"}


def opd_weights(student_lp, teacher_lp, valid, weight_mode: str):
    """w_t(v) over the valid set (METHOD.md 2.3)."""
    if weight_mode == "none":
        count = valid.sum(-1, keepdim=True).clamp(min=1)
        return valid.to(student_lp.dtype) / count
    if weight_mode == "none_raw":
        return valid.to(student_lp.dtype)
    src = student_lp if weight_mode in ("student_p", "student_p_raw") else teacher_lp
    masked = src.masked_fill(~valid, float("-inf"))
    if weight_mode in _RAW:
        return torch.where(valid, masked.exp(), torch.zeros_like(src))
    w = torch.softmax(masked, dim=-1)
    return torch.where(valid, w, torch.zeros_like(w)).nan_to_num(0.0)


def opd_rewards(student_lp, teacher_lp, valid, weight_mode="student_p", log_ratio_clip=0.0):
    """(rewards [N,K], loss [N]): r = -w * clip(log p - log q), loss = -sum sg(r) * log p."""
    tq = teacher_lp.to(student_lp.dtype)
    l = student_lp - tq
    if log_ratio_clip > 0:
        l = l.clamp(-log_ratio_clip, log_ratio_clip)
    w = opd_weights(student_lp, tq, valid, weight_mode)
    r = torch.where(valid, -w * l, torch.zeros_like(l))
    loss = -(r * torch.where(valid, student_lp, torch.zeros_like(student_lp))).sum(-1)
    return r, loss


def opd_topk_loss(student_logits, ids, teacher_logprobs, valid=None, weight_mode="student_p", temperature=1.0,
                  log_ratio_clip=0.0):
    """Per-token loss through autograd: loss_t = -sum_v sg(r_t(v)) * log p_t(v). Returns (loss, rewards)."""
    if valid is None:
        valid = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    lp = log_softmax(student_logits, temperature)
    slp = lp.gather(1, ids.long())
    r, _ = opd_rewards(slp.detach(), teacher_logprobs, valid, weight_mode, log_ratio_clip)
    loss = -(r * torch.where(valid, slp, torch.zeros_like(slp))).sum(-1)
    return loss, r


def ppo_topk_loss(student_logits, ids, old_logprobs, advantages, valid=None, temperature=1.0, clip_low=0.2,
                  clip_high=None, dual_clip=3.0):
    """Per-token clipped surrogate through autograd, as the reference fork writes it: max(-A rho,
    -A clip(rho)), then for A < 0 min(., -c A); rho = exp(log p - log p_old)."""
    if valid is None:
        valid = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    clip_high = clip_low if clip_high is None else clip_high
    slp = log_softmax(student_logits, temperature).gather(1, ids.long())
    adv = advantages.to(slp.dtype)
    ratio = torch.exp(slp - old_logprobs.to(slp.dtype))
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    if dual_clip:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return torch.where(valid, loss, torch.zeros_like(loss)).sum(-1)


def renorm_topk_kl(student_logits, ids, teacher_logprobs, valid=None, temperature=1.0):
    """KL(pbar || qbar) with both renormalised over the valid set."""
    if valid is None:
        valid = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    z = _scaled(student_logits, temperature).gather(1, ids.long())
    tq = teacher_logprobs.to(z.dtype)
    some = valid.any(-1, keepdim=True)  # a row with an empty set stays finite and contributes 0

    def masked_log_softmax(a):
        a = torch.where(valid, a, torch.full_like(a, float("-inf")))
        return torch.where(valid, torch.log_softmax(torch.where(some, a, torch.zeros_like(a)), -1), torch.zeros_like(a))

    lp, lq = masked_log_softmax(z), masked_log_softmax(tq)
    p = torch.where(valid, lp.exp(), torch.zeros_like(lp))
    return (p * (lp - lq)).sum(-1)


def tail_topk_kl(student_logits, ids, teacher_logprobs, valid=None, temperature=1.0):
    """The reverse KL of the (k+1)-bin distributions: the valid set's ids plus one bin for the rest of the
    vocabulary, sum_S p log(p / q) + (1 - P) log((1 - P) / (1 - Q)), straight from the full softmax (the rest bin's
    mass summed over the ids outside the set, not derived from P)."""
    if valid is None:
        valid = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    lp_full = log_softmax(student_logits, temperature)
    p_full = lp_full.exp()
    in_set = torch.zeros_like(p_full).scatter_add_(1, ids.long(), valid.to(p_full.dtype)) > 0
    zero = torch.zeros((), dtype=lp_full.dtype, device=lp_full.device)
    rest_p = torch.where(in_set, zero, p_full).sum(-1)
    slp = lp_full.gather(1, ids.long())
    tq = teacher_logprobs.to(slp.dtype)
    p = torch.where(valid, slp.exp(), zero)
    set_part = torch.where(valid & (p > 0), p * (slp - tq), zero).sum(-1)
    rest_q = 1 - torch.where(valid, tq.exp(), zero).sum(-1)
    tiny = torch.finfo(slp.dtype).tiny
    return set_part + rest_p * (torch.log(rest_p.clamp(min=tiny)) - torch.log(rest_q.clamp(min=tiny)))


def dense_divergence(student_logits, teacher_logits, divergence="reverse_kl", beta=0.5, temperature=1.0):
    """Per-token forward KL(q||p), reverse KL(p||q) or JSD(beta) over the full vocabulary (0 * log 0 = 0)."""
    lp, lq = log_softmax(student_logits, temperature), log_softmax(teacher_logits, temperature)

    def kl(la, lb):  # sum_v a (log a - log b), with masked (a = 0) entries contributing 0
        live = la > float("-inf")
        la, lb = torch.where(live, la, 0), torch.where(live, lb, 0)  # no -inf - -inf, even in the backward
        return torch.where(live, la.exp() * (la - lb), 0).sum(-1)

    if divergence == "forward_kl":
        return kl(lq, lp)
    if divergence == "reverse_kl":
        return kl(lp, lq)
    dead = torch.isinf(lp) & torch.isinf(lq)  # masked on both sides: m = 0 there, and no NaN in the backward
    lm = torch.logsumexp(torch.stack([torch.where(dead, 0, lp) + torch.log1p(torch.tensor(-beta, dtype=lp.dtype)),
                                      torch.where(dead, 0, lq) + torch.log(torch.tensor(beta, dtype=lp.dtype))]),
                         dim=0)
    return beta * kl(lq, lm) + (1 - beta) * kl(lp, lm)


def build_token_set(student_ids, teacher_ids, strategy):
    """Loop version of opdcore.build_token_set: (ids, valid) with the same column layout."""
    from opdcore.ops.token_set import canonical_strategy

    s = canonical_strategy(strategy)
    rows = []
    for n in range(student_ids.shape[0]):
        S = student_ids[n].tolist()
        T = teacher_ids[n].tolist() if teacher_ids is not None else []
        if s == "student":
            rows.append((S, [True] * len(S)))
        elif s == "teacher":
            rows.append((T, [True] * len(T)))
        elif s == "intersection":
            rows.append((S, [v in T for v in S]))
        elif s == "union":
            rows.append((S + T, [True] * len(S) + [v not in S for v in T]))
        else:
            rows.append((S + T, [v not in T for v in S] + [v not in S for v in T]))
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
    valid = torch.tensor([r[1] for r in rows], dtype=torch.bool)
    return ids, valid


# ---- packed sequences ------------------------------------------------------------------------------------------


def pad_packed(packed, cu_seqlens, max_seqlen, pad_value=0.0):
    """Packed [N, ...] -> padded [B, max_seqlen, ...], a Python loop over sequences."""
    cu = cu_seqlens.tolist()
    out = torch.full((len(cu) - 1, max_seqlen, *packed.shape[1:]), pad_value, dtype=packed.dtype)
    for b in range(len(cu) - 1):
        out[b, :cu[b + 1] - cu[b]] = packed[cu[b]:cu[b + 1]]
    return out


def unpad_packed(padded, cu_seqlens):
    """Padded [B, T, ...] -> packed [N, ...]."""
    cu = cu_seqlens.tolist()
    return torch.cat([padded[b, :cu[b + 1] - cu[b]] for b in range(len(cu) - 1)])


def pack_sequences(prompts, responses, payloads=None):
    """The PackedBuffer.pack layout from lists of 1-D id tensors (and a list of payload dicts per sequence)."""
    lens = [len(p) + len(r) for p, r in zip(prompts, responses)]
    cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    out = {
        "input_ids": torch.cat([torch.cat([p.long(), r.long()]) for p, r in zip(prompts, responses)]),
        "position_ids": torch.cat([torch.arange(n) for n in lens]),
        "cu_seqlens": cu,
        "max_seqlen": max(lens),
        "loss_mask": torch.cat([torch.arange(len(p) + len(r)) >= len(p) for p, r in zip(prompts, responses)]),
        "payloads": {},
    }
    for name in (payloads[0] if payloads else {}):
        parts = []
        for p, d in zip(prompts, payloads):
            x = d[name]
            parts += [torch.zeros((len(p), *x.shape[1:]), dtype=x.dtype), x]
        out["payloads"][name] = torch.cat(parts)
    return out


def split_micro_batches(lengths, max_tokens=None, num_micro_batches=None):
    """Longest-first greedy to the least-loaded micro-batch (ties: lower index / lower micro-batch).

    With only max_tokens, the fewest micro-batches from ceil(total / max_tokens) up for which it fits.
    """
    import heapq

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))

    def greedy(k):
        heap = [(0, j) for j in range(k)]
        bins = [[] for _ in range(k)]
        for i in order:
            load, j = heapq.heappop(heap)
            if max_tokens is not None and load + lengths[i] > max_tokens:
                return None
            bins[j].append(i)
            heapq.heappush(heap, (load + lengths[i], j))
        return [sorted(b) for b in bins]

    if num_micro_batches is not None:
        return greedy(num_micro_batches)
    k = max(1, -(-sum(lengths) // max_tokens))
    while (bins := greedy(k)) is None:
        k += 1
    return bins
