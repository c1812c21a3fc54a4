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
from carecl.rundir import CONFIG_FILE, METRICS_JSON, STATE_FILE, RunDirectoryError

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
    """One run directory, read and checked: everything the report shows about it."""

    path: Path
    settings: RunSettings
    label: str
    top1_curve: np.ndarray  # (T,) top-1 accuracy after each learned task
    matrix: np.ndarray  # (T, T): accuracy on task j's classes after task i, nan above the diagonal
    task_sizes: tuple[int, ...]  # classes per task of the whole scenario (empty when not recorded)
    wall_time_s: float  # nan when not recorded
    added_parameters: int | None  # elements in learner.safetensors; None when the file is absent

    @property
    def n_tasks(self) -> int:
        return len(self.top1_curve)

    @property
    def n_planned_tasks(self) -> int:
        return max(len(self.task_sizes), self.n_tasks)

    @property
    def classes_seen(self) -> np.ndarray | None:
        """Number of classes seen after each learned task, when the task sizes are known."""
        if len(self.task_sizes) < self.n_tasks:
            return None
        return np.cumsum(self.task_sizes)[: self.n_tasks]

    @property
    def n_classes(self) -> int | None:
        seen = self.classes_seen
        return int(seen[-1]) if seen is not None else None

    @property
    def a_last(self) -> float:
        return float(self.top1_curve[-1])

    @property
    def average_accuracy(self) -> float:
        return float(np.mean(self.top1_curve))

    @property
    def forgetting(self) -> float:
        return forgetting(self.matrix)

    @property
    def forgetting_per_group(self) -> np.ndarray:
        return forgetting_per_group(self.matrix)


def forgetting_per_group(matrix: np.ndarray) -> np.ndarray:
    """For each old group j < T-1: best accuracy on it before the last task minus its final accuracy."""
    n = matrix.shape[0]
    return np.array([np.nanmax(matrix[j : n - 1, j]) - matrix[n - 1, j] for j in range(n - 1)], dtype=float)


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


