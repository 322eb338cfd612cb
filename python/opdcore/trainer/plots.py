"""Training curves from metrics.jsonl (curves.png) and the per-position diagnostics from positions.jsonl
(positions.png: a response position x step heat map of student entropy and per-position curves)."""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Tuple

# (title, kind, keys): None = the eval accuracy
PANELS = [
    ("held-out accuracy", "eval", None),
    ("train accuracy", "train", ("train_accuracy",)),
    ("loss", "train", ("loss",)),
    ("top-k overlap ratio", "train", ("overlap_ratio",)),
    ("overlap mass (p, q on S ∩ T)", "train", ("overlap_mass_student", "overlap_mass_teacher")),
    ("overlap-token advantage", "train", ("overlap_advantage",)),
    ("entropy gap |H(q) - H(p)|", "train", ("entropy_gap",)),
    # beside the gap: a gap that narrows because the student's entropy rises is a failing run, not a success
    ("entropy H(p), H(q)", "train", ("student_entropy", "teacher_entropy")),
    ("responses cut off / without an answer", "train", ("truncated_fraction", "no_answer_fraction")),
    ("sampled-token reward log q - log p", "train", ("sampled_token_reward",)),
    ("reward AUROC (correct vs incorrect)", "train", ("reward_auroc",)),
    # METHOD.md 2.3: where lbar > 0 the reward-weighted top-k loss drains P_S; the share is that part's gradient
    ("set-mass drift: P_S, lbar, drift share", "train",
     ("student_topk_mass", "student_topk_lbar", "student_topk_drift_share")),
    # training health (METHOD.md 3): the update's size, the token that dominates it, the PPO clipping
    ("gradient norm (before clipping)", "train", ("grad_norm",)),
    ("p - q at the largest-|reward| token", "train", ("p_minus_q_at_largest_reward",)),
    ("several updates per batch: PPO clipping", "train", ("ppo_clip_fraction", "ppo_ratio_deviation")),
]
# per-position curves of positions.png
POSITION_CURVES = [("entropy gap by position", "entropy_gap"), ("overlap ratio by position", "overlap_ratio"),
                   ("overlap-token advantage by position", "overlap_advantage")]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def read_jsonl(path: str) -> Tuple[List[dict], int]:
    """(rows, unreadable lines) of a JSONL file ([] when it does not exist): a run killed mid-write may leave a
    last row cut short."""
    if not os.path.isfile(path):
        return [], 0
    rows, bad = [], 0
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                if isinstance(row, dict):
                    rows.append(row)
                else:
                    bad += 1
    return rows, bad


def _read(path: str) -> List[dict]:
    return read_jsonl(path)[0]


def plot_run(out_dir: str, path: Optional[str] = None, positions: bool = True) -> Optional[str]:
    """Write curves.png (and positions.png when positions.jsonl exists, unless positions=False) next to
    metrics.jsonl; returns the curves' path, or None without matplotlib or metrics."""
    plt = _pyplot()
    rows = _read(os.path.join(out_dir, "metrics.jsonl"))
    if plt is None or not rows:
        return None
    nrows = -(-len(PANELS) // 3)
    fig, axes = plt.subplots(nrows, 3, figsize=(14, 3.1 * nrows))
    for ax in axes.flat[len(PANELS):]:
        ax.axis("off")
    for ax, (title, kind, keys) in zip(axes.flat, PANELS):
        sel = [r for r in rows if r["kind"] == kind]
        if keys is None:  # the eval accuracy key names its n (accuracy_avg@n)
            keys = tuple({k for r in sel for k in r if k.startswith("accuracy_avg@")})
            teacher = [r["teacher_accuracy"] for r in sel if "teacher_accuracy" in r]
            if teacher:
                ax.axhline(teacher[0], color="gray", ls="--", lw=1, label="teacher")
        for key in keys:
            pts = [(r["step"], r[key]) for r in sel if key in r and not math.isnan(r[key])]
            if pts:
                ax.plot(*zip(*pts), marker="o" if kind == "eval" else None, lw=1.5, label=key)
        if not ax.lines:  # e.g. the top-k diagnostics of a sampled-token run, PPO clipping of one-update runs
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", color="gray",
                    transform=ax.transAxes)
        elif ax.get_legend_handles_labels()[0] and (len(keys) > 1 or kind == "eval"):
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = path or os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if positions:
        plot_positions(out_dir)
    return path


