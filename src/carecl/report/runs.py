"""Reading run directories for reports: a run's typed config, metrics.json and saved-learner size.

Never needs a display; only the typed config touches carecl's method registry.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from carecl.config import ConfigError, load_config
from carecl.formatting import format_number
from carecl.metrics import (
    average_incremental_accuracy,
    forgetting,
    forgetting_per_group,
    last_accuracy,
    last_row_average,
    learned_part,
    measures_unlearned_tasks,
    task_averaged,
    transfer,
)
from carecl.runs.directory import CONFIG_FILE, METRICS_JSON, STATE_FILE, RunDirectoryError

log = logging.getLogger("carecl")


class ReportError(RunDirectoryError):
    """A run directory cannot be reported (metrics missing or unreadable); the message names the path."""


@dataclass(frozen=True)
class RunSettings:
    """The few config values that name a run in tables and legends."""

    method: str = "?"
    dataset: str = "?"
    init_cls: int | None = None
    increment: int | None = None
    seed: int | None = None
    # A multi-domain stream's members, in order (their own tasks, whatever init_cls / increment say).
    domains: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.method} · {self.dataset} {self.split_name}".strip()

    @property
    def split_name(self) -> str:
        if self.domains:
            return " → ".join(self.domains)
        if self.init_cls is None or self.increment is None:
            return ""
        # The CaRE/PILOT convention: "B0" means the first task is as large as the others.
        base = 0 if self.init_cls == self.increment else self.init_cls
        return f"B{base} Inc{self.increment}"


@dataclass(frozen=True)
class ReportedRun:
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
    # Per finished task, metrics.json's `costs` (engine/costs.py); empty for runs written before them.
    costs: tuple[dict, ...] = ()
    # Milliseconds of predict per test image at each evaluation (from `costs`).
    inference_ms: tuple[float, ...] = ()

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
        return last_accuracy(self.top1_curve)

    @property
    def average_accuracy(self) -> float:
        """Ā as metrics.json defines it: the mean over evaluations (over every task only for dense runs)."""
        return average_incremental_accuracy(self.top1_curve)

    @property
    def learned_matrix(self) -> np.ndarray:
        """The matrix without the evaluations of tasks before they were learned (zero-shot transfer)."""
        return learned_part(self.matrix, self.evaluated_tasks)

    @property
    def forgetting(self) -> float:
        return forgetting(self.learned_matrix)

    @property
    def forgetting_per_group(self) -> np.ndarray:
        return forgetting_per_group(self.learned_matrix)

    @property
    def measures_transfer(self) -> bool:
        """Evaluated tasks before learning them (MTIL): Transfer / Avg / Last apply."""
        return measures_unlearned_tasks(self.matrix, self.evaluated_tasks)

    @property
    def transfer(self) -> float:
        return transfer(self.matrix, self.evaluated_tasks) if self.measures_transfer else float("nan")

    @property
    def task_average(self) -> float:
        return task_averaged(self.matrix) if self.measures_transfer else float("nan")

    @property
    def last_task_average(self) -> float:
        return last_row_average(self.matrix) if self.measures_transfer else float("nan")


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
    width = max(len(row) for row in rows)
    zero_shot = any(np.isfinite(row[task + 1:]).any() for task, row in zip(evaluated, rows))
    if source is not None and all(len(row) == width for row in rows) and zero_shot:
        # The evaluations also measured tasks not learned yet (MTIL's zero-shot transfer): keep them all.
        return np.array(curve), np.array(rows, dtype=float), evaluated
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
    """The run's typed config (config.yaml), reduced to what labels it."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        log.warning("%s not found: the run is labelled by its directory name", path)
        return RunSettings(method=run_dir.resolve().name)
    try:
        config = load_config(path)
    except ConfigError as error:
        log.warning("%s cannot be read as a carecl config (%s): the run is labelled by its directory name", path, error)
        return RunSettings(method=run_dir.resolve().name)
    data = config.data
    return RunSettings(method=config.method.name, dataset=data.dataset, init_cls=data.init_cls if data.init_cls is not None else data.increment,
                       increment=data.increment, seed=config.seed,
                       domains=tuple(domain.name for domain in data.domains or []))


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


def load_run(run_dir: str | Path) -> ReportedRun:
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
    return ReportedRun(
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
        costs=tuple(cost for cost in document.get("costs") or [] if isinstance(cost, dict)),
        inference_ms=tuple(_as_float(cost.get("inference_ms_per_image")) for cost in document.get("costs") or []
                           if isinstance(cost, dict) and "inference_ms_per_image" in cost),
    )


def with_unique_labels(runs: Sequence[ReportedRun]) -> list[ReportedRun]:
    """Runs that share a label (e.g. several seeds) get the seed, then the directory name, appended."""
    suffixes = (lambda run, i: f"seed {run.settings.seed}", lambda run, i: run.path.resolve().name, lambda run, i: f"#{i + 1}")
    runs = list(runs)
    for suffix in suffixes:
        counts = Counter(run.label for run in runs)
        runs = [replace(run, label=f"{run.label} · {suffix(run, i)}") if counts[run.label] > 1 else run
                for i, run in enumerate(runs)]
    return runs


def headline(run: ReportedRun) -> str:
    line = f"A_last {format_number(run.a_last)} · Ā {format_number(run.average_accuracy)} · forgetting {format_number(run.forgetting)}"
    return (line + f" · evaluated after {run.n_evaluations} of {run.n_tasks} tasks") if run.is_sparse else line
