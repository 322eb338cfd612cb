"""The config tree: YAML + overrides, validation before any model loads, --help."""
import subprocess
import sys

import pytest

from opdcore.commands import train as cli
from opdcore.config import ConfigError, Config, help_text, load_config, to_dict


def test_defaults_are_method_section_5():
    c = Config()
    assert (c.optim.lr, c.optim.betas, c.optim.weight_decay, c.optim.grad_clip) == (1e-6, (0.9, 0.999), 0.01, 1.0)
    assert (c.train.prompts_per_step, c.rollout.n, c.rollout.temperature, c.loss.topk) == (64, 4, 1.0, 16)
    assert (c.loss.strategy, c.loss.weight_mode, c.loss.aggregation) == ("student", "auto", "token-mean")
    assert c.rollout.max_new_tokens == 7168 and c.optim.schedule == "constant"


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("loss:\n  topk: 8\n  strategy: only_tch\noptim:\n  betas: [0.8, 0.95]\n"
                 "data:\n  chat_template_kwargs: {enable_thinking: false}\n")
    c = load_config(str(p), ("loss.topk=4", "optim.lr=3e-4", "train.steps=7", "model.tokenizer=null"))
    assert c.loss.topk == 4 and c.loss.strategy == "only_tch" and c.optim.betas == (0.8, 0.95)
    assert c.optim.lr == 3e-4 and isinstance(c.optim.lr, float) and c.train.steps == 7
    assert c.data.chat_template_kwargs == {"enable_thinking": False} and c.model.tokenizer is None
    assert to_dict(c)["loss"]["topk"] == 4


@pytest.mark.parametrize("overrides,match", [
    (("loss.topkk=3",), "unknown config key 'loss.topkk'; did you mean loss.topk"),
    (("loss.topk=abc",), "loss.topk expects int"),
    (("loss.topk=1.5",), "loss.topk expects int"),
    (("train.progress=2",), "train.progress expects bool"),
    (("loss.topk=-1",), "loss.topk must be >= 0"),
    (("rollout.engine=sglang",), "rollout.engine must be one of hf, vllm"),
    (("loss.strategy=both",), "loss.strategy must be one of"),
    (("loss.weight_mode=p",), "loss.weight_mode must be one of"),
    (("rollout.top_p=0",), r"rollout.top_p must be in \(0, 1\]"),
    (("optim.betas=[0.9]",), "optim.betas must be two values"),
    (("topk",), "must look like key=value"),
    (("model.student=Qwen/Qwen3-1.7B",), "data.train_path is required"),
    (("data.train_path=x.jsonl",), "model.student=synthetic builds its own task"),
    (("model.student=a", "data.train_path=x.jsonl"), "the same preset"),
    (("loss.topk=0", "loss.renorm_kl=true"), "renorm_kl needs loss.topk > 0"),
    (("loss.dense=kl",), "loss.dense must be one of none, forward_kl, reverse_kl, jsd"),
    (("loss.dense=jsd", "loss.dense_beta=1.0"), r"loss.dense_beta must be in \(0, 1\)"),
    (("loss.dense=jsd", "loss.renorm_kl=true"), "each choose the loss"),
    (("loss.tail_kl=true", "loss.renorm_kl=true"), "loss.renorm_kl and loss.tail_kl each choose the loss"),
    (("loss.topk=0", "loss.tail_kl=true"), "tail_kl needs loss.topk > 0"),
    (("diagnostics.position_buckets=0",), "diagnostics.position_buckets must be >= 1"),
    (("train.tensor_parallel=0",), "train.tensor_parallel must be >= 1"),
    (("diagnostics.probe_cuts=[0.5, 1.0]",), r"diagnostics.probe_cuts must be fractions in \[0, 1\)"),
    (("diagnostics.probe_cuts=[]",), r"diagnostics.probe_cuts must be fractions"),
    (("diagnostics.probe_every=-1",), "diagnostics.probe_every must be >= 0"),
    (("train.update_epochs=0",), "train.update_epochs must be >= 1"),
    (("rollout.hf_generate_sharded=true", "train.tensor_parallel=2"), "hf_generate_sharded needs"),
    (("train.mini_batches=0",), "train.mini_batches must be >= 1"),
    (("loss.ppo_clip=1.0",), r"loss.ppo_clip must be in \[0, 1\)"),
    (("loss.ppo_clip_high=-0.1",), "loss.ppo_clip_high must be >= 0"),
    (("loss.ppo_dual_clip=1.0",), r"loss.ppo_dual_clip must be > 1 \(0: off\)"),
])
def test_invalid_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(bad))
    bad.write_text("los:\n  topk: 3\n")
    with pytest.raises(ConfigError, match="unknown config section 'los'; did you mean 'loss'"):
        load_config(str(bad))


def test_help_lists_every_key():
    text = help_text()
    for key in ("model.student", "loss.topk", "optim.lr", "train.resume", "eval.every", "rollout.engine"):
        assert key in text
    out = subprocess.run([sys.executable, "examples/train.py", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "loss.log_ratio_clip = 0.0" in out.stdout


def test_cli_errors_before_loading_anything(capsys):
    assert cli.main(["loss.topk=x"]) == 2
    assert "config error: loss.topk expects int" in capsys.readouterr().err
    assert cli.main(["--nope"]) == 2


def test_synthetic_preset_applies_without_config():
    _, path, _ = cli.parse([])
    assert path == cli.SYNTHETIC_PRESET
    c = load_config(path)
    assert c.model.student == "synthetic" and c.optim.lr == 1e-3 and c.loss.log_ratio_clip == 5.0
    _, path, _ = cli.parse(["model.student=x"])
    assert path is None
