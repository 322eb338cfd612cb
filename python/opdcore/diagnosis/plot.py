"""diagnose.png: the evidence at a glance, by response position, by probe depth, and the reward's separation of
correct from incorrect responses."""
from __future__ import annotations

import math
from typing import Dict, Optional

from opdcore.trainer.plots import _pyplot


def plot_evidence(ev: Dict, path: str) -> Optional[str]:
    plt = _pyplot()
    if plt is None:
        return None
    prof = ev["profiles"]
    width = prof["bucket_width"]
    few = [c < 0.01 * sum(prof["tokens"]) for c in prof["tokens"]]  # nearly empty buckets are noise: left out
    x = [(b + 0.5) * width for b in range(len(prof["tokens"]))]

    def curve(ax, key, label):
        pts = [(xi, v) for xi, v, f in zip(x, prof.get(key, []), few) if not f and not math.isnan(v)]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=label)

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [("top-k overlap by position", [("overlap_ratio", "overlap ratio"),
                                             ("overlap_mass_student", "overlap mass (p)")]),
              ("entropy by position", [("student_entropy", "H(p) student"), ("teacher_entropy", "H(q) teacher")]),
              ("entropy gap |H(q) - H(p)| by position", [("entropy_gap", "entropy gap")]),
              ("sampled-token reward log q - log p by position", [("sampled_token_reward", "reward")])]
    for ax, (title, keys) in zip(axes.flat, panels):
        for key, label in keys:
            curve(ax, key, label)
        ax.set_title(title)
        ax.set_xlabel("response position (tokens)")
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax = axes.flat[4]
    adv = sorted((float(k.split("@")[1]), v) for k, v in ev.get("probe", {}).items()
                 if k.startswith("probe_advantage@"))
    if adv:
        ax.plot(*zip(*adv), marker="o")
        ax.axhline(0, color="gray", lw=0.8)
    else:
        ax.text(0.5, 0.5, "probe not run", ha="center", va="center", color="gray", transform=ax.transAxes)
    ax.set_title("teacher continuation advantage")
    ax.set_xlabel("cut depth (fraction of the response)")
    ax.set_ylabel("teacher - student accuracy")
    ax.grid(alpha=0.3)
    ax = axes.flat[5]
    seq = ev["sequence"]
    for label, want in (("correct", 1.0), ("incorrect", 0.0)):
        vals = [r for r, c in zip(seq["rbar"], seq["correct"]) if c == want and not math.isnan(r)]
        if vals:
            ax.hist(vals, bins=30, alpha=0.5, label=f"{label} ({len(vals)})")
    auc = seq["reward_auroc"]
    ax.set_title("sequence mean reward (AUROC " + ("undefined" if math.isnan(auc) else f"{auc:.3f}") + ")")
    ax.set_xlabel("(1/T) Σ log q - log p")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
