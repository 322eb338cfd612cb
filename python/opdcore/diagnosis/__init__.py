"""`opdcore diagnose`: will OPD work for this student, teacher and prompts? Evidence from the student's own
rollouts (collect), judged against METHOD.md sections 2.3-4 (verdict), drawn (plot)."""
from opdcore.diagnosis.verdict import VERDICTS, judge

__all__ = ["VERDICTS", "judge"]
