"""`carecl report`: plots, a Markdown summary and a CSV that compare run directories.

Reads what a run wrote (config.yaml, metrics.json, learner.safetensors) and never needs torch
or a display: figures are plain matplotlib `Figure`s saved as PNG and SVG.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from carecl.metrics import forgetting
from carecl.runs.directory import CONFIG_FILE, METRICS_JSON, STATE_FILE, RunDirectoryError

log = logging.getLogger("carecl")

REPORT_FILE = "report.md"
SUMMARY_CSV = "summary.csv"
CURVES_STEM = "accuracy_curves"
DPI = 150
# Above this many tasks a heatmap cell is too small to hold its number.
MAX_ANNOTATED_TASKS = 20
# At most this many markers per curve, so 300-task runs stay lines rather than smudges.
MAX_MARKERS_PER_CURVE = 25
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


class ReportError(RunDirectoryError):
    """A run directory cannot be reported (metrics missing or unreadable); the message names the path."""


# --------------------------------------------------------------------------- reading runs


@dataclass(frozen=True)
class RunSettings:
    """The few config values that name a run in tables and legends."""

    method: str = "?"
    dataset: str = "?"
    init_cls: int | None = None
    increment: int | None = None
    seed: int | None = None

    @property
    def label(self) -> str:
        return f"{self.method} · {self.dataset} {self.split_name}".strip()

    @property
    def split_name(self) -> str:
        if self.init_cls is None or self.increment is None:
            return ""
        # The CaRE/PILOT convention: "B0" means the first task is as large as the others.
        base = 0 if self.init_cls == self.increment else self.init_cls
        return f"B{base} Inc{self.increment}"


@dataclass(frozen=True)
class RunRecord:
    """One run directory, read and checked: everything the report shows about it.

    A run evaluates after every task (E = T evaluations) or, with `eval.every_n_tasks`, after some:
    curve and matrix rows are per evaluation, `evaluated_tasks` says after which task each ran.
    """

    path: Path
    settings: RunSettings
    label: str
    top1_curve: np.ndarray  # (E,) top-1 accuracy on all seen classes at each evaluation
    matrix: np.ndarray  # (E, G): accuracy on task j's classes at evaluation i, nan where j was not learned yet
    evaluated_tasks: np.ndarray  # (E,) 0-based index of the task after which each evaluation ran
    n_tasks: int  # tasks learned (finished), evaluated or not
    task_sizes: tuple[int, ...]  # classes per task of the whole scenario (empty when not recorded)
    wall_time_s: float  # nan when not recorded
    added_parameters: int | None  # elements in learner.safetensors; None when the file is absent

    @property
    def n_evaluations(self) -> int:
        return len(self.top1_curve)

    @property
    def is_sparse(self) -> bool:
        """Evaluated after only some of its learned tasks (eval.every_n_tasks > 1, or 0)."""
        return self.n_evaluations < self.n_tasks

    @property
    def evaluated_task_numbers(self) -> np.ndarray:
        """1-based task number of each evaluation: the x position of each curve point."""
        return self.evaluated_tasks + 1

    @property
    def n_planned_tasks(self) -> int:
        return max(len(self.task_sizes), self.n_tasks)

    @property
    def classes_at_evaluations(self) -> np.ndarray | None:
        """Number of classes seen at each evaluation, when the task sizes are known."""
        if len(self.task_sizes) < self.n_tasks:
            return None
        return np.cumsum(self.task_sizes)[self.evaluated_tasks]

    @property
    def n_classes(self) -> int | None:
        """Classes of the tasks learned, when the task sizes are known."""
        if len(self.task_sizes) < self.n_tasks:
            return None
        return int(np.sum(self.task_sizes[: self.n_tasks]))

    @property
    def a_last(self) -> float:
        return float(self.top1_curve[-1])

    @property
    def average_accuracy(self) -> float:
        """Ā as metrics.json defines it: the mean over evaluations (over every task only for dense runs)."""
        return float(np.mean(self.top1_curve))

    @property
    def forgetting(self) -> float:
        return forgetting(self.matrix)

    @property
    def forgetting_per_group(self) -> np.ndarray:
        return forgetting_per_group(self.matrix)


def forgetting_per_group(matrix: np.ndarray) -> np.ndarray:
    """For each task group but the last column: best accuracy at an earlier evaluation minus accuracy at
    the last one, as `carecl.metrics.forgetting` averages them; nan for a group no earlier evaluation measured."""
    drops = np.full(max(matrix.shape[1] - 1, 0), np.nan)
    earlier, last = matrix[:-1], matrix[-1]
    for j in range(len(drops)):
        measured = earlier[:, j][~np.isnan(earlier[:, j])]
        if len(measured):
            drops[j] = measured.max() - last[j]
    return drops


def _as_float(value: Any) -> float:
    """JSON null stands for NaN in carecl's metrics files."""
    return float("nan") if value is None else float(value)


