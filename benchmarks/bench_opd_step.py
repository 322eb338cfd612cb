"""OPD step throughput on the embedded default models: opdcore's kernels against the same step written the
plain PyTorch way (full logits, log_softmax + topk + gather for scoring, the loss through autograd).

    python benchmarks/bench_opd_step.py [--steps 8] [--threads 1]

All runs use the same config, models, prompts and seeds; only the scoring and loss implementation differs. The
middle column is opdcore with train.score_in_update=false (the student's own no-grad scoring pass before the
update, as the plain way does it).
Prints per-phase seconds per step (median over steps after one warm-up step) and tokens/s, as ratios.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from types import SimpleNamespace

import torch

from opdcore.config import SYNTHETIC_PRESET
from opdcore.config import load_config
from opdcore.objectives import LMHead
from opdcore.ops import StreamResult
from opdcore.trainer.loop import Trainer
from opdcore.trainer.models import OPDModel


class TorchHead(LMHead):
    """The plain way: log_softmax/topk/gather on materialised [tokens, vocab] logits, and autograd."""

    def __init__(self, logits):
        self.z = logits.float()

    def score(self, k, temperature, ids):
        with torch.no_grad():
            lp = torch.log_softmax(self.z / temperature, dim=-1)
            vals, top = torch.topk(lp, max(k, 1), dim=-1)
            ent = -(lp.exp() * lp).sum(-1)
            lse = (self.z / temperature)[:, 0] - lp[:, 0]
            return StreamResult(top[:, :k], vals[:, :k], lse, ent, lp.gather(1, ids))

    def set_loss(self, ids, teacher_logprobs, token_weights, valid=None, *, temperature, weight_mode="none",
                 log_ratio_clip=0.0, check_logprobs=True):
        slp = torch.log_softmax(self.z / temperature, dim=-1).gather(1, ids)
        valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
        with torch.no_grad():
            l = slp - teacher_logprobs
            if log_ratio_clip > 0:
                l = l.clamp(-log_ratio_clip, log_ratio_clip)
            if weight_mode == "none":
                w = valid / valid.sum(-1, keepdim=True).clamp(min=1)
            else:  # student_p
                w = torch.softmax(slp.masked_fill(~valid, float("-inf")), -1).nan_to_num(0.0)
            r = torch.where(valid, -w * l, torch.zeros_like(l))
        per_token = -(r * torch.where(valid, slp, torch.zeros_like(slp))).sum(-1)
        return (per_token * token_weights).sum(), SimpleNamespace(rewards=r)


class TorchOPDModel(OPDModel):
    def forward(self, input_ids, attention_mask, pred_index=None, use=None, generate=None):
        if generate is not None:
            return super().forward(input_ids, attention_mask, generate=generate)
        logits = self.hf(input_ids=input_ids, attention_mask=attention_mask).logits
        return use(TorchHead(logits.reshape(-1, logits.shape[-1])[pred_index][:, :self.vocab]))


def run(backend: str, args) -> dict:
    out = tempfile.mkdtemp(prefix=f"opd-bench-{backend}-")
    cfg = load_config(SYNTHETIC_PRESET, (f"train.steps={args.steps + 1}", f"train.output_dir={out}",
                                         "train.save_every=0", "eval.every=0", "eval.max_prompts=0",
                                         "train.progress=false", "train.tensorboard=false",
                                         f"train.threads={args.threads}", f"loss.topk={args.topk}",
                                         # the reward-weighted loss in every run; "opdcore-separate": the student
                                         # scored by its own no-grad forward before the update, as the plain way
                                         f"train.score_in_update={backend == 'opdcore'}",
                                         "loss.renorm_kl=false"))
    trainer = Trainer(cfg)
    if backend == "torch":
        for name in ("student", "teacher"):
            m = getattr(trainer, name)
            swapped = TorchOPDModel(m.hf, m.vocab, fused=False)  # its head gives [tokens, vocab] logits
            setattr(trainer, name, swapped)
        trainer.params = [p for p in trainer.student.parameters() if p.requires_grad]
    torch.manual_seed(0)
    rows = [trainer.train_step() for _ in range(args.steps + 1)][1:]  # drop the warm-up step
    keys = [k for k in rows[0] if k.startswith("time_")] + ["tokens_per_s", "loss"]
    return {k: statistics.median(r[k] for r in rows) for k in keys}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--topk", type=int, default=16)
    args = p.parse_args()
    res = {b: run(b, args) for b in ("torch", "opdcore-separate", "opdcore")}
    keys = [k for k in res["opdcore"] if k.startswith("time_")] + ["tokens_per_s"]
    print(f"\nOPD step on the synthetic default models, k={args.topk}, {args.threads} thread(s), median of "
          f"{args.steps} steps\n")
    print("| phase | plain PyTorch | opdcore, separate student pass | opdcore | speed-up | separate speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in keys:
        t, s, o = res["torch"][k], res["opdcore-separate"][k], res["opdcore"][k]
        ratio = (lambda a, b: a / b) if not k.startswith("tokens") else (lambda a, b: b / a)
        print(f"| {k} | {t:.4f} | {s:.4f} | {o:.4f} | {ratio(t, o):.2f}x | {ratio(t, s):.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
