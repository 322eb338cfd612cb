"""Data for the trainer: prompt sets and their rendering, the verifiable reward, and the synthetic task
(opdcore.presets builds the embedded presets from it; opdcore.sft holds the SFT loop and greedy accuracy)."""
from opdcore.data.prompts import PromptExample, PromptSampler, filter_long, load_prompts, render_prompt
from opdcore.data.reward import answers_match, extract_answer, normalize_answer, verify
from opdcore.data.synthetic import (
    addition_procedure,
    build_char_tokenizer,
    make_addition_problems,
    parse_procedure_answer,
    tiny_llama,
)

__all__ = [
    "PromptExample", "PromptSampler", "addition_procedure", "answers_match", "build_char_tokenizer",
    "extract_answer", "filter_long", "load_prompts", "make_addition_problems", "normalize_answer",
    "parse_procedure_answer", "render_prompt", "tiny_llama", "verify",
]