def curve_and_matrix(document: dict[str, Any], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 curve and accuracy matrix from `summary` (or, failing that, from the per-task records)."""
    summary = document.get("summary") or {}
    try:
        if "top1_curve" in summary and "matrix" in summary:
            curve = [_as_float(v) for v in summary["top1_curve"]]
            rows = [[_as_float(v) for v in row] for row in summary["matrix"]]
        elif document.get("tasks"):
            curve = [_as_float(task["top1"]) for task in document["tasks"]]
            rows = [[_as_float(v) for v in task["group_accuracy"]] for task in document["tasks"]]
        else:
            raise ReportError(f"{path}: neither summary.top1_curve/summary.matrix nor tasks[] recorded")
    except (TypeError, ValueError, KeyError) as error:
        raise ReportError(f"{path}: malformed accuracy record ({type(error).__name__}: {error})") from None
    n = len(curve)
    if n == 0:
        raise ReportError(f"{path}: no task has been evaluated yet (empty top1_curve)")
    if len(rows) != n or any(len(row) > n for row in rows):
        raise ReportError(f"{path}: accuracy matrix has {len(rows)} rows for {n} evaluated tasks")
    matrix = np.full((n, n), np.nan)
    for i, row in enumerate(rows):
        # Only the lower triangle is meaningful: row i holds the groups of tasks 0..i.
        matrix[i, : min(len(row), i + 1)] = row[: i + 1]
    return np.array(curve), matrix


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
    curve, matrix = curve_and_matrix(document, path)
    wall_times = [_as_float(t) for t in document.get("wall_time_s") or []]
    settings = read_settings(run_dir)
    return RunRecord(
        path=run_dir,
        settings=settings,
        label=settings.label,
        top1_curve=curve,
        matrix=matrix,
        task_sizes=tuple(int(size) for size in document.get("task_sizes") or []),
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


def plot_accuracy_curves(runs: Sequence[RunRecord], styles: Sequence[RunStyle], output: Path) -> Path:
    """Top-1 accuracy after each task, every run overlaid (in the spirit of CaRE's Figure 1)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    by_classes = all(run.classes_seen is not None for run in runs)
    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    axes = figure.add_subplot()
    for run, style in zip(runs, styles):
        x = run.classes_seen if by_classes else np.arange(1, run.n_tasks + 1)
        axes.plot(x, run.top1_curve, label=run.label, color=style.color, marker=style.marker, markersize=5,
                  linewidth=1.8, markevery=max(1, math.ceil(run.n_tasks / MAX_MARKERS_PER_CURVE)), clip_on=False)
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
    n = matrix.shape[0]
    fontsize = 8 if n <= 10 else 6.5
    for (i, j), value in np.ndenumerate(matrix):
        if not math.isnan(value):
            text = f"{value:.1f}" if n <= 10 else f"{value:.0f}"
            # The lower half of viridis is dark and needs light text.
            axes.text(j + 1, i + 1, text, ha="center", va="center", fontsize=fontsize,
                      color="white" if value < (floor + 100.0) / 2 else "black")


def plot_accuracy_matrix(run: RunRecord, output: Path, stem: str) -> Path:
    """Heatmap: row i = after learning task i, column j = accuracy on task j's classes."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    n = run.n_tasks
    # Big enough for readable cell numbers up to MAX_ANNOTATED_TASKS; unannotated maps need no more.
    side = min(9.0, max(4.5, 0.35 * n + 2.0)) if n <= MAX_ANNOTATED_TASKS else 6.5
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    axes = figure.add_subplot()
    colormap = colormaps["viridis"].with_extremes(bad="white")
    # Scale colours from just under the lowest cell: a 0-100 scale paints 80 and 92 the same green.
    floor = accuracy_floor(run.matrix)
    # Cell centres at 1..n so ticks read as task numbers.
    image = axes.imshow(np.ma.masked_invalid(run.matrix), cmap=colormap, vmin=floor, vmax=100,
                        extent=(0.5, n + 0.5, n + 0.5, 0.5), interpolation="nearest")
    if n <= MAX_ANNOTATED_TASKS:
        _annotate_cells(axes, run.matrix, floor)
    integer_ticks(axes.xaxis, n)
    integer_ticks(axes.yaxis, n)
    axes.set_xlabel("evaluated on the classes of task j")
    axes.set_ylabel("after learning task i")
    axes.set_title(f"Accuracy matrix · {run.label}\n" + headline(run), fontsize="medium")
    figure.colorbar(image, ax=axes, label="top-1 accuracy (%)", shrink=0.85)
    return save_figure(figure, output, stem)


def plot_forgetting(run: RunRecord, style: RunStyle, output: Path, stem: str) -> Path | None:
    """Bars per old task group: best earlier accuracy minus final accuracy. None for one-task runs."""
    from matplotlib.figure import Figure

    drops = run.forgetting_per_group
    if len(drops) == 0:
        return None
    groups = np.arange(1, len(drops) + 1)
    many = len(drops) > 60
    figure = Figure(figsize=(7.5, 4.0), layout="constrained")
    axes = figure.add_subplot()
    axes.set_axisbelow(True)
    axes.bar(groups, drops, width=1.0 if many else 0.75, color=style.color, linewidth=0)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.axhline(run.forgetting, color="0.3", linestyle="--", linewidth=1.2, label=f"mean forgetting {_number(run.forgetting)}")
    integer_ticks(axes.xaxis, len(drops))
    axes.set_xlim(0.4, len(drops) + 0.6)
    axes.set_xlabel("task whose classes are measured (all but the last)")
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
    return f"A_last {_number(run.a_last)} · Ā {_number(run.average_accuracy)} · forgetting {_number(run.forgetting)}"


SUMMARY_COLUMNS = ("label", "run_dir", "tasks", "planned_tasks", "classes", "a_last", "average_accuracy",
                   "forgetting", "added_parameters", "wall_time_s")


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
    }


def summary_csv(runs: Sequence[RunRecord]) -> str:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary_row(run) for run in runs)
    return stream.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(runs: Sequence[RunRecord]) -> str:
    header = ["run", "directory", "tasks", "classes", "A_last (%)", "Ā (%)", "forgetting (points)",
              "added parameters", "wall time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for run in runs:
        tasks = str(run.n_tasks) if run.n_tasks == run.n_planned_tasks else f"{run.n_tasks} of {run.n_planned_tasks}"
        cells = [
            _md_escape(run.label),
            f"`{_md_escape(str(run.path))}`",
            tasks,
            "n/a" if run.n_classes is None else str(run.n_classes),
            _number(run.a_last),
            _number(run.average_accuracy),
            _number(run.forgetting),
            "n/a" if run.added_parameters is None else f"{run.added_parameters:,}",
            _duration(run.wall_time_s),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class RunFigures:
    run: RunRecord
    matrix_png: Path
    forgetting_png: Path | None


def _figure_markdown(title: str, png: Path) -> str:
    return f"![{title}]({png.name})  \n[SVG]({png.with_suffix('.svg').name})"


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
            parts.append("A single task was learned: there is nothing to forget yet.")
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
