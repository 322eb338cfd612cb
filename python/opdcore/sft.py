"""Supervised fine-tuning on (prompt, response) pairs and greedy accuracy, for small models on one process.

Used to build the synthetic task's teacher and student, and by the off-policy cold-start recipe (the student
SFT-trained on teacher generations). Prompts are rendered exactly as the OPD trainer renders them
(opdcore.data.render_prompt), so a model sees the same prompt format in SFT, rollouts and evaluation.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from opdcore.data.prompts import Messages, PromptSampler, render_prompt
from opdcore.data.reward import verify

Prompt = Union[str, Messages]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad


def encode_sft_example(tokenizer, prompt: Prompt, response: str,
                       chat_template_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[List[int], int]:
    """(prompt ids + response ids + eos, number of prompt tokens). The loss covers everything after the prompt."""
    if tokenizer.eos_token_id is None:
        raise ValueError("SFT needs a tokenizer with an eos token (the model must learn to stop)")
    prompt_ids = render_prompt(tokenizer, prompt, chat_template_kwargs)
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return prompt_ids + response_ids + [tokenizer.eos_token_id], len(prompt_ids)


def _collate(seqs: Sequence[Tuple[List[int], int]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding)."""
    length = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(seqs):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[b, :len(ids)] = t
        mask[b, :len(ids)] = 1
        labels[b, n_prompt:len(ids)] = t[n_prompt:]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def sft_loss(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean cross entropy over the labelled (response + eos) tokens; logits upcast to float32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # position t predicts token t + 1
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def cosine_schedule(step: int, steps: int, warmup: int) -> float:
    """Multiplier of the base lr: linear warmup over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def sft_train(model, tokenizer, examples: Sequence[Tuple[Prompt, str]], *, steps: int, batch_size: int,
              lr: float, warmup: int = 0, seed: int = 0, max_len: Optional[int] = None, progress: bool = True,
              weight_decay: float = 0.0, grad_clip: float = 1.0,
              chat_template_kwargs: Optional[Dict[str, Any]] = None, desc: str = "sft",
              callback: Optional[Callable[[int, float], bool]] = None, bf16: bool = False) -> List[float]:
    """Train model on (prompt, response) pairs for `steps` optimizer steps; returns the loss of every step.

    The loss is the token-mean cross entropy on the response tokens plus the eos that ends them (never on the
    prompt). Batches of batch_size examples are drawn by a PromptSampler(seed) (epoch reshuffles, no example
    skipped), right-padded with an attention mask. AdamW (0.9, 0.95) with linear warmup then cosine decay to 0,
    gradient norm clipped to grad_clip (0 disables). Examples longer than max_len tokens are dropped with a
    warning. The model is left in eval mode, on its device; progress shows a tqdm bar with the rate and loss.

    callback(step, loss), if given, runs after every optimizer step (step counts from 1, the model is in train
    mode); returning True stops training there (early stopping; the schedule still spans `steps`).
    bf16: forward and backward under bfloat16 autocast (float32 weights and optimizer state), several times
    faster where the CPU has bfloat16 instructions.
    """
    from tqdm.auto import tqdm

    steps, batch_size = int(steps), int(batch_size)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"sft_train: steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    if warmup < 0 or lr <= 0:
        raise ValueError(f"sft_train: need warmup >= 0 and lr > 0, got warmup={warmup}, lr={lr}")
    encoded = [encode_sft_example(tokenizer, p, r, chat_template_kwargs) for p, r in examples]
    if max_len is not None:
        kept = [e for e in encoded if len(e[0]) <= max_len]
        if len(kept) < len(encoded):
            warnings.warn(f"sft_train: dropped {len(encoded) - len(kept)} of {len(encoded)} examples longer than "
                          f"max_len={max_len} tokens")
        encoded = kept
    if not encoded:
        raise ValueError("sft_train: no training examples" + (f" of at most {max_len} tokens" if max_len else ""))

    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    sampler = PromptSampler(len(encoded), batch_size, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, steps, warmup))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for _ in bar:
        batch = {k: v.to(device) for k, v in _collate([encoded[i] for i in next(sampler)], pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = sft_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if callback is not None and callback(len(losses), losses[-1]):
            break
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[Prompt], max_new_tokens: int, batch_size: int = 64,
                    chat_template_kwargs: Optional[Dict[str, Any]] = None) -> List[str]:
    """Greedy completions (special tokens removed) of prompts, in batches left-padded with an attention mask."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"greedy_generate: max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, "
                         f"{batch_size}")
    prompts = list(prompts)
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    texts: List[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = [render_prompt(tokenizer, p, chat_template_kwargs) for p in prompts[start:start + batch_size]]
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for b, x in enumerate(ids):
            input_ids[b, length - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[b, length - len(x):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             eos_token_id=tokenizer.eos_token_id, top_p=None, top_k=None, temperature=None)
        texts.extend(tokenizer.batch_decode(out[:, length:], skip_special_tokens=True))
    model.train(was_training)
    return texts


def greedy_accuracy(model, tokenizer, prompts: Sequence[Prompt], answers: Sequence[Any], max_new_tokens: int,
                    batch_size: int = 64, chat_template_kwargs: Optional[Dict[str, Any]] = None,
                    checker: Callable[[str, Any], float] = verify) -> float:
    """Fraction of prompts whose greedy completion checker(text, answer) accepts (default verify; an
    opdcore.data.reward.AnswerChecker for another answer extraction), with HF generate, do_sample=False."""
    if len(prompts) != len(answers):
        raise ValueError(f"greedy_accuracy: {len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("greedy_accuracy: no prompts")
    texts = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, chat_template_kwargs)
    return sum(checker(t, a) for t, a in zip(texts, answers)) / len(prompts)
