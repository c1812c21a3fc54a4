"""Plain-text summaries for the terminal."""

from __future__ import annotations

from carecl.formatting import format_number
from carecl.metrics import RunSummary


def _cell(value: float) -> str:
    return format_number(value, "6.2f", missing="   -  ")


# Wider matrices (long runs) are summarised by their last rows' accuracy instead.
MAX_TABLE_COLUMNS = 20


def accuracy_table(summary: RunSummary) -> str:
    """The accuracy matrix (rows: after task i; columns: task j's classes) and the headline numbers."""
    tasks = summary.evaluated_tasks or list(range(len(summary.top1_curve)))
    width = max((len(row) for row in summary.matrix), default=0)
    if width > MAX_TABLE_COLUMNS:
        lines = [f"top-1 after task {t + 1}: {a:.2f}" for t, a in zip(tasks[-5:], summary.top1_curve[-5:])]
    else:
        header = "after task | " + " ".join(f"  T{j + 1:<3}" for j in range(width)) + " |    all"
        lines = [header, "-" * len(header)]
        for task, row, top1 in zip(tasks, summary.matrix, summary.top1_curve):
            cells = " ".join(_cell(v) for v in row)
            lines.append(f"{task + 1:>10} | {cells} | {top1:6.2f}")
    lines.append(
        f"A_last {summary.a_last:.2f}   average incremental accuracy {summary.average_accuracy:.2f}   "
        f"forgetting {_cell(summary.forgetting).strip()}"
    )
    if summary.transfer == summary.transfer:  # not nan: tasks were also evaluated before being learned (MTIL)
        lines.append(f"MTIL: Transfer {summary.transfer:.2f}   Avg {summary.task_average:.2f}   "
                     f"Last {summary.last_task_average:.2f}   (columns right of the diagonal: before learning)")
    return "\n".join(lines)
