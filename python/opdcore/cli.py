"""The `opdcore` command: one entry point for the trainer and the toolkit around it.

    opdcore train [--config FILE|PRESET] [key=value ...]     on-policy distillation (also under torchrun)
    opdcore diagnose --student S --teacher T --prompts P   will OPD work here? a verdict before the compute
    opdcore report RUN_DIR                                 one HTML page of a run's diagnostics
    opdcore cold-start ... / opdcore select-prompts ...    the rescue recipes of METHOD.md section 4

Each subcommand lives in opdcore.commands and is imported only when it runs (the trainer's imports are heavy).
"""
from __future__ import annotations

import difflib
import importlib
import sys

# name -> (module in opdcore.commands, one line for the command list)
COMMANDS = {
    "train": ("train", "on-policy distillation (what examples/train.py runs; under torchrun: -m opdcore train)"),
    "diagnose": ("diagnose", "sample, score and judge a student/teacher pair before spending the compute"),
    "report": ("report", "one self-contained HTML page (and PNGs) of a run's metrics"),
    "cold-start": ("cold_start", "off-policy cold start: SFT on the teacher's filtered responses, then OPD"),
    "select-prompts": ("select_prompts", "teacher-aligned prompts: the teacher's wording and problems, deduplicated"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items())
    return (f"usage: opdcore COMMAND [ARGS ...]\n\nOn-policy distillation of language models.\n\ncommands:\n{rows}\n\n"
            f"`opdcore COMMAND --help` says more about each.")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"opdcore: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"opdcore.commands.{COMMANDS[name][0]}")
    return module.main(rest)
