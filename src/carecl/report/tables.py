"""Report tables: the summary CSV and the Markdown table, with their notes."""

from __future__ import annotations

import csv
import io
from typing import Sequence

from carecl.formatting import format_duration, format_number
from carecl.report.runs import ReportedRun


def _task_numbers(numbers: Sequence[int], shown: int = 10) -> str:
    """1, 2, 3 — or the first and last few of a long list."""
    numbers = [str(number) for number in numbers]
    return ", ".join(numbers if len(numbers) <= shown else numbers[:5] + ["…"] + numbers[-2:])


SUMMARY_COLUMNS = ("label", "run_dir", "tasks", "planned_tasks", "classes", "a_last", "average_accuracy",
                   "forgetting", "added_parameters", "wall_time_s", "evaluations", "last_evaluated_task",
                   "transfer", "task_average", "last_task_average")


def summary_row(run: ReportedRun) -> dict[str, str]:
    """The summary numbers of one run, as text, keyed by SUMMARY_COLUMNS (CSV precision)."""
    return {
        "label": run.label,
        "run_dir": str(run.path),
        "tasks": str(run.n_tasks),
        "planned_tasks": str(run.n_planned_tasks),
        "classes": "n/a" if run.n_classes is None else str(run.n_classes),
        "a_last": format_number(run.a_last, ".4f"),
        "average_accuracy": format_number(run.average_accuracy, ".4f"),
        "forgetting": format_number(run.forgetting, ".4f"),
        "added_parameters": "n/a" if run.added_parameters is None else str(run.added_parameters),
        "wall_time_s": format_number(run.wall_time_s, ".3f"),
        "evaluations": str(run.n_evaluations),
        "last_evaluated_task": str(run.evaluated_task_numbers[-1]),
        "transfer": format_number(run.transfer, ".4f"),
        "task_average": format_number(run.task_average, ".4f"),
        "last_task_average": format_number(run.last_task_average, ".4f"),
    }


def summary_csv(runs: Sequence[ReportedRun]) -> str:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary_row(run) for run in runs)
    return stream.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


# Marks Ā of runs evaluated after only some tasks; sparse_runs_note explains it.
SPARSE_MARK = "†"


def markdown_table(runs: Sequence[ReportedRun]) -> str:
    """One row per run; MTIL's Transfer / Avg / Last columns when some run evaluated tasks before learning them."""
    transfer = any(run.measures_transfer for run in runs)
    header = ["run", "directory", "tasks", "classes", "A_last (%)", "Ā (%)", "forgetting (points)",
              *(["Transfer (%)", "Avg (%)", "Last (%)"] if transfer else []), "added parameters", "wall time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for run in runs:
        tasks = str(run.n_tasks) if run.n_tasks == run.n_planned_tasks else f"{run.n_tasks} of {run.n_planned_tasks}"
        average = format_number(run.average_accuracy) + (f" {SPARSE_MARK}" if run.is_sparse else "")
        cells = [
            _md_escape(run.label),
            f"`{_md_escape(str(run.path))}`",
            tasks,
            "n/a" if run.n_classes is None else str(run.n_classes),
            format_number(run.a_last),
            average,
            format_number(run.forgetting),
            *([format_number(run.transfer), format_number(run.task_average), format_number(run.last_task_average)]
              if transfer else []),
            "n/a" if run.added_parameters is None else f"{run.added_parameters:,}",
            format_duration(run.wall_time_s),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sparse_runs_note(runs: Sequence[ReportedRun]) -> list[str]:
    """report.md lines, blank line last, on runs evaluated only every k tasks (none when all were dense)."""
    sparse = [run for run in runs if run.is_sparse]
    if not sparse:
        return []
    explanation = (f"{SPARSE_MARK} Evaluated only after some tasks (`eval.every_n_tasks`): Ā is the mean over those "
                   "evaluations, not the paper's Ā (the mean after every task), so it is not comparable with the Ā "
                   "of a run evaluated after each task; forgetting compares the evaluations, A_last is the last one.")
    lines = [explanation, ""]
    for run in sparse:
        tasks = "task" if run.n_evaluations == 1 else "tasks"
        line = (f"- {_md_escape(run.label)}: evaluated after {tasks} {_task_numbers(run.evaluated_task_numbers)} "
                f"({run.n_evaluations} of {run.n_tasks} learned)")
        last = int(run.evaluated_task_numbers[-1])
        lines.append(line + (f"; A_last is after task {last}" if last < run.n_tasks else ""))
    return lines + [""]


def _mean_of(costs, key: str) -> float:
    values = [float(cost[key]) for cost in costs if isinstance(cost.get(key), (int, float))]
    return float(sum(values) / len(values)) if values else float("nan")


def _task_seconds(cost: dict) -> float:
    return float(sum(cost.get("phase_seconds", {}).values()))


def cost_table(runs: Sequence[ReportedRun]) -> list[str]:
    """report.md lines: paper Table 6's columns for each run that recorded its costs (none otherwise)."""
    measured = [run for run in runs if run.costs]
    if not measured:
        return []
    header = ["run", "trainable / task (Pt, mean)", "added after the last task (Pa)", "training s / task (mean)",
              "inference ms / image (last evaluation)", "peak memory"]
    lines = ["## Cost", "", "Pt: parameters the optimiser trained in a task (mean over tasks); Pa: elements the "
             "learner saves after its last task (weights, buffers, statistics; not the frozen backbone); training "
             "time: every phase and the end-of-task work, without evaluation; inference: `predict` per test image, "
             "task-free; memory: CUDA's max allocated in the task (largest over tasks), or the process's peak "
             "resident set on CPU.", "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for run in measured:
        last = run.costs[-1]
        seconds = [_task_seconds(cost) for cost in run.costs]
        memory = max(int(cost.get("peak_memory_bytes", 0)) for cost in run.costs)
        kind = "GPU" if last.get("memory_kind") == "cuda_max_allocated" else "RSS"
        inference = next((ms for ms in reversed(run.inference_ms) if ms == ms), float("nan"))
        cells = [_md_escape(run.label), f"{_mean_of(run.costs, 'trainable_parameters'):,.0f}",
                 f"{int(last.get('added_parameters', 0)):,}", format_number(sum(seconds) / len(seconds)),
                 format_number(inference, ".3f"), f"{memory / 2**20:,.0f} MiB ({kind})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]
