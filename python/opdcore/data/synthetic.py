"""The embedded default task: multi-digit addition answered with a written-out procedure, built offline.

    123+489=                 <- prompt (raw string, no chat template)
    3+9+0=12 2               <- response: one line per column, right to left: digit + digit + carry-in = sum,
    2+8+1=11 12                 then the result digits so far; the last column writes its sum in full
    1+4+1=6 612
    Answer: 612

prepare_default_setup() builds everything the default OPD run needs (a character tokenizer, a teacher trained by
SFT to high held-out accuracy, a clearly weaker student, train/eval prompt files) and caches it on disk.
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional

from opdcore.data.reward import extract_answer

# printable ASCII plus newline: ~100 ids, so top-16 overlap diagnostics are not trivially high
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = ("\n",) + tuple(chr(c) for c in range(32, 127))


def build_char_tokenizer(out_dir=None):
    """A character-level PreTrainedTokenizerFast over printable ASCII and "\\n", built offline.

    Ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3 (any other character), then "\\n" and chr(32..126); 100 in all.
    Encoding with special tokens prepends <bos> (never appends <eos>: prompts must stay open); decoding joins
    characters without separators. No chat template. With out_dir the tokenizer is saved there with
    save_pretrained, so AutoTokenizer.from_pretrained(out_dir) loads it.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # BPE without merges = one token per character, with <unk> for characters outside the vocabulary
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>", padding_side="right", model_max_length=4096)
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


# ---- the task ---------------------------------------------------------------------------------------------------

def addition_procedure(a: int, b: int) -> str:
    """The target response for a + b: column by column from the right, ending in "Answer: <a+b>"."""
    if a < 0 or b < 0:
        raise ValueError(f"addition_procedure: operands must be non-negative, got {a}, {b}")
    da, db = str(a)[::-1], str(b)[::-1]
    columns = max(len(da), len(db))
    lines, carry, result = [], 0, ""
    for i in range(columns):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        result = (str(s) if i == columns - 1 else str(s % 10)) + result
        lines.append(f"{x}+{y}+{carry}={s} {result}")
        carry = s // 10
    return "\n".join(lines) + f"\nAnswer: {a + b}"


def make_addition_problems(n: int, seed: int, digits: int = 3, exclude=()) -> List[Dict[str, str]]:
    """n distinct problems with `digits`-digit operands: dicts with prompt "a+b=", answer str(a+b) and the
    target response (addition_procedure). Problems whose prompt is in `exclude` are never drawn."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
    space = (hi - lo + 1) ** 2
    exclude = set(exclude)
    if n < 0 or n > space - len(exclude):
        raise ValueError(f"make_addition_problems: cannot draw n={n} distinct {digits}-digit problems "
                         f"({space} exist, {len(exclude)} excluded)")
    rng = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < n:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        prompt = f"{a}+{b}="
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "answer": str(a + b), "response": addition_procedure(a, b)})
    return out


def parse_procedure_answer(response: str) -> Optional[int]:
    """The integer after the response's "Answer:", or None."""
    value = extract_answer(response)
    return int(value) if value is not None and value.isdigit() else None


# ---- models -----------------------------------------------------------------------------------------------------

def tiny_llama(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: Optional[int] = None,
               max_positions: int = 128, *, tie_word_embeddings: bool = False, tokenizer=None,
               bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
               pad_token_id: Optional[int] = None, seed: Optional[int] = None):
    """A randomly initialised LlamaForCausalLM from a LlamaConfig (float32, eval mode).

    intermediate defaults to 4 * hidden. Special-token ids come from `tokenizer` when given (explicit ids win),
    and vocab_size must cover it. seed makes the initialisation reproducible without touching the global RNG.
    Untied embeddings by default, so the LM head is its own weight as in most larger models.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads:
        raise ValueError(f"tiny_llama: hidden={hidden} must be divisible by heads={heads}")
    if tokenizer is not None:
        if len(tokenizer) > vocab_size:
            raise ValueError(f"tiny_llama: vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
        bos_token_id = tokenizer.bos_token_id if bos_token_id is None else bos_token_id
        eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = bos_token_id
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = pad_token_id
    return model.eval()
