"""On-policy distillation with TRL 1.16's trainers and opdcore's loss, offline on CPU.

    python examples/trl_opd.py                                   # DistillationTrainer, exact reverse KL, tiny models
    python examples/trl_opd.py --trainer gkd --loss topk_opd     # GKD (lmbda=1), reward-weighted top-16 OPD loss
    python examples/trl_opd.py --preset synthetic --loss tail_topk_kl --steps 20
    python examples/trl_opd.py --preset smollm2 --steps 2        # SmolLM2-135M student and teacher (slow on CPU)

By default the models are random tiny Llamas over a 100-character tokenizer built here (nothing is downloaded);
--preset uses opdcore's cached preset models (built earlier by `python -m opdcore train --config synthetic` or
`--config smollm2`; an error says so when they are not cached). Prints TRL's log rows, with opdcore's diagnostics
("opdcore/...").
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch


def tiny_models(seed: int = 0):
    from opdcore.data.synthetic import build_char_tokenizer, tiny_llama

    tok = build_char_tokenizer()
    student = tiny_llama(len(tok), hidden=64, layers=2, heads=2, tokenizer=tok, seed=seed + 1)
    teacher = tiny_llama(len(tok), hidden=128, layers=2, heads=4, tokenizer=tok, seed=seed + 2)
    with torch.no_grad():  # random heads give near-uniform next-token distributions: make both peaked, LLM-like
        student.lm_head.weight.mul_(3.0)
        teacher.lm_head.weight.mul_(6.0)
    prompts = [f"{a}+{b}=" for a, b in zip(range(100, 964, 27), range(913, 49, -27))]
    return tok, student.train(), teacher, prompts


def preset_models(name: str):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdcore.presets import prepare_preset


    cache = os.environ.get("OPDCORE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "opdcore"))
    try:
        setup = prepare_preset(name, os.path.join(cache, name), build=False)
    except LookupError:
        raise SystemExit(f"--preset {name}: not cached under {cache}; build it once with "
                         f"`python -m opdcore train --config {name}` (or drop --preset for random tiny models)")
    tok = AutoTokenizer.from_pretrained(setup.tokenizer_dir)
    student = AutoModelForCausalLM.from_pretrained(setup.student_dir, dtype=torch.float32).train()
    teacher = AutoModelForCausalLM.from_pretrained(setup.teacher_dir, dtype=torch.float32)
    with open(setup.train_prompts_path) as f:
        prompts = [json.loads(line)["prompt"] for line, _ in zip(f, range(64))]
    return tok, student, teacher, prompts


def prompt_collator(tok):
    """GKD batches for lmbda=1: left-padded prompts only. No "labels": transformers then passes no
    num_items_in_batch (it would count labels before generation replaces them) and the loss is the token mean
    over the generated completions."""
    def collate(examples):
        texts = [e["prompt"] if isinstance(e["prompt"], str)
                 else tok.apply_chat_template(e["prompt"], add_generation_prompt=True, tokenize=False)
                 for e in examples]
        enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=isinstance(examples[0]["prompt"], str))
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "prompts": enc.input_ids,
                "prompt_attention_mask": enc.attention_mask}
    return collate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trainer", choices=("distillation", "gkd"), default="distillation")
    p.add_argument("--loss", choices=("dense", "topk_opd", "renorm_topk_kl", "tail_topk_kl"), default="dense")
    p.add_argument("--beta", type=float, default=1.0, help="dense loss: 0 forward KL, 1 reverse KL, else JSD (TRL's)")
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--strategy", default="student", help="the sparse losses' token set (opdcore.ops.STRATEGIES)")
    p.add_argument("--log-ratio-clip", type=float, default=0.0)
    p.add_argument("--preset", choices=("synthetic", "smollm2"), default=None)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-2 for the tiny models, 1e-5 for presets")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output-dir", default=None)
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from datasets import Dataset

    from opdcore.integrations.trl import OPDCoreDistillationTrainer, OPDCoreGKDTrainer, OPDCoreLoss

    tok, student, teacher, prompts = preset_models(a.preset) if a.preset else tiny_models()
    tok.padding_side = "left"  # both trainers generate from left-padded prompts
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lr = a.lr if a.lr is not None else (1e-5 if a.preset else 1e-2)
    opd = OPDCoreLoss(loss=a.loss, topk=a.topk, strategy=a.strategy, log_ratio_clip=a.log_ratio_clip)
    out = a.output_dir or os.path.join("runs", "trl_opd")
    common = dict(output_dir=out, per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=lr,
                  beta=a.beta, logging_steps=1, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
                  bf16=False, disable_tqdm=True, seed=0)
    data = Dataset.from_list([{"prompt": x} for x in prompts])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's notices (vLLM version, GKD -> DistillationTrainer migration)
        if a.trainer == "gkd":
            from trl.experimental.gkd import GKDConfig

            args = GKDConfig(lmbda=1.0, temperature=1.0, max_new_tokens=a.max_new_tokens, **common)
            trainer = OPDCoreGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                        processing_class=tok, data_collator=prompt_collator(tok), opdcore_loss=opd)
        else:
            from trl import DistillationConfig

            args = DistillationConfig(max_completion_length=a.max_new_tokens, temperature=1.0, **common)
            trainer = OPDCoreDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                                 train_dataset=data, processing_class=tok, opdcore_loss=opd)
    trainer.train()
    for row in trainer.state.log_history:
        if "loss" in row:
            keys = ["step", "loss", "grad_norm"] + sorted(k for k in row if k.startswith("opdcore/"))
            print("  ".join(f"{k.removeprefix('opdcore/')}={row[k]:.4g}" for k in keys if k in row))


if __name__ == "__main__":
    main()
