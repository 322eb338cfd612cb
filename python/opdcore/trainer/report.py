"""`opdcore report RUN_DIR`: one self-contained HTML page (every image inlined) and its PNGs from what a run wrote:
metrics.jsonl, positions.jsonl, config.json and samples/. It reads files only, so it works on a run that is still
going, was killed, or came from another machine."""
from __future__ import annotations

import base64
import glob
import html
import json
import math
import os
from typing import Dict, List, Optional, Tuple

from opdcore.trainer.plots import plot_accuracy, plot_positions, plot_run, plot_timing, read_jsonl

# (metric, what it says, which way is healthy: +1 rising / -1 falling / 0 toward zero / None no direction),
# METHOD.md sections 2.3 and 3
READINGS = [
    ("train_accuracy", "accuracy of the training rollouts", 1),
    ("overlap_ratio", "|S ∩ T| / k: rises in runs that work, stagnates in runs that fail", 1),
    ("overlap_mass_student", "p mass on S ∩ T: near 0.97-0.99 when the shared support carries the distribution",
     None),
    ("overlap_mass_teacher", "q mass on S ∩ T", None),
    ("overlap_advantage", "mean pbar (log qbar - log pbar) on S ∩ T: goes toward 0 in success", 0),
    ("entropy_gap", "mean |H(q) - H(p)| per position: narrows in success", -1),
    ("student_entropy", "a gap that closes because H(p) climbs is a failing run", None),
    ("sampled_token_reward", "log q - log p at the sampled tokens: rises toward 0", 0),
    ("reward_auroc", "how well the sequence-mean reward separates correct from incorrect responses (0.5: not)",
     None),
    ("student_topk_mass", "P_S: the student's mass on its own top-k", None),
    ("student_topk_lbar", "lbar > 0: the reward-weighted top-k loss lowers P_S (METHOD.md 2.3)", None),
    ("student_topk_drift_share", "share of that loss's gradient that only moves P_S", None),
    ("truncated_fraction", "responses cut off at rollout.max_new_tokens", None),
    ("grad_norm", "gradient norm before clipping", None),
    ("tokens_per_s", "training throughput (prompt + response tokens per second)", None),
]


