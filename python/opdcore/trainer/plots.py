"""Training curves from metrics.jsonl: held-out accuracy, train accuracy, loss and the OPD diagnostics."""
from __future__ import annotations

import json
import os
from typing import Optional

PANELS = [
    ("held-out accuracy", "eval", None),
    ("train accuracy", "train", "train_accuracy"),
    ("loss", "train", "loss"),
    ("top-k overlap ratio", "train", "overlap_ratio"),
    ("entropy gap |H(q) - H(p)|", "train", "entropy_gap"),
    ("sampled-token reward log q - log p", "train", "sampled_token_reward"),
]


def plot_run(out_dir: str, path: Optional[str] = None) -> Optional[str]:
    """Write curves.png next to metrics.jsonl; returns its path, or None without matplotlib or metrics."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    src = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(src):
        return None
    with open(src) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, kind, key) in zip(axes.flat, PANELS):
        sel = [r for r in rows if r["kind"] == kind]
        if key is None:  # the eval accuracy key names its n (accuracy_avg@n)
            key = next((k for r in sel for k in r if k.startswith("accuracy_avg@")), None)
        pts = [(r["step"], r[key]) for r in sel if key and key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if kind == "eval" else None, lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = path or os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
