"""From evidence (collect.py) to a verdict and recommendations: METHOD.md section 4's two conditions (compatible
thinking patterns, a teacher that knows something new), the set-mass drift of section 2.3 and the limits of
section 4, each read from numbers measured on the student's own rollouts.

The thresholds are heuristics: the paper's successful runs start near 72% top-16 overlap with 0.97-0.99 overlap
mass; a teacher with no held-out lead has nothing to give. Each finding states its numbers, so a reader can judge
them against their own runs.
"""
from __future__ import annotations

import math
from typing import Dict, List

# compatibility: the initial top-k overlap ratio and the student's mass on S ∩ T
OVERLAP_GOOD, OVERLAP_LOW = 0.6, 0.4
MASS_GOOD, MASS_LOW = 0.9, 0.75
# novelty: the teacher's greedy held-out lead over the student
GAP_CLEAR, GAP_NONE = 0.10, 0.03
# the sequence mean reward's AUROC for correct vs incorrect responses
AUROC_INFORMATIVE, AUROC_WEAK = 0.65, 0.55
# set-mass drift: the reward-weighted top-k loss drains P_S where lbar > 0. lbar is the force on log P_S; the
# drift's share of the gradient is small while P_S ~ 1 and grows as P_S falls, so a large lbar is a risk even
# at P_S ~ 1 (the synthetic student starts at P_S 0.997, lbar 0.94, and collapses under that loss)
DRIFT_MASS, DRIFT_LBAR, DRIFT_LBAR_HIGH = 0.9, 0.05, 0.3
# responses: cut off too often; overlap deep in the response falling below this share of its early value, which
# argues for a length cap only for long responses (the paper: 3K-7K tokens worked, 10K-15K collapsed late)
TRUNCATED_HIGH, LATE_OVERLAP_DROP, LONG_RESPONSES = 0.3, 0.8, 4096

LOSS_NAMES = {"renorm_kl": "renormalised top-k KL", "tail_kl": "tail-aware top-k KL",
              "dense": "dense divergence", "reward_weighted": "reward-weighted top-k loss"}