def plot_positions(out_dir: str, path: Optional[str] = None) -> Optional[str]:
    """positions.png: student entropy per response-position bucket and step (instability first shows at the
    end of long responses and moves forward), per-position curves at the first, middle and last step, and the
    teacher continuation probe by cut depth when it ran."""
    plt = _pyplot()
    rows = _read(os.path.join(out_dir, "positions.jsonl"))
    if plt is None or not rows:
        return None
    width = rows[-1]["bucket_width"]
    steps = [r["step"] for r in rows]
    nb = len(rows[-1]["student_entropy"])
    for r in rows:  # buckets with under 1% of a step's tokens are noise: left blank
        few = [c < 0.01 * sum(r["tokens"]) for c in r["tokens"]]
        for key in ["student_entropy"] + [k for _, k in POSITION_CURVES if k in r]:
            r[key] = [math.nan if f else v for f, v in zip(few, r[key])]
    probes = [r for r in _read(os.path.join(out_dir, "metrics.jsonl")) if r["kind"] == "probe"]
    ncols = 1 + len(POSITION_CURVES) + bool(probes)
    fig, axes = plt.subplots(1, ncols, figsize=(5 + 4.5 * (ncols - 1), 4.2))
    heat = [r["student_entropy"] for r in rows]  # [steps][buckets]; empty buckets are NaN (blank)
    im = axes[0].imshow(list(map(list, zip(*heat))), aspect="auto", origin="lower", cmap="viridis",
                        interpolation="nearest", extent=(steps[0] - 0.5, steps[-1] + 0.5, 0, nb * width))
    fig.colorbar(im, ax=axes[0], label="student entropy (nats)")
    axes[0].set_title("student entropy by position and step")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("response position (tokens)")
    centres = [(b + 0.5) * width for b in range(nb)]
    picks = sorted({0, len(rows) // 2, len(rows) - 1})
    for ax, (title, key) in zip(axes[1:], POSITION_CURVES):
        for i in picks:
            if key in rows[i]:
                ax.plot(centres, rows[i][key], marker=".",
                        label=f"step {rows[i]['step']}")
        ax.set_title(title)
        ax.set_xlabel("response position (tokens)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if probes:  # the teacher continuation probe: the teacher's advantage by cut depth, first and last probe
        ax = axes[-1]
        for r in sorted({0, len(probes) - 1}):
            pts = sorted((float(k.split("@")[1]), v) for k, v in probes[r].items() if k.startswith("probe_advantage@"))
            ax.plot(*zip(*pts), marker="o", label=f"step {probes[r]['step']}")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_title("teacher continuation advantage")
        ax.set_xlabel("cut depth (fraction of the response)")
        ax.set_ylabel("teacher - student accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = path or os.path.join(out_dir, "positions.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(rows: List[dict], path: str) -> Optional[str]:
    """Held-out accuracy per evaluation with the teacher's as a line, and the share of the gap recovered on a
    second axis."""
    plt = _pyplot()
    evals = [r for r in rows if r.get("kind") == "eval"]
    acc = [(r["step"], r[k]) for r in evals for k in r if k.startswith("accuracy_avg@")]
    if plt is None or not acc:
        return None
    teacher = next((r["teacher_accuracy"] for r in evals if "teacher_accuracy" in r), None)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*acc), marker="o", label="student (held-out)")
    if teacher is not None:
        ax.axhline(teacher, color="gray", ls="--", label=f"teacher {teacher:.3f}")
        gap = teacher - acc[0][1]
        if gap > 0:
            ax2 = ax.twinx()
            ax2.set_ylim((lo - acc[0][1]) / gap for lo in ax.get_ylim())
            ax2.set_ylabel("gap recovery")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_title("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timing(rows: List[dict], path: str) -> Optional[str]:
    """Seconds per phase per step (stacked), throughput, and resident memory per phase."""
    plt = _pyplot()
    train = [r for r in rows if r.get("kind") == "train"]
    phases = sorted({k[5:-2] for r in train for k in r if k.startswith("time_") and k.endswith("_s")})
    if plt is None or not train or not phases:
        return None
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].stackplot(steps, *[[r.get(f"time_{p}_s", 0.0) for r in train] for p in phases], labels=phases)
    axes[0].set_title("seconds per step, by phase")
    axes[0].legend(fontsize=8, loc="upper left")
    axes[1].plot(steps, [r.get("tokens_per_s", math.nan) for r in train])
    axes[1].set_title("tokens per second")
    for p in phases:
        pts = [(r["step"], r[f"rss_{p}_mib"]) for r in train if f"rss_{p}_mib" in r]
        if pts:
            axes[2].plot(*zip(*pts), label=p)
    axes[2].set_title("peak resident memory per phase (MiB)")
    if axes[2].get_legend_handles_labels()[0]:
        axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
