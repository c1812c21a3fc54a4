"""Plain-text summaries for the terminal."""

from __future__ import annotations

import math

from carecl.metrics import RunSummary


def _cell(value: float) -> str:
    return "   -  " if value is None or math.isnan(value) else f"{value:6.2f}"


def accuracy_table(summary: RunSummary) -> str:
    """The accuracy matrix (rows: after task i; columns: task j's classes) and the headline numbers."""
    n = len(summary.top1_curve)
    header = "after task | " + " ".join(f"  T{j + 1:<3}" for j in range(n)) + " |    all"
    lines = [header, "-" * len(header)]
    for i, row in enumerate(summary.matrix):
        cells = " ".join(_cell(v) for v in row)
        lines.append(f"{i + 1:>10} | {cells} | {summary.top1_curve[i]:6.2f}")
    lines.append(
        f"A_last {summary.a_last:.2f}   average incremental accuracy {summary.average_accuracy:.2f}   "
        f"forgetting {_cell(summary.forgetting).strip()}"
    )
    return "\n".join(lines)
