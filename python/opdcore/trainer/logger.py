"""Metrics: JSONL per step, TensorBoard when installed, and a progress bar (rank 0 only)."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from opdcore.trainer import dist


class MetricsLogger:
    """keep_through: the rows of earlier steps already in the files (a resumed run: its checkpoint's step) stay,
    later ones (logged by a killed run after its last checkpoint) are dropped, so every step has one row per kind;
    -1 drops all."""

    def __init__(self, out_dir: str, total_steps: int, start_step: int, tensorboard: bool, progress: bool,
                 keep_through: int = -1):
        self.main = dist.is_main()
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        self.bar = None
        if not self.main:
            return
        os.makedirs(out_dir, exist_ok=True)
        for name in ("metrics.jsonl", "positions.jsonl"):
            _truncate(os.path.join(out_dir, name), keep_through)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the events of steps >= it written before the restart
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=keep_through + 1)
            except ImportError:
                print("tensorboard is not installed: logging to metrics.jsonl only")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="OPD", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: Dict[str, float], kind: str = "train") -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.bar is not None and kind == "train":
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                 acc=f"{metrics.get('train_accuracy', float('nan')):.2f}",
                                 tok_s=f"{metrics.get('tokens_per_s', 0):.0f}", refresh=False)

    def log_profile(self, step: int, profile: Dict[str, list]) -> None:
        """Per-position diagnostics of one step, one JSON line in positions.jsonl (plotted as positions.png)."""
        if not self.main:
            return
        with open(os.path.join(os.path.dirname(self.path), "positions.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **profile}) + "\n")

    def message(self, text: str) -> None:
        if not self.main:
            return
        (self.bar.write if self.bar is not None else print)(text)

    def close(self, final: Optional[Dict[str, float]] = None) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _truncate(path: str, keep_through: int) -> None:
    """Drop the rows of steps after keep_through from a JSONL metrics file (atomically: a kill keeps the old)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= keep_through:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a row cut short by a kill mid-write
            continue
    if kept == lines:  # (a last row without its newline is rewritten with one)
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