def _window_mean(rows: List[dict], key: str, first: bool) -> float:
    """Mean of `key` over the first (or last) tenth of the rows that have it (at least one row): a single step
    is noisy."""
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    if not vals:
        return math.nan
    n = max(1, len(vals) // 10)
    part = vals[:n] if first else vals[-n:]
    return sum(part) / len(part)


def _trend(first: float, last: float, healthy: Optional[int]) -> str:
    if math.isnan(first) or math.isnan(last) or healthy is None:
        return ""
    scale = max(abs(first), abs(last), 1e-12)
    if abs(last - first) < 0.02 * scale:
        return "flat"
    if healthy == 0:
        return "toward 0 (healthy)" if abs(last) < abs(first) else "away from 0"
    rising = last > first
    return ("rising" if rising else "falling") + (" (healthy)" if rising == (healthy > 0) else "")


def summary(rows: List[dict]) -> List[Tuple[str, float, float, str, str]]:
    """(metric, start, end, trend, reading) for every diagnostic the run logged: start and end are means over the
    first and last tenth of the training steps."""
    train = [r for r in rows if r.get("kind") == "train"]
    out = []
    for key, reading, healthy in READINGS:
        a, b = _window_mean(train, key, True), _window_mean(train, key, False)
        if not (math.isnan(a) and math.isnan(b)):
            out.append((key, a, b, _trend(a, b, healthy), reading))
    return out


def accuracy_table(rows: List[dict]) -> List[Tuple[int, float, float]]:
    """(step, held-out accuracy, gap recovery so far) per evaluation; gap recovery is NaN without a teacher
    accuracy ahead of the starting student."""
    evals = [r for r in rows if r.get("kind") == "eval"]
    teacher = next((r["teacher_accuracy"] for r in evals if "teacher_accuracy" in r), math.nan)
    acc = [(r["step"], r[k]) for r in evals for k in r if k.startswith("accuracy_avg@")]
    if not acc:
        return []
    start = acc[0][1]
    gap = teacher - start
    return [(s, a, (a - start) / gap if gap > 0 else math.nan) for s, a in acc]


def _fmt(x) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        return f"{x:.4g}"
    return html.escape(str(x))


def _table(header: List[str], rows: List[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Optional[str], alt: str) -> str:
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def _token_html(tokens: List[str], rewards: List[float]) -> str:
    """The response token by token, shaded by the teacher's per-token reward log q - log p (red: the teacher
    disagrees; green: it prefers the token more than the student does)."""
    spans = []
    for t, r in zip(tokens, rewards):
        a = min(abs(r) / 5.0, 1.0) * 0.6
        colour = f"rgba(220,40,40,{a:.2f})" if r < 0 else f"rgba(40,160,60,{a:.2f})"
        spans.append(f'<span title="{r:+.3f}" style="background:{colour}">{html.escape(t)}</span>')
    return "".join(spans)


def _samples(run_dir: str, per_file: int = 3) -> str:
    files = sorted(glob.glob(os.path.join(run_dir, "samples", "step_*.jsonl")))
    if not files:
        return ""
    parts = []
    for path in sorted({files[0], files[-1]}):
        rows, _ = read_jsonl(path)
        for r in rows[:per_file]:
            shaded = _token_html(r.get("tokens", []), r.get("token_rewards", []))
            parts.append(f"<div class=sample><b>step {r.get('step')}</b> · answer {_fmt(r.get('answer'))} · "
                         f"extracted {_fmt(r.get('extracted'))} · reward {_fmt(r.get('reward'))}"
                         f"<pre>{html.escape(r.get('prompt', ''))}</pre><pre class=tokens>{shaded}</pre></div>")
    return ("<h2>Evaluation samples, first and last</h2><p>Each response token is shaded by the teacher's reward "
            "log q - log p (red: the teacher finds the token less likely than the student does; hover for the "
            "value).</p>" + "".join(parts))


CSS = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}img{max-width:100%}pre{white-space:pre-wrap;background:#f8f8f8;padding:6px;margin:4px 0}
.sample{margin:1em 0;border-left:3px solid #ccc;padding-left:8px}.warn{color:#a40}"""


def write_report(run_dir: str, out: Optional[str] = None) -> Dict[str, object]:
    """Write out (default RUN_DIR/report.html) and its PNGs (RUN_DIR/report/); returns {"html": path, "images":
    [paths], "skipped_rows": n}. Raises FileNotFoundError without metrics.jsonl and ImportError without
    matplotlib."""
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl: not an opdcore run folder (or it logged "
                                "nothing yet)")
    rows, skipped = read_jsonl(metrics_path)
    if not rows:
        raise FileNotFoundError(f"{metrics_path} holds no readable rows yet")
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError("opdcore report draws with matplotlib: pip install matplotlib (or opdcore[viz])") from e
    img_dir = os.path.join(run_dir, "report")
    os.makedirs(img_dir, exist_ok=True)
    images = {
        "accuracy": plot_accuracy(rows, os.path.join(img_dir, "accuracy.png")),
        "curves": plot_run(run_dir, os.path.join(img_dir, "curves.png"), positions=False),
        "positions": plot_positions(run_dir, os.path.join(img_dir, "positions.png")),
        "timing": plot_timing(rows, os.path.join(img_dir, "timing.png")),
    }
    config = {}
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    train = [r for r in rows if r.get("kind") == "train"]
    steps = max((r["step"] for r in train), default=0)
    m, lo = config.get("model", {}), config.get("loss", {})
    loss = ("dense " + lo["dense"] if lo.get("dense", "none") != "none" else
            "sampled-token" if lo.get("topk") == 0 else
            f"top-{lo.get('topk')} {'renormalised KL' if lo.get('renorm_kl') else 'reward-weighted'} "
            f"({lo.get('strategy')})") if lo else "?"
    acc = accuracy_table(rows)
    parts = [f"<h1>opdcore run report</h1><p><code>{html.escape(os.path.abspath(run_dir))}</code> · {steps} steps"
             f"{' of ' + str(config['train']['steps']) if 'train' in config else ''} · student "
             f"<code>{html.escape(str(m.get('student', '?')))}</code> · teacher "
             f"<code>{html.escape(str(m.get('teacher', '?')))}</code> · loss {html.escape(loss)}</p>"]
    if skipped:
        parts.append(f"<p class=warn>{skipped} unreadable row(s) in metrics.jsonl were skipped (a run killed "
                     f"mid-write).</p>")
    parts.append("<h2>Held-out accuracy and gap recovery</h2>")
    if acc:
        parts.append(_table(["step", "accuracy", "gap recovery (of the teacher's lead at step 0)"],
                            [list(a) for a in acc]))
    parts.append(_image(images["accuracy"], "held-out accuracy"))
    parts.append("<h2>Diagnostics: start → end</h2><p>Means over the first and last tenth of the steps (METHOD.md "
                 "section 3).</p>")
    parts.append(_table(["metric", "start", "end", "trend", "what it says"], [list(r) for r in summary(rows)]))
    parts.append("<h2>Every diagnostic over steps</h2>" + _image(images["curves"], "curves"))
    if images["positions"]:
        parts.append("<h2>By response position</h2><p>Student entropy per position and step (instability shows "
                     "first at the end of long responses), per-position curves at the first, middle and last "
                     "logged step, and the teacher continuation probe when it ran.</p>"
                     + _image(images["positions"], "positions"))
    probes = [r for r in rows if r.get("kind") == "probe"]
    if probes:
        cuts = sorted({k.split("@")[1] for r in probes for k in r if k.startswith("probe_advantage@")}, key=float)
        parts.append("<h3>Teacher continuation probe: teacher - student accuracy by cut depth</h3>" + _table(
            ["step"] + [f"cut {c}" for c in cuts],
            [[r["step"]] + [r.get(f"probe_advantage@{c}", math.nan) for c in cuts] for r in probes]))
    if images["timing"]:
        parts.append("<h2>Where the time and memory go</h2>" + _image(images["timing"], "timing"))
    parts.append(_samples(run_dir))
    if train:
        last = train[-1]
        parts.append(f"<h2>Every metric at step {last['step']}</h2>" + _table(
            ["metric", "value"], [[k, v] for k, v in sorted(last.items()) if k not in ("step", "kind")]))
    if config:
        parts.append("<h2>Settings</h2><pre>" + html.escape(json.dumps(config, indent=1)) + "</pre>")
    out = out or os.path.join(run_dir, "report.html")
    with open(out, "w", encoding="utf-8") as f:
        f.write(f"<!doctype html><html><head><meta charset=utf-8><title>opdcore report: "
                f"{html.escape(os.path.basename(os.path.abspath(run_dir)))}</title><style>{CSS}</style></head><body>"
                + "\n".join(p for p in parts if p) + "</body></html>")
    return {"html": out, "images": [p for p in images.values() if p], "skipped_rows": skipped}
