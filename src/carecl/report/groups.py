"""Seed groups in `carecl report`: a group directory (group.json) stands for its seed runs, reported one by one,
plus a table of mean ± std over them and a figure of the mean curve with a ± std band."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from carecl.report.runs import ReportedRun, load_run
from carecl.runs.group import MeanStd, group_run_dirs, is_group

GROUP_CURVES_STEM = "accuracy_curves_groups"
# (column title, ReportedRun attribute) of the groups' table.
GROUP_COLUMNS = (("A_last (%)", "a_last"), ("Ā (%)", "average_accuracy"), ("forgetting (points)", "forgetting"))
TRANSFER_COLUMNS = (("Transfer (%)", "transfer"), ("Avg (%)", "task_average"), ("Last (%)", "last_task_average"))


@dataclass(frozen=True)
class ReportedGroup:
    path: Path
    runs: tuple[ReportedRun, ...]

    @property
    def label(self) -> str:
        first = self.runs[0].settings
        return f"{first.method} · {first.dataset} {first.split_name}".strip() + f" · {len(self.runs)} seeds"

    def stats(self, attribute: str) -> MeanStd:
        return MeanStd.of([getattr(run, attribute) for run in self.runs])

    def curve_band(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(x, mean, std) of the top-1 curve when every seed was evaluated after the same tasks, else None."""
        tasks = [tuple(run.evaluated_task_numbers) for run in self.runs]
        if len(set(tasks)) != 1:
            return None
        curves = np.stack([run.top1_curve for run in self.runs])
        std = curves.std(axis=0, ddof=1) if len(self.runs) > 1 else np.zeros(curves.shape[1])
        return np.array(tasks[0]), curves.mean(axis=0), std


def expand_groups(paths: Sequence[str | Path]) -> tuple[list[Path], list[tuple[Path, list[Path]]]]:
    """Run directories to report (a group's seed runs in its place) and the groups with their runs."""
    runs, groups = [], []
    for path in map(Path, paths):
        if is_group(path):
            members = group_run_dirs(path)
            groups.append((path, members))
            runs.extend(members)
        else:
            runs.append(path)
    return runs, groups


def load_groups(groups: list[tuple[Path, list[Path]]], runs: Sequence[ReportedRun]) -> list[ReportedGroup]:
    by_path = {run.path.resolve(): run for run in runs}
    return [ReportedGroup(path, tuple(by_path.get(m.resolve()) or load_run(m) for m in members))
            for path, members in groups if members]


def groups_table(groups: Sequence[ReportedGroup]) -> str:
    transfer = any(run.measures_transfer for group in groups for run in group.runs)
    columns = GROUP_COLUMNS + (TRANSFER_COLUMNS if transfer else ())
    header = ["group", "directory", "seeds", *(title for title, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(columns)) + "|"]
    for group in groups:
        seeds = ", ".join(str(run.settings.seed) for run in group.runs)
        cells = [group.label.replace("|", "\\|"), f"`{group.path}`", seeds,
                 *(group.stats(attribute).format() for _, attribute in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_group_bands(groups: Sequence[ReportedGroup], output: Path) -> Path | None:
    """Mean top-1 curve of each group with a ± std band (groups whose seeds were evaluated alike)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from carecl.report.figures import accuracy_floor, save_figure

    bands = [(group, group.curve_band()) for group in groups]
    bands = [(group, band) for group, band in bands if band is not None]
    if not bands:
        return None
    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    axes = figure.add_subplot()
    colors = colormaps["tab10"].colors
    lowest = math.inf
    for index, (group, (x, mean, std)) in enumerate(bands):
        color = colors[index % len(colors)]
        axes.plot(x, mean, color=color, linewidth=1.8, marker="o", markersize=4, label=group.label)
        axes.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        lowest = min(lowest, float(np.nanmin(mean - std)))
    axes.set_xlabel("task (number of tasks learned)")
    axes.set_ylabel("top-1 accuracy on all seen classes (%)")
    axes.set_title("Top-1 accuracy after each task: mean ± std over seeds")
    axes.set_ylim(accuracy_floor(np.array([lowest])), 100)
    axes.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    axes.grid(True, alpha=0.35)
    axes.legend(loc="best", fontsize="small", framealpha=0.9)
    return save_figure(figure, output, GROUP_CURVES_STEM)