def read_metrics_document(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METRICS_JSON
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory: expected a carecl run directory")
    if not path.is_file():
        raise ReportError(f"{path} not found: {run_dir} has no metrics yet (not a carecl run, or no task finished)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{path} is unreadable: {error}") from None
    if not isinstance(document, dict):
        raise ReportError(f"{path}: expected a JSON object, found {type(document).__name__}")
    return document


def curve_and_matrix(document: dict[str, Any], path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-1 curve (E,), accuracy matrix (E, G) and the 0-based task of each evaluation (E,), from
    `summary` (or, failing that, from the per-task records); G = task groups learned by the last evaluation."""
    summary, tasks = document.get("summary") or {}, document.get("tasks") or []
    if not isinstance(summary, dict) or not isinstance(tasks, list):
        raise ReportError(f"{path}: expected summary to be an object and tasks a list")
    if not ("top1_curve" in summary and "matrix" in summary) and not tasks:
        raise ReportError(f"{path}: neither summary.top1_curve/summary.matrix nor tasks[] recorded")
    try:
        if "top1_curve" in summary and "matrix" in summary:
            curve = [_as_float(v) for v in summary["top1_curve"]]
            rows = [[_as_float(v) for v in row] for row in summary["matrix"]]
        else:
            curve = [_as_float(task["top1"]) for task in tasks]
            rows = [[_as_float(v) for v in task["group_accuracy"]] for task in tasks]
    except (TypeError, ValueError, KeyError) as error:
        raise ReportError(f"{path}: malformed accuracy record ({type(error).__name__}: {error})") from None
    n = len(curve)
    if n == 0:
        finished = document.get("wall_time_s")
        if isinstance(finished, list) and finished:
            raise ReportError(f"{path}: {len(finished)} task(s) finished but none evaluated yet "
                              "(eval.every_n_tasks evaluates after every n-th task and the last)")
        raise ReportError(f"{path}: no task has been evaluated yet (empty top1_curve)")
    if len(rows) != n:
        raise ReportError(f"{path}: accuracy matrix has {len(rows)} rows for {n} evaluated tasks")
    evaluated, source = evaluated_task_indices(summary, tasks, n, path)
    n_groups = int(evaluated[-1]) + 1
    matrix = np.full((n, n_groups), np.nan)
    for i, (task, row) in enumerate(zip(evaluated, rows)):
        if len(row) > n_groups:
            after = f"after task {n_groups} by {source}" if source else "no evaluated_tasks recorded: one per task"
            raise ReportError(f"{path}: accuracy matrix row {i} has {len(row)} columns, more than the {n_groups} "
                              f"task groups learned at the last evaluation ({after})")
        # Only groups 0..task are meaningful: later tasks were not learned yet at this evaluation.
        matrix[i, : min(len(row), task + 1)] = row[: task + 1]
    return np.array(curve), matrix, evaluated


def evaluated_task_indices(summary: dict[str, Any], tasks: list[Any], n: int,
                           path: Path) -> tuple[np.ndarray, str | None]:
    """0-based task of each of the n evaluations and where it was read: summary.evaluated_tasks, else
    tasks[i].task, else (None) 0..n-1, as metrics written before eval.every_n_tasks evaluated every task."""
    if "evaluated_tasks" in summary:
        source, values = "summary.evaluated_tasks", summary["evaluated_tasks"]
    elif len(tasks) == n and all(isinstance(task, dict) and "task" in task for task in tasks):
        source, values = "tasks[].task", [task["task"] for task in tasks]
    else:
        return np.arange(n), None
    if not isinstance(values, list) or len(values) != n:
        found = f"{len(values)} entries" if isinstance(values, list) else f"a {type(values).__name__}"
        raise ReportError(f"{path}: {source} has {found} for the {n} evaluations of top1_curve")
    for i, value in enumerate(values):
        if type(value) is not int or value < 0 or (i > 0 and value <= values[i - 1]):
            raise ReportError(f"{path}: {source}[{i}] is {value!r}: expected increasing 0-based task indices")
    return np.array(values, dtype=int), source


def read_settings(run_dir: Path) -> RunSettings:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        log.warning("%s not found: the run is labelled by its directory name", path)
        return RunSettings(method=run_dir.resolve().name)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ReportError(f"{path} is unreadable: {error}") from None
    if not isinstance(config, dict):
        raise ReportError(f"{path}: expected a mapping of config sections")
    data, method = config.get("data") or {}, config.get("method") or {}
    return RunSettings(
        method=str(method.get("name", "?")),
        dataset=str(data.get("dataset", "?")),
        init_cls=data.get("init_cls"),
        increment=data.get("increment"),
        seed=config.get("seed"),
    )


def count_saved_elements(run_dir: Path) -> int | None:
    """Elements in learner.safetensors (read from its header only); None when the run saved none."""
    from safetensors import safe_open

    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as state:
            return sum(math.prod(state.get_slice(name).get_shape()) for name in state.keys())
    except Exception as error:  # noqa: BLE001 - safetensors raises its own (rust) error types
        raise ReportError(f"{path} is unreadable: {error}") from None


def load_run(run_dir: str | Path) -> RunRecord:
    run_dir = Path(run_dir)
    document = read_metrics_document(run_dir)
    path = run_dir / METRICS_JSON
    curve, matrix, evaluated_tasks = curve_and_matrix(document, path)
    try:
        wall_times = [_as_float(t) for t in document.get("wall_time_s") or []]  # one per finished task
        task_sizes = tuple(int(size) for size in document.get("task_sizes") or [])
    except (TypeError, ValueError) as error:
        raise ReportError(f"{path}: malformed wall_time_s or task_sizes "
                          f"({type(error).__name__}: {error})") from None
    settings = read_settings(run_dir)
    return RunRecord(
        path=run_dir,
        settings=settings,
        label=settings.label,
        top1_curve=curve,
        matrix=matrix,
        evaluated_tasks=evaluated_tasks,
        n_tasks=max(len(wall_times), int(evaluated_tasks[-1]) + 1),
        task_sizes=task_sizes,
        wall_time_s=float(np.sum(wall_times)) if wall_times else float("nan"),
        added_parameters=count_saved_elements(run_dir),
    )


def with_unique_labels(runs: Sequence[RunRecord]) -> list[RunRecord]:
    """Runs that share a label (e.g. several seeds) get the seed, then the directory name, appended."""
    suffixes = (lambda run, i: f"seed {run.settings.seed}", lambda run, i: run.path.resolve().name, lambda run, i: f"#{i + 1}")
    runs = list(runs)
    for suffix in suffixes:
        counts = Counter(run.label for run in runs)
        runs = [replace(run, label=f"{run.label} · {suffix(run, i)}") if counts[run.label] > 1 else run
                for i, run in enumerate(runs)]
    return runs


# --------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class RunStyle:
    color: Any
    marker: str


def run_styles(n_runs: int) -> list[RunStyle]:
    from matplotlib import colormaps

    colors = colormaps["tab10"].colors
    return [RunStyle(colors[i % len(colors)], MARKERS[i % len(MARKERS)]) for i in range(n_runs)]


def save_figure(figure: Any, output: Path, stem: str) -> Path:
    """PNG for viewing and embedding, SVG for papers; returns the PNG path."""
    png = output / f"{stem}.png"
    figure.savefig(png, dpi=DPI, bbox_inches="tight")
    figure.savefig(output / f"{stem}.svg", bbox_inches="tight")
    return png


def accuracy_floor(values: np.ndarray) -> float:
    """An axis or colour-scale floor a little under the lowest accuracy, on a multiple of 10."""
    lowest = float(np.nanmin(values)) if np.isfinite(values).any() else 0.0
    return min(90.0, max(0.0, 10.0 * math.floor((lowest - 2.0) / 10.0)))


def integer_ticks(axis: Any, n: int, max_ticks: int = 12) -> None:
    """Every integer tick for short axes, a thinned 'nice' subset for long ones."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    if n <= 20:
        axis.set_major_locator(FixedLocator(range(1, n + 1)))
    else:
        axis.set_major_locator(MaxNLocator(nbins=max_ticks, integer=True, min_n_ticks=3))


def curve_x(run: RunRecord, by_classes: bool) -> np.ndarray:
    """Where each evaluation sits on the curves' x axis: classes seen, or the 1-based task number."""
    return run.classes_at_evaluations if by_classes else run.evaluated_task_numbers


def plot_accuracy_curves(runs: Sequence[RunRecord], styles: Sequence[RunStyle], output: Path) -> Path:
    """Top-1 accuracy at each evaluation, every run overlaid (in the spirit of CaRE's Figure 1).

    x is the task number (or classes seen) of each evaluation, so runs evaluated every k tasks share
    the axis of runs evaluated after each task; markers sit on measured points only.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    by_classes = all(run.classes_at_evaluations is not None for run in runs)
    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    axes = figure.add_subplot()
    for run, style in zip(runs, styles):
        sparse_note = f" (evaluated after {run.n_evaluations} of {run.n_tasks} tasks)" if run.is_sparse else ""
        label = run.label + sparse_note
        axes.plot(curve_x(run, by_classes), run.top1_curve, label=label, color=style.color, marker=style.marker,
                  markersize=5, linewidth=1.8, clip_on=False,
                  markevery=max(1, math.ceil(run.n_evaluations / MAX_MARKERS_PER_CURVE)))
    axes.set_xlabel("number of classes seen" if by_classes else "task (number of tasks learned)")
    axes.set_ylabel("top-1 accuracy on all seen classes (%)")
    axes.set_title("Top-1 accuracy after each task")
    axes.set_ylim(accuracy_floor(np.concatenate([run.top1_curve for run in runs])), 100)
    axes.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    axes.grid(True, alpha=0.35)
    if len(runs) <= 4:
        axes.legend(loc="best", fontsize="small", framealpha=0.9)
    else:
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", borderaxespad=0)
    return save_figure(figure, output, CURVES_STEM)


def _annotate_cells(axes: Any, matrix: np.ndarray, floor: float) -> None:
    small = max(matrix.shape) <= 10
    for (i, j), value in np.ndenumerate(matrix):
        if not math.isnan(value):
            text = f"{value:.1f}" if small else f"{value:.0f}"
            # The lower half of viridis is dark and needs light text.
            axes.text(j + 1, i + 1, text, ha="center", va="center", fontsize=8 if small else 6.5,
                      color="white" if value < (floor + 100.0) / 2 else "black")


def heatmap_side(n_cells: int) -> float:
    """Inches along one heatmap axis: room for cell numbers up to MAX_ANNOTATED_TASKS, no more beyond."""
    return min(9.0, max(4.5, 0.35 * n_cells + 2.0)) if n_cells <= MAX_ANNOTATED_TASKS else 6.5


def plot_accuracy_matrix(run: RunRecord, output: Path, stem: str) -> Path:
    """Heatmap: row i = the evaluation after task t_i (every task for dense runs), column j = task j's classes."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    n_rows, n_columns = run.matrix.shape
    figure = Figure(figsize=(heatmap_side(n_columns) + 1.0, heatmap_side(n_rows)), layout="constrained")
    axes = figure.add_subplot()
    colormap = colormaps["viridis"].with_extremes(bad="white")
    # Scale colours from just under the lowest cell: a 0-100 scale paints 80 and 92 the same green.
    floor = accuracy_floor(run.matrix)
    # Cell centres at 1..n so ticks read as task numbers; sparse runs have fewer rows than columns.
    image = axes.imshow(np.ma.masked_invalid(run.matrix), cmap=colormap, vmin=floor, vmax=100,
                        extent=(0.5, n_columns + 0.5, n_rows + 0.5, 0.5), interpolation="nearest",
                        aspect="equal" if n_rows == n_columns else "auto")
    if max(n_rows, n_columns) <= MAX_ANNOTATED_TASKS:
        _annotate_cells(axes, run.matrix, floor)
    integer_ticks(axes.xaxis, n_columns)
    integer_ticks(axes.yaxis, n_rows)
    # Row r is labelled with the task it followed (r itself when every task was evaluated).
    axes.yaxis.set_major_formatter(FuncFormatter(lambda y, _: _row_task_label(run.evaluated_task_numbers, y)))
    axes.set_xlabel("evaluated on the classes of task j")
    axes.set_ylabel("after learning task i")
    axes.set_title(f"Accuracy matrix · {run.label}\n" + headline(run), fontsize="medium")
    figure.colorbar(image, ax=axes, label="top-1 accuracy (%)", shrink=0.85)
    return save_figure(figure, output, stem)


def _row_task_label(task_numbers: np.ndarray, y: float) -> str:
    row = round(y)
    return str(task_numbers[row - 1]) if abs(y - row) < 1e-6 and 1 <= row <= len(task_numbers) else ""


def plot_forgetting(run: RunRecord, style: RunStyle, output: Path, stem: str) -> Path | None:
    """Bars per old task group: best earlier accuracy minus final accuracy (groups an earlier evaluation
    measured). None when there is none (a single evaluation)."""
    from matplotlib.figure import Figure

    drops = run.forgetting_per_group
    measured = ~np.isnan(drops)
    if not measured.any():
        return None
    groups = np.arange(1, len(drops) + 1)
    many = len(drops) > 60
    figure = Figure(figsize=(7.5, 4.0), layout="constrained")
    axes = figure.add_subplot()
    axes.set_axisbelow(True)
    axes.bar(groups[measured], drops[measured], width=1.0 if many else 0.75, color=style.color, linewidth=0)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.axhline(run.forgetting, color="0.3", linestyle="--", linewidth=1.2, label=f"mean forgetting {_number(run.forgetting)}")
    integer_ticks(axes.xaxis, len(drops))
    axes.set_xlim(0.4, len(drops) + 0.6)
    measured_groups = "those measured at an earlier evaluation" if run.is_sparse else "all but the last"
    axes.set_xlabel(f"task whose classes are measured ({measured_groups})")
    axes.set_ylabel("best earlier − final accuracy (points)")
    axes.set_title(f"Forgetting per task · {run.label}", fontsize="medium")
    axes.grid(True, axis="y", alpha=0.35)
    axes.legend(loc="best", fontsize="small")
    return save_figure(figure, output, stem)


# --------------------------------------------------------------------------- tables


def _number(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def headline(run: RunRecord) -> str:
    line = f"A_last {_number(run.a_last)} · Ā {_number(run.average_accuracy)} · forgetting {_number(run.forgetting)}"
    return (line + f" · evaluated after {run.n_evaluations} of {run.n_tasks} tasks") if run.is_sparse else line


def _task_numbers(numbers: Sequence[int], shown: int = 10) -> str:
    """1, 2, 3 — or the first and last few of a long list."""
    numbers = [str(number) for number in numbers]
    return ", ".join(numbers if len(numbers) <= shown else numbers[:5] + ["…"] + numbers[-2:])


SUMMARY_COLUMNS = ("label", "run_dir", "tasks", "planned_tasks", "classes", "a_last", "average_accuracy",
                   "forgetting", "added_parameters", "wall_time_s", "evaluations", "last_evaluated_task")


def summary_row(run: RunRecord) -> dict[str, str]:
    """The summary numbers of one run, as text, keyed by SUMMARY_COLUMNS (CSV precision)."""
    return {
        "label": run.label,
        "run_dir": str(run.path),
        "tasks": str(run.n_tasks),
        "planned_tasks": str(run.n_planned_tasks),
        "classes": "n/a" if run.n_classes is None else str(run.n_classes),
        "a_last": _number(run.a_last, 4),
        "average_accuracy": _number(run.average_accuracy, 4),
        "forgetting": _number(run.forgetting, 4),
        "added_parameters": "n/a" if run.added_parameters is None else str(run.added_parameters),
        "wall_time_s": _number(run.wall_time_s, 3),
        "evaluations": str(run.n_evaluations),
        "last_evaluated_task": str(run.evaluated_task_numbers[-1]),
    }


def summary_csv(runs: Sequence[RunRecord]) -> str:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary_row(run) for run in runs)
    return stream.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


# Marks Ā of runs evaluated after only some tasks; sparse_runs_note explains it.
SPARSE_MARK = "†"


def markdown_table(runs: Sequence[RunRecord]) -> str:
    header = ["run", "directory", "tasks", "classes", "A_last (%)", "Ā (%)", "forgetting (points)",
              "added parameters", "wall time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for run in runs:
        tasks = str(run.n_tasks) if run.n_tasks == run.n_planned_tasks else f"{run.n_tasks} of {run.n_planned_tasks}"
        average = _number(run.average_accuracy) + (f" {SPARSE_MARK}" if run.is_sparse else "")
        cells = [
            _md_escape(run.label),
            f"`{_md_escape(str(run.path))}`",
            tasks,
            "n/a" if run.n_classes is None else str(run.n_classes),
            _number(run.a_last),
            average,
            _number(run.forgetting),
            "n/a" if run.added_parameters is None else f"{run.added_parameters:,}",
            _duration(run.wall_time_s),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sparse_runs_note(runs: Sequence[RunRecord]) -> list[str]:
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


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class RunFigures:
    run: RunRecord
    matrix_png: Path
    forgetting_png: Path | None


def _figure_markdown(title: str, png: Path) -> str:
    return f"![{title}]({png.name})  \n[SVG]({png.with_suffix('.svg').name})"


def _no_forgetting_text(run: RunRecord) -> str:
    if run.n_tasks == 1:
        return "A single task was learned: there is nothing to forget yet."
    return (f"Evaluated only once (after task {run.evaluated_task_numbers[-1]}): forgetting needs an earlier "
            "evaluation to compare with.")


def markdown_report(runs: Sequence[RunRecord], curves_png: Path, figures: Sequence[RunFigures]) -> str:
    parts = [
        "# carecl report",
        "",
        "A_last: top-1 accuracy on all classes after the last task; Ā: mean of the top-1 accuracy after "
        "each task; forgetting: mean over old tasks of (best earlier accuracy − final accuracy); added "
        "parameters: elements saved in learner.safetensors (everything learned except the frozen backbone).",
        "",
        markdown_table(runs),
        "",
        *sparse_runs_note(runs),
        f"Numbers as CSV: [{SUMMARY_CSV}]({SUMMARY_CSV})",
        "",
        "## Top-1 accuracy after each task",
        "",
        _figure_markdown("Top-1 accuracy after each task", curves_png),
    ]
    for item in figures:
        parts += ["", f"## {item.run.label}", "", f"`{item.run.path}` · {headline(item.run)}", "",
                  "### Accuracy matrix", "", _figure_markdown(f"Accuracy matrix, {item.run.label}", item.matrix_png),
                  "", "### Forgetting per task", ""]
        if item.forgetting_png is None:
            parts.append(_no_forgetting_text(item.run))
        else:
            parts.append(_figure_markdown(f"Forgetting per task, {item.run.label}", item.forgetting_png))
    return "\n".join(parts) + "\n"


def _file_stem(index: int, run: RunRecord) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run.path.resolve().name).strip("-") or "run"
    return f"run{index + 1:02d}-{name}"


def build_report(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    """Read every run (failing before writing anything), then write plots, report.md and summary.csv."""
    if not run_dirs:
        raise ReportError("no run directory given")
    runs = with_unique_labels([load_run(path) for path in run_dirs])
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    styles = run_styles(len(runs))
    curves_png = plot_accuracy_curves(runs, styles, output)
    figures = []
    for index, (run, style) in enumerate(zip(runs, styles)):
        stem = _file_stem(index, run)
        figures.append(RunFigures(run, plot_accuracy_matrix(run, output, f"matrix_{stem}"),
                                  plot_forgetting(run, style, output, f"forgetting_{stem}")))
    (output / SUMMARY_CSV).write_text(summary_csv(runs), encoding="utf-8")
    report = output / REPORT_FILE
    report.write_text(markdown_report(runs, curves_png, figures), encoding="utf-8")
    return report


# --------------------------------------------------------------------------- command line


def add_command(subparsers: Any) -> None:
    """Register `carecl report RUN_DIR [RUN_DIR ...] --output DIR` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "report", help="plots, report.md and summary.csv comparing one or more run directories",
        description="Compare finished (or still running) carecl runs: accuracy curves, accuracy "
                    "matrices, forgetting per task, and a summary table (report.md, summary.csv).")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories written by carecl train/demo")
    parser.add_argument("--output", type=Path, required=True, metavar="DIR", help="folder for the report (created if needed)")
    parser.set_defaults(handler=command_report)


def command_report(args: argparse.Namespace) -> int:
    report = build_report(args.runs, args.output)
    print(f"report: {report}")
    return 0
