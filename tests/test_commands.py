"""The `opdcore` command: the dispatcher, every subcommand's --help and bad arguments, `opdcore diagnose` and
`opdcore report` end to end on tiny real models, and the verdict rules on crafted evidence."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest

from opdcore import cli
from opdcore.diagnosis import VERDICTS, judge
from tiny_setup import make_tiny_run_dir, overrides, run

OPDCORE = os.path.join(os.path.dirname(sys.executable), "opdcore")


def _opdcore(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([OPDCORE, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run_dir(tmp_path_factory.mktemp("tiny"))


def test_console_script_lists_the_commands():
    r = _opdcore("--help")
    assert r.returncode == 0, r.stderr
    for name in cli.COMMANDS:
        assert name in r.stdout


def test_dispatcher_errors(capsys):
    assert cli.main([]) == 2
    assert "usage: opdcore COMMAND" in capsys.readouterr().err
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian' (did you mean train?)" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    try:
        code = cli.main([name, "--help"])
    except SystemExit as e:  # argparse's --help
        code = e.code
    assert code == 0
    out = capsys.readouterr().out
    assert f"opdcore {name}" in out


@pytest.mark.parametrize("argv, message", [
    (["diagnose", "--student", "s"], "missing --teacher, --prompts"),
    (["diagnose", "--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["diagnose", "--bogus"], "unrecognised argument '--bogus'"),
    (["diagnose", "--n", "0"], "--n and --max-new-tokens >= 1"),
    (["report"], "the following arguments are required: run_dir"),
    (["select-prompts", "--aligned", "a"], "required"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_diagnose_refuses_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["diagnose"]) == 2
    assert "runs in one process" in capsys.readouterr().err


def test_diagnose_config_errors_exit_2(capsys):
    assert cli.main(["diagnose", "loss.strategy=nope"]) == 2
    assert "config error: loss.strategy must be one of" in capsys.readouterr().err


def test_diagnose_tiny_pair(tiny, tmp_path):
    """On real (tiny, random) models: a verdict with its numbers, diagnosis.json (strict JSON) and the plot."""
    out = tmp_path / "diag"
    r = _opdcore("diagnose", "--student", tiny["student"], "--teacher", tiny["teacher"], "--prompts", tiny["train"],
                 "--eval-prompts", tiny["eval"], "--num-prompts", 8, "--n", 2, "--k", 8, "--max-new-tokens", 12,
                 "--eval-max", 6, "--probe-prompts", 4, "--out", out, "--quiet", "train.threads=1",
                 "train.prompts_per_step=4", "train.micro_batch_tokens=128")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "verdict: " in r.stdout and "recommendations:" in r.stdout
    with open(out / "diagnosis.json") as f:
        rep = json.load(f, parse_constant=lambda c: pytest.fail(f"{c} in diagnosis.json"))
    assert rep["verdict"] in VERDICTS and rep["recommendations"]
    ev = rep["evidence"]
    assert ev["prompts"] == 8 and ev["responses"] == 16 and ev["k"] == 8
    tm = ev["token_means"]
    for key in ("overlap_ratio", "overlap_mass_student", "entropy_gap", "student_topk_mass", "student_topk_lbar",
                "student_topk_drift_share", "sampled_token_reward"):
        assert tm[key] is not None, key
    assert 0 <= tm["overlap_ratio"] <= 1 and 0 < tm["student_topk_mass"] <= 1 + 1e-6
    assert sum(ev["profiles"]["tokens"]) == ev["tokens"]
    assert set(ev["accuracy"]) >= {"student", "teacher"} and len(ev["sequence"]["rbar"]) == 16
    assert {f"probe_advantage@{c:g}" for c in (0.0, 0.25, 0.5, 0.75)} <= set(ev["probe"])
    assert (out / "diagnose.png").stat().st_size > 10_000
    assert not (out / "metrics.jsonl").exists()  # a diagnosis is not a run
    # a second diagnosis into the same folder is fine; a missing prompt file is one clear error
    r = _opdcore("diagnose", "--student", tiny["student"], "--teacher", tiny["teacher"], "--prompts",
                 tmp_path / "missing.jsonl", "--out", out, "--quiet")
    assert r.returncode == 2 and "error:" in r.stderr and "missing.jsonl" in r.stderr


def test_report_of_a_tiny_run(tiny, tmp_path):
    out = tmp_path / "run"
    r = run(overrides(tiny, out, **{"eval.every": 2, "diagnostics.probe_every": 2, "diagnostics.probe_prompts": 4}))
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "tra')  # a row cut short by a kill
    r = _opdcore("report", out)
    assert r.returncode == 0, r.stderr[-3000:]
    page = (out / "report.html").read_text()
    for section in ("Held-out accuracy and gap recovery", "Diagnostics: start → end", "Every diagnostic over steps",
                    "By response position", "Teacher continuation probe", "Where the time and memory go",
                    "Evaluation samples", "Settings", "overlap_ratio", "1 unreadable row(s)"):
        assert section in page, section
    images = sorted(os.listdir(out / "report"))
    assert images == ["accuracy.png", "curves.png", "positions.png", "timing.png"]
    assert page.count("data:image/png;base64,") == len(images)  # self-contained
    assert "<script" not in page
    r = _opdcore("report", tmp_path / "nothing")
    assert r.returncode == 2 and "holds no metrics.jsonl" in r.stderr


def test_report_escapes_what_a_run_wrote(tmp_path):
    """Prompts and responses are data, not markup."""
    from opdcore.trainer.report import write_report

    os.makedirs(tmp_path / "samples")
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 1, "kind": "train", "loss": 0.5, "overlap_ratio": 0.7}) + "\n")
    with open(tmp_path / "samples" / "step_000000.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "prompt": "<script>alert(1)</script>", "tokens": ["<b>"],
                            "token_rewards": [-1.0], "answer": "<i>"}) + "\n")
    res = write_report(str(tmp_path))
    page = open(res["html"]).read()
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;" in page


# ---- the verdict rules on crafted evidence ----------------------------------------------------------------------

EVIDENCE = {
    "k": 16, "max_new_tokens": 512,
    "token_means": {"overlap_ratio": 0.72, "overlap_mass_student": 0.97, "overlap_mass_teacher": 0.98,
                    "entropy_gap": 0.2, "student_entropy": 0.5, "teacher_entropy": 0.4, "student_topk_mass": 0.99,
                    "student_topk_lbar": 0.02, "student_topk_drift_share": 0.03},
    "sequence": {"reward_auroc": 0.75, "truncated_fraction": 0.05, "response_length": 300.0,
                 "graded_responses": 100, "sampled_accuracy": 0.4},
    "accuracy": {"student": 0.4, "teacher": 0.7, "graded": 128},
    "probe": {"probe_advantage@0": 0.3, "probe_advantage@0.5": 0.1},
    "profiles": {"bucket_width": 64, "tokens": [100] * 8, "overlap_ratio": [0.75] * 8},
}


def _with(**changes):
    ev = copy.deepcopy(EVIDENCE)
    for path, value in changes.items():
        section, key = path.split("__")
        ev[section][key] = value
    return ev


def _levels(res):
    return {f["aspect"]: f["level"] for f in res["findings"]}


def test_verdict_go():
    res = judge(EVIDENCE)
    assert res["verdict"] == "go" and res["summary"] == VERDICTS["go"]
    assert _levels(res)["compatibility"] == "good" and _levels(res)["set-mass drift"] == "good"
    assert any("reward-weighted top-16 loss" in r for r in res["recommendations"])


def test_verdict_incompatible_pair_gets_the_rescues():
    res = judge(_with(token_means__overlap_ratio=0.3))
    assert res["verdict"] == "rescue-first"
    text = " ".join(res["recommendations"])
    assert "opdcore cold-start" in text and "opdcore select-prompts" in text and "loss.strategy=union" in text


def test_verdict_teacher_mass_off_the_shared_ids_is_incompatible():
    """The top-k lists may share most ids while the teacher puts its probability elsewhere (the phenomenology's
    other-notation teacher: q mass 0.505 on S ∩ T); and a lead that vanishes at the first probe cut says so."""
    res = judge(_with(token_means__overlap_mass_teacher=0.5))
    assert _levels(res)["compatibility"] == "bad" and res["verdict"] == "rescue-first"
    ev = _with()
    ev["probe"] = {"probe_advantage@0": 0.88, "probe_advantage@0.25": -0.06, "probe_advantage@0.5": -0.06}
    assert _levels(judge(ev))["probe"] == "warn"


def test_verdict_teacher_without_a_lead():
    res = judge(_with(accuracy__teacher=0.41))
    assert res["verdict"] == "little-to-gain" and _levels(res)["novelty"] == "bad"


def test_verdict_set_mass_drift():
    """A large lbar is a risk even at P_S ~ 1 (the synthetic student: 0.997, +0.94); P_S < 0.9 with a modest one
    too; a small positive lbar only warns."""
    for changes in ({"token_means__student_topk_lbar": 0.9}, {"token_means__student_topk_mass": 0.8,
                                                                 "token_means__student_topk_lbar": 0.1}):
        res = judge(_with(**changes))
        assert _levels(res)["set-mass drift"] == "bad" and res["verdict"] == "go-with-care"
        assert any("loss.renorm_kl=true" in r for r in res["recommendations"])
    assert _levels(judge(_with(token_means__student_topk_lbar=0.1)))["set-mass drift"] == "warn"


def test_verdict_drift_under_a_loss_without_it():
    """A configured renormalised KL has no drift term: the risk is said, the verdict is not lowered, and the
    recommendation is to keep that loss."""
    res = judge({**_with(token_means__student_topk_lbar=0.9), "loss": "renorm_kl"})
    assert _levels(res)["set-mass drift"] == "info" and res["verdict"] == "go"
    assert any("keep the renormalised top-k KL" in r for r in res["recommendations"])


def test_verdict_lengths():
    late_drop = [0.75, 0.75, 0.7, 0.5, 0.5, 0.5, 0.5, 0.5]
    short = judge(_with(profiles__overlap_ratio=late_drop))
    assert _levels(short)["length"] == "info" and not any("Response length" in r for r in short["recommendations"])
    long = judge(_with(profiles__overlap_ratio=late_drop, sequence__response_length=6000.0))
    assert _levels(long)["length"] == "warn"
    assert any("rollout.max_new_tokens near 192" in r for r in long["recommendations"])
    cut = judge(_with(sequence__truncated_fraction=0.5))
    assert any("hit rollout.max_new_tokens=512" in f["text"] for f in cut["findings"])


def test_verdict_without_answers():
    res = judge(_with(accuracy__teacher=math.nan, sequence__reward_auroc=math.nan, sequence__sampled_accuracy=0.0))
    assert _levels(res)["novelty"] == "info" and _levels(res)["reward"] == "info"
    assert res["verdict"] == "go"
