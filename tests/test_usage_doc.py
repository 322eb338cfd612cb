"""docs/USAGE.md's example runs as written."""
import os
import re

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "USAGE.md")


def test_usage_example_runs(capsys):
    with open(DOC) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], DOC, "exec"), {"__name__": "__usage__"})
    out = capsys.readouterr().out
    assert "overlap ratio" in out and "drift share" in out
