"""Attention for the HF rollout engine's decoding steps on CPU.

A decoding step has one query per row. transformers' sdpa path then repeats every cached key and value head
for grouped-query attention (a copy of the whole cache per layer per step) or calls torch's CPU flash kernel,
whose fixed cost per call dominates at one query (SmolLM2-135M, batch 32: ~1.6 ms per layer per step, 30
layers). Here the query heads of a group share their key/value head through two small matmuls on views,
[B, kv_heads, group, D] @ [B, kv_heads, D, L]; every other call (the prompt's prefill, dropout, position
biases) is transformers' sdpa unchanged. Registered as attention implementation "opdcore_decode" with sdpa's
masks; HFEngine switches a model to it only for the duration of generate().
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "opdcore_decode"


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query [B, H, q, D], key / value [B, H_kv, L, D] -> ([B, q, H, D], None), as transformers' sdpa."""
    if query.shape[2] != 1 or dropout or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, H, _, D = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else D ** -0.5
    q = query.reshape(B, kv_heads, H // kv_heads, D)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [B, kv_heads, group, L]
    if attention_mask is not None:  # sdpa's mask, [B, 1, 1, L]: bool (True attends) or additive
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, kv_heads, group, D]
    return out.reshape(B, H, 1, D).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