VERDICTS = {
    "go": "OPD should work here",
    "go-with-care": "OPD can work here; read the findings below",
    "rescue-first": "the student and teacher think too differently: rescue first (cold start, aligned prompts)",
    "little-to-gain": "the teacher knows little the student does not: OPD has little to give",
}


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def judge(ev: Dict) -> Dict[str, object]:
    """{"verdict": key of VERDICTS, "summary": its words, "findings": [{aspect, level (good / warn / bad / info),
    text}], "recommendations": [str]} from collect()'s evidence."""
    tm, seq, acc, probe = ev["token_means"], ev["sequence"], ev.get("accuracy", {}), ev.get("probe", {})
    k = ev["k"]
    findings: List[Dict[str, str]] = []
    recs: List[str] = []

    def say(aspect, level, text):
        findings.append({"aspect": aspect, "level": level, "text": text})

    # 1. compatibility (METHOD.md 4.1)
    # both models must put their mass on the shared ids: a teacher that puts half of its probability elsewhere on
    # the student's own states thinks differently, however many ids the two top-k lists share
    ratio = tm.get("overlap_ratio", math.nan)
    mass = min(tm.get("overlap_mass_student", math.nan), tm.get("overlap_mass_teacher", math.nan))
    if ratio >= OVERLAP_GOOD and mass >= MASS_GOOD:
        compat = "good"
    elif ratio < OVERLAP_LOW or mass < MASS_LOW:
        compat = "bad"
    else:
        compat = "warn"
    say("compatibility", compat,
        f"top-{k} overlap ratio {ratio:.2f} (successful runs start near 0.72), overlap mass {mass:.3f} of p and "
        f"{tm.get('overlap_mass_teacher', math.nan):.3f} of q on S ∩ T, entropy gap "
        f"{tm.get('entropy_gap', math.nan):.3f} nats (H(p) {tm.get('student_entropy', math.nan):.3f}, H(q) "
        f"{tm.get('teacher_entropy', math.nan):.3f})")
    if compat == "bad":
        recs.append("Cold start first: `opdcore cold-start --teacher T --student S --prompts P` SFT-trains the "
                    "student on the teacher's filtered responses to half the prompts; OPD then runs on the rest.")
        recs.append("Teacher-aligned prompts: `opdcore select-prompts --aligned <the teacher's training prompts> "
                    "--other P --template <its instruction wording>` raises overlap without new data.")

    # 2. novelty (METHOD.md 4.2): held-out lead, the probe, the reward's AUROC
    gap = acc.get("teacher", math.nan) - acc.get("student", math.nan) if acc else math.nan
    if _nan(gap):
        novelty = "info"
        say("novelty", "info", "no held-out answers: the teacher's lead could not be measured (give prompts with "
                               "answers, or --eval-prompts)")
    else:
        novelty = "good" if gap >= GAP_CLEAR else "bad" if gap < GAP_NONE else "warn"
        say("novelty", novelty, f"greedy held-out accuracy: teacher {acc['teacher']:.3f}, student "
                                f"{acc['student']:.3f} (lead {gap:+.3f} on {acc.get('graded', 0):.0f} prompts); "
                                "OPD can at best close this gap")
    adv = sorted((float(key.split("@")[1]), v) for key, v in probe.items() if key.startswith("probe_advantage@"))
    if adv:
        words = ", ".join(f"{c:g}: {v:+.3f}" for c, v in adv)
        deep = [v for c, v in adv if c >= 0.5]
        first_cut = next((v for c, v in adv if c > 0), math.nan)
        if adv[0][0] == 0 and adv[0][1] >= GAP_CLEAR and first_cut <= 0:
            say("probe", "warn", f"continuation probe, teacher minus student accuracy by cut depth {{{words}}}: the "
                                 "teacher's lead vanishes as soon as it continues the student's own partial "
                                 "responses, so its knowledge does not carry over to the student's way of writing "
                                 "(METHOD.md 4.1)")
        else:
            early = deep and max(deep) <= 0.02 and adv[0][1] > GAP_NONE
            say("probe", "info", f"continuation probe, teacher minus student accuracy by cut depth {{{words}}}"
                + (": the teacher's lead lies in the first half of the student's responses (from there the "
                   "student finishes as well as the teacher)" if early else ""))
    auroc = seq.get("reward_auroc", math.nan)
    if _nan(auroc) and seq.get("graded_responses"):
        say("reward", "info", f"the reward's AUROC is undefined: {seq.get('sampled_accuracy', math.nan):.0%} of the "
                              "sampled responses are correct (it needs both correct and incorrect ones)")
    elif not _nan(auroc):
        level = "good" if auroc >= AUROC_INFORMATIVE else "warn" if auroc >= AUROC_WEAK else "bad"
        say("reward", level, f"AUROC of the sequence mean reward for correct vs incorrect responses {auroc:.3f} "
                             "(0.5: the teacher's reward does not tell them apart)")

    # 3. set-mass drift (METHOD.md 2.3)
    p_s, lbar, share = (tm.get("student_topk_mass", math.nan), tm.get("student_topk_lbar", math.nan),
                        tm.get("student_topk_drift_share", math.nan))
    drift = "bad" if lbar > DRIFT_LBAR_HIGH or (p_s < DRIFT_MASS and lbar > DRIFT_LBAR) else \
        "warn" if lbar > DRIFT_LBAR else "good"
    configured = ev.get("loss", "reward_weighted")  # the objective (ObjectiveSpec.loss): only this one drifts
    text = (f"the student's top-{k} holds P_S = {p_s:.3f} of its probability, lbar = {lbar:+.3f} (> 0: the "
            f"reward-weighted top-{k} loss lowers P_S, METHOD.md 2.3); the drift is {share:.0%} of that loss's "
            "gradient on the set's logits now, and grows as P_S falls")
    name = LOSS_NAMES.get(configured, configured)
    if configured == "reward_weighted":
        say("set-mass drift", drift, text)
        if drift == "bad":
            recs.append(f"Loss: loss.renorm_kl=true (the exact renormalised top-{k} KL), loss.tail_kl=true (the "
                        f"tail-aware top-{k} KL) or loss.topk=0 (sampled-token); the reward-weighted top-{k} loss "
                        f"would drain the student's top-{k} mass here."
                        + (" With overlap this low, prefer loss.tail_kl=true or loss.strategy=union: they reach "
                           "the teacher's tokens outside the student's top-k." if compat == "bad" else ""))
        elif compat != "bad":
            recs.append(f"Loss: the reward-weighted top-{k} loss (the paper's default) or sampled-token OPD "
                        "(loss.topk=0, as good in the paper at lower cost); loss.renorm_kl=true if P_S falls "
                        "during training.")
    else:
        say("set-mass drift", "info", text + f"; the configured loss ({name}) has no such term")
        if drift == "bad":
            recs.append(f"Loss: keep the {name}; the reward-weighted top-{k} loss would drain the student's "
                        f"top-{k} mass here.")
        drift = "good"
    if compat == "bad" and not any(r.startswith("Loss: loss.renorm_kl") for r in recs):
        recs.append("Loss: loss.strategy=union or loss.tail_kl=true, so the teacher's preferred tokens outside the "
                    "student's top-k get a gradient (the student's own set never reaches them).")
    recs.append(f"k: {k if k >= 4 else 16} (k >= 4 is enough; top-1 support is unstable)."
                + (f" A larger k raises P_S above {p_s:.2f}." if p_s < DRIFT_MASS else ""))

    # 4. responses: cut off, and where the teacher's signal fades
    trunc = seq.get("truncated_fraction", 0.0)
    if trunc > TRUNCATED_HIGH:
        say("truncation", "warn", f"{trunc:.0%} of the rollouts hit rollout.max_new_tokens={ev['max_new_tokens']}: "
                              "raise it, or these responses are scored without their ends")
    prof = ev.get("profiles", {})
    ov, tokens = prof.get("overlap_ratio", []), prof.get("tokens", [])
    filled = [(i, v) for i, (v, c) in enumerate(zip(ov, tokens)) if not _nan(v) and c >= 0.02 * sum(tokens)]
    if len(filled) >= 2 and filled[0][1] > 0:
        late = next((i for i, v in filled if v < LATE_OVERLAP_DROP * filled[0][1]), None)
        if late is None:
            say("length", "good", "the overlap ratio holds along the responses")
        else:
            cap = late * prof["bucket_width"]
            long = seq.get("response_length", 0.0) >= LONG_RESPONSES
            say("length", "warn" if long else "info",
                f"the overlap ratio falls from {filled[0][1]:.2f} at the start of the responses to below "
                f"{LATE_OVERLAP_DROP:.0%} of that from token {cap} on (mean response "
                f"{seq.get('response_length', 0.0):.0f} tokens)")
            if long:
                recs.append(f"Response length: the teacher's token reward degrades with depth in long responses; "
                            f"consider rollout.max_new_tokens near {max(cap, 1)} or a curriculum of growing "
                            "lengths.")

    if compat == "bad" and not (novelty == "bad"):
        verdict = "rescue-first"
    elif novelty == "bad":
        verdict = "little-to-gain"
    elif compat == "good" and novelty in ("good", "info") and drift != "bad":
        verdict = "go"
    else:
        verdict = "go-with-care"
    return {"verdict": verdict, "summary": VERDICTS[verdict], "findings": findings, "recommendations": recs}
