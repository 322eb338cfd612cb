"""Tiny real models, tokenizer and prompt files for trainer tests (built offline in a temporary folder)."""
import json
import os
import subprocess
import sys

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train.py")


def make_tiny_run_dir(root, teacher_vocab_pad: int = 4, teacher_hidden: int = 96):
    """Character tokenizer, a random tiny student (2 heads) and a (differently seeded) teacher of teacher_hidden / 32
    heads whose LM head has `teacher_vocab_pad` padding rows, and train/eval JSONL addition prompts. Returns a dict
    of paths."""
    from opdcore.data.synthetic import build_char_tokenizer, make_addition_problems, tiny_llama

    root = str(root)
    tok_dir = os.path.join(root, "tok")
    tok = build_char_tokenizer(tok_dir)
    paths = {"tokenizer": tok_dir}
    # head_dim 32: the smallest vLLM's CPU attention supports
    for name, hidden, seed, pad in (("student", 64, 1, 0), ("teacher", teacher_hidden, 2, teacher_vocab_pad)):
        model = tiny_llama(len(tok) + pad, hidden=hidden, layers=1, heads=hidden // 32, max_positions=256, tokenizer=tok,
                           seed=seed)
        d = os.path.join(root, name)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        paths[name] = d
    for split, n, seed in (("train", 24, 0), ("eval", 6, 1)):
        p = os.path.join(root, f"{split}.jsonl")
        with open(p, "w") as f:
            for ex in make_addition_problems(n, seed=seed, digits=2):
                f.write(json.dumps(ex) + "\n")
        paths[split] = p
    return paths


def overrides(paths, out_dir, **extra):
    base = {
        "model.student": paths["student"], "model.teacher": paths["teacher"], "data.train_path": paths["train"],
        "data.eval_path": paths["eval"], "rollout.n": 2, "rollout.max_new_tokens": 12, "rollout.batch_size": 16,
        "train.prompts_per_step": 4, "train.steps": 3, "train.micro_batch_tokens": 128, "train.save_every": 2,
        "train.output_dir": str(out_dir), "train.progress": False, "train.threads": 1, "eval.every": 0,
        "eval.max_prompts": 6, "eval.max_new_tokens": 12, "optim.lr": 1e-2, "loss.topk": 8,
        "loss.log_ratio_clip": 5.0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run(args, **kw):
    """examples/train.py with these overrides, one thread, in a subprocess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, env=env, timeout=600, **kw)


def metrics(out_dir, kind="train", memory=True):
    """One kind of rows of a run's metrics.jsonl; memory=False drops the resident-memory readings (measured, so
    they differ between runs that compute the same)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r["kind"] == kind]
    return rows if memory else [{k: v for k, v in r.items() if not k.startswith("rss_")} for r in rows]
