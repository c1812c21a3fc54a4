"""Report figures: accuracy curves, accuracy-matrix heatmaps and forgetting bars (matplotlib, PNG + SVG)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from carecl.formatting import format_number
from carecl.report.runs import ReportedRun, headline

CURVES_STEM = "accuracy_curves"
DPI = 150
# Above this many tasks a heatmap cell is too small to hold its number.
MAX_ANNOTATED_TASKS = 20
# At most this many markers per curve, so 300-task runs stay lines rather than smudges.
MAX_MARKERS_PER_CURVE = 25
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


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


def curve_x(run: ReportedRun, by_classes: bool) -> np.ndarray:
    """Where each evaluation sits on the curves' x axis: classes seen, or the 1-based task number."""
    return run.classes_at_evaluations if by_classes else run.evaluated_task_numbers


def plot_accuracy_curves(runs: Sequence[ReportedRun], styles: Sequence[RunStyle], output: Path) -> Path:
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


def plot_accuracy_matrix(run: ReportedRun, output: Path, stem: str) -> Path:
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


def plot_forgetting(run: ReportedRun, style: RunStyle, output: Path, stem: str) -> Path | None:
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
    axes.axhline(run.forgetting, color="0.3", linestyle="--", linewidth=1.2, label=f"mean forgetting {format_number(run.forgetting)}")
    integer_ticks(axes.xaxis, len(drops))
    axes.set_xlim(0.4, len(drops) + 0.6)
    measured_groups = "those measured at an earlier evaluation" if run.is_sparse else "all but the last"
    axes.set_xlabel(f"task whose classes are measured ({measured_groups})")
    axes.set_ylabel("best earlier − final accuracy (points)")
    axes.set_title(f"Forgetting per task · {run.label}", fontsize="medium")
    axes.grid(True, axis="y", alpha=0.35)
    axes.legend(loc="best", fontsize="small")
    return save_figure(figure, output, stem)
