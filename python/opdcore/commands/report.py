"""`opdcore report RUN_DIR [--out FILE]`: one self-contained HTML page of a run (every image inlined, so it can be
mailed or attached to an issue) and its PNGs in RUN_DIR/report/."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="opdcore report", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("run_dir", help="a run's train.output_dir (holds metrics.jsonl)")
    p.add_argument("--out", help="the HTML file (default: RUN_DIR/report.html)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from opdcore.trainer.report import write_report

    try:
        res = write_report(args.run_dir, args.out)
    except (FileNotFoundError, ImportError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {res['html']} ({len(res['images'])} figures in it)")
    return 0
