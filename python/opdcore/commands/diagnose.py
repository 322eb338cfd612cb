"""`opdcore diagnose`: will on-policy distillation work for this student, teacher and prompts? Before spending the
compute: sample the student's own responses, score them with the teacher as a training step would, measure both
models' held-out accuracy and the teacher continuation probe, and print a verdict with its numbers and what to do.

    opdcore diagnose                                   # the embedded synthetic pair (built on first use)
    opdcore diagnose --config smollm2                  # the real-model preset
    opdcore diagnose --student S --teacher T --prompts train.jsonl --max-new-tokens 1024 [--eval-prompts E]

Writes OUT/diagnosis.json (every number, the verdict and recommendations) and OUT/diagnose.png. Further
`key=value` settings are the trainer's (see `opdcore train --help`), e.g. rollout.engine=vllm model.dtype=bfloat16.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys


def parse(argv):
    p = argparse.ArgumentParser(prog="opdcore diagnose", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="a preset (synthetic, smollm2) or YAML file: its settings, and its models unless "
                                    "--student/--teacher/--prompts are given; default: synthetic without --student")
    p.add_argument("--student", help="Hugging Face model folder or id")
    p.add_argument("--teacher", help="Hugging Face model folder or id (same tokenizer as the student)")
    p.add_argument("--prompts", help="JSONL/Parquet prompts the student would be trained on")
    p.add_argument("--eval-prompts", help="held-out prompts with answers for both models' accuracy and the probe "
                                          "(default: --prompts)")
    p.add_argument("--num-prompts", type=int, default=256, help="prompts sampled and scored (default 256)")
    p.add_argument("--n", type=int, help="responses per prompt (default: rollout.n)")
    p.add_argument("--k", type=int, default=16, help="top-k of the overlap diagnostics (default 16)")
    p.add_argument("--max-new-tokens", type=int, help="response length (default: rollout.max_new_tokens)")
    p.add_argument("--engine", choices=("hf", "vllm"), help="rollout engine (default: rollout.engine)")
    p.add_argument("--eval-max", type=int, default=128, help="held-out prompts for the accuracies (default 128)")
    p.add_argument("--probe-prompts", type=int, default=32, help="prompts of the continuation probe (0: skip)")
    p.add_argument("--out", default="runs/diagnose", help="folder for diagnosis.json and diagnose.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-") or "=" not in a]
    if bad:
        p.error(f"unrecognised argument {bad[0]!r} (settings are key=value)")
    for name in ("num_prompts", "k", "eval_max"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.probe_prompts < 0 or (args.n is not None and args.n < 1) or \
            (args.max_new_tokens is not None and args.max_new_tokens < 1):
        p.error("--probe-prompts must be >= 0, --n and --max-new-tokens >= 1")
    if args.student or args.teacher or args.prompts:
        missing = [f"--{n}" for n in ("student", "teacher", "prompts") if not getattr(args, n)]
        if missing:
            p.error(f"a model pair needs --student, --teacher and --prompts (missing {', '.join(missing)})")
    return args, rest


def settings(args, rest) -> list:
    """The trainer's key=value settings for a diagnosis: the user's first, then what the flags set."""
    out = list(rest)
    if args.student:
        out += [f"model.student={args.student}", f"model.teacher={args.teacher}", f"data.train_path={args.prompts}",
                f"data.eval_path={args.eval_prompts or args.prompts}"]
    flags = {"rollout.n": args.n, "rollout.max_new_tokens": args.max_new_tokens, "rollout.engine": args.engine}
    out += [f"{k}={v}" for k, v in flags.items() if v is not None]
    out += [f"loss.topk={args.k}", f"train.output_dir={args.out}", "train.resume=never", "train.tensorboard=false",
            "train.progress=false", f"eval.max_prompts={args.eval_max}", "eval.save_samples=0",
            f"diagnostics.probe_every={1 if args.probe_prompts else 0}",
            f"diagnostics.probe_prompts={max(args.probe_prompts, 1)}"]
    return out


def main(argv=None) -> int:
    args, rest = parse(sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the evidence is gathered in one process
        print("error: opdcore diagnose runs in one process (not under torchrun)", file=sys.stderr)
        return 2
    from opdcore.commands.train import config_path, trainer_from

    overrides = settings(args, rest)
    built = trainer_from(config_path(args.config, overrides), overrides)
    if built is None:
        return 2
    cfg, trainer = built
    from opdcore.diagnosis import judge
    from opdcore.diagnosis.collect import collect
    from opdcore.diagnosis.plot import plot_evidence
    from opdcore.trainer import dist

    try:
        evidence = collect(trainer, args.num_prompts, progress=not args.quiet)
    finally:
        trainer.close()
        dist.shutdown()
    result = judge(evidence)
    os.makedirs(args.out, exist_ok=True)
    report = {"student": cfg.model.student, "teacher": cfg.model.teacher, **result, "evidence": evidence}
    path = os.path.join(args.out, "diagnosis.json")
    with open(path, "w") as f:
        json.dump(json_safe(report), f, indent=1)
    png = plot_evidence(evidence, os.path.join(args.out, "diagnose.png"))
    print(format_report(report))
    print(f"\n{path}" + (f"\n{png}" if png else ""))
    return 0


def json_safe(x):
    """NaN (not JSON) as null, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def format_report(report) -> str:
    marks = {"good": "ok  ", "warn": "warn", "bad": "BAD ", "info": "    "}
    ev = report["evidence"]
    lines = [f"opdcore diagnose: {report['student']} <- {report['teacher']}",
             f"  {ev['responses']} responses to {ev['prompts']} prompts, {ev['tokens']} tokens, top-{ev['k']} of a "
             f"{ev['vocab']}-token vocabulary", "",
             f"verdict: {report['verdict']}: {report['summary']}", ""]
    lines += [f"  [{marks[f['level']]}] {f['aspect']}: {f['text']}" for f in report["findings"]]
    lines += ["", "recommendations:"] + [f"  - {r}" for r in report["recommendations"]]
    return "\n".join(lines)
