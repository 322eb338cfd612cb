"""Recipes of METHOD.md section 4 for when OPD does not work out of the box: an off-policy cold start on
filtered teacher responses, and teacher-aligned prompt selection."""
from opdcore.recipes.cold_start import FilterStats, rejection_filter, repeats_at_end, split_prompts, teacher_sft_data
from opdcore.recipes.prompt_selection import (SelectionStats, SentenceEmbedder, apply_template, dedup, prompt_text,
                                              select_prompts)

__all__ = ["FilterStats", "rejection_filter", "repeats_at_end", "split_prompts", "teacher_sft_data", "SelectionStats",
           "SentenceEmbedder", "apply_template", "dedup", "prompt_text", "select_prompts"]
