"""Off-policy cold start (METHOD.md 4), then OPD on the prompts the SFT never saw.

    opdcore cold-start --out runs/cold_start            # the embedded synthetic task, offline
    opdcore cold-start --teacher T --student S --prompts train.jsonl --eval-prompts eval.jsonl \\
        --out runs/cs --max-new-tokens 4096 --sft-steps 500 --lr 1e-5 --batch-size 32

The teacher samples --n responses per SFT prompt; truncated, answer-less, looping and (where answers are known)
wrong ones are dropped; the student is SFT-trained on the rest. OUT gets sft_data.jsonl, opd_prompts.jsonl (the
held-back prompts), student/ (Hugging Face format) and cold_start.json (filter counts, accuracies), and the
command that continues with OPD is printed.
"""
import argparse
import json
import os
import sys


def parse(argv):
    p = argparse.ArgumentParser(prog="opdcore cold-start", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="synthetic")
    p.add_argument("--student", default="synthetic")
    p.add_argument("--prompts", help="JSONL/Parquet prompts (default with synthetic: the task's OPD prompts)")
    p.add_argument("--eval-prompts", help="held-out prompts for greedy accuracy before and after the SFT")
    p.add_argument("--out", required=True)
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    p.add_argument("--n", type=int, default=4, help="teacher responses per prompt")
    p.add_argument("--per-prompt", type=int, default=1, help="responses kept per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the synthetic task's own, else required")
    p.add_argument("--sft-fraction", type=float, default=0.5, help="share of the prompts used for the SFT")
    p.add_argument("--keep-incorrect", action="store_true", help="do not drop wrong answers")
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-max", type=int, default=256, help="eval prompts used for the accuracies")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    import torch

    from opdcore.config import SYNTHETIC_PRESET
    from opdcore.data.prompts import load_prompts, render_prompt
    from opdcore.recipes import split_prompts, teacher_sft_data
    from opdcore.rollout import SamplingConfig
    from opdcore.sft import greedy_accuracy, sft_train
    from opdcore.trainer.models import load_causal_lm, load_tokenizer

    torch.manual_seed(args.seed)
    paths = {"teacher": args.teacher, "student": args.student, "prompts": args.prompts, "eval": args.eval_prompts}
    max_new = args.max_new_tokens
    if "synthetic" in (args.teacher, args.student):
        if args.teacher != args.student:
            raise SystemExit("--teacher and --student must both be 'synthetic' (or both paths)")
        from opdcore.presets.default_setup import prepare_default_setup

        cache = os.environ.get("OPDCORE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "opdcore"))
        s = prepare_default_setup(os.path.join(cache, "synthetic"), seed=args.seed)
        paths = {"teacher": s.teacher_dir, "student": s.student_dir, "prompts": args.prompts or s.train_prompts_path,
                 "eval": args.eval_prompts or s.eval_prompts_path}
        max_new = max_new or s.max_new_tokens
    if not paths["prompts"] or max_new < 1:
        raise SystemExit("--prompts and --max-new-tokens are required with your own models")

    tok = load_tokenizer(paths["student"])
    teacher = load_causal_lm(paths["teacher"], "float32", torch.device("cpu")).eval()
    student = load_causal_lm(paths["student"], "float32", torch.device("cpu"))
    sft_prompts, opd_prompts = split_prompts(load_prompts(paths["prompts"]), args.sft_fraction, args.seed)
    if args.engine == "vllm":
        from opdcore.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(paths["teacher"], tok, seed=args.seed)
    else:
        from opdcore.rollout.hf import HFEngine

        engine = HFEngine(teacher, tok, batch_size=64, shares_training_model=True)
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, max_new_tokens=max_new)
    data, stats = teacher_sft_data(engine, tok, sft_prompts, [render_prompt(tok, p) for p in sft_prompts], sampling,
                                   require_correct=not args.keep_incorrect, per_prompt=args.per_prompt)
    print(f"teacher responses: {stats.as_dict()}")
    if not data:
        raise SystemExit("no teacher response passed the rejection filter; raise --max-new-tokens or --n")

    report = {"filter": stats.as_dict(), "sft_prompts": len(sft_prompts), "opd_prompts": len(opd_prompts)}
    evals = load_prompts(paths["eval"])[:args.eval_max] if paths["eval"] else []

    def accuracy(model):
        return greedy_accuracy(model, tok, [e.prompt for e in evals], [e.answer for e in evals], max_new)

    if evals:
        report["student_accuracy_before"] = accuracy(student)
    losses = sft_train(student, tok, data, steps=args.sft_steps, batch_size=args.batch_size, lr=args.lr,
                       warmup=min(20, args.sft_steps // 10), seed=args.seed, desc="cold-start sft")
    report["sft_loss_first_last"] = [losses[0], losses[-1]]
    if evals:
        report["student_accuracy_after"] = accuracy(student)
        report["teacher_accuracy"] = accuracy(teacher)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sft_data.jsonl"), "w") as f:
        f.writelines(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in data)
    with open(os.path.join(args.out, "opd_prompts.jsonl"), "w") as f:
        f.writelines(json.dumps(e.row) + "\n" for e in opd_prompts)
    student.save_pretrained(os.path.join(args.out, "student"))
    tok.save_pretrained(os.path.join(args.out, "student"))
    with open(os.path.join(args.out, "cold_start.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    preset = f"--config {SYNTHETIC_PRESET} " if args.teacher == "synthetic" else ""
    more = f" data.eval_path={paths['eval']}" if paths["eval"] else ""
    print(f"continue with OPD:\n  opdcore train {preset}model.student={os.path.join(args.out, 'student')} "
          f"model.teacher={paths['teacher']} data.train_path={os.path.join(args.out, 'opd_prompts.jsonl')}{more}")
    return 0
