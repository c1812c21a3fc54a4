"""`carecl report`: plots, a Markdown summary and a CSV that compare run directories.

Reads what a run wrote (config.yaml, metrics.json, learner.safetensors: report/runs.py) and never
needs a display: figures (report/figures.py) are plain matplotlib `Figure`s saved as PNG and SVG.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from carecl.report.figures import plot_accuracy_curves, plot_accuracy_matrix, plot_forgetting, run_styles
from carecl.report.groups import ReportedGroup, expand_groups, groups_table, load_groups, plot_group_bands
from carecl.report.runs import ReportError, ReportedRun, headline, load_run, with_unique_labels
from carecl.report.tables import cost_table, markdown_table, sparse_runs_note, summary_csv

REPORT_FILE = "report.md"
SUMMARY_CSV = "summary.csv"


@dataclass(frozen=True)
class RunFigures:
    run: ReportedRun
    matrix_png: Path
    forgetting_png: Path | None


def _figure_markdown(title: str, png: Path) -> str:
    return f"![{title}]({png.name})  \n[SVG]({png.with_suffix('.svg').name})"


def _no_forgetting_text(run: ReportedRun) -> str:
    if run.n_tasks == 1:
        return "A single task was learned: there is nothing to forget yet."
    return (f"Evaluated only once (after task {run.evaluated_task_numbers[-1]}): forgetting needs an earlier "
            "evaluation to compare with.")


def group_section(groups: Sequence[ReportedGroup], bands_png: Path | None) -> list[str]:
    """report.md lines for seed groups: mean ± std over each group's seeds (sample std), and their band figure."""
    if not groups:
        return []
    parts = ["## Seed groups: mean ± std over seeds", "", groups_table(groups), ""]
    if bands_png is not None:
        parts += [_figure_markdown("Top-1 accuracy after each task, mean ± std over seeds", bands_png), ""]
    return parts


def published_section(run_dirs: Sequence[str | Path]) -> list[str]:
    """report.md lines setting the runs with a published row of their method and dataset next to it (carecl compare)."""
    from carecl.report.compare import compare, comparison_markdown

    matched = [item for item in compare(run_dirs) if item.row is not None]
    if not matched:
        return []
    return ["## Compared with published numbers", "", "The published row of the same method and dataset with the "
            "fewest protocol differences; `protocol` lists every difference (split, backbone weights, seed).", "",
            comparison_markdown(matched), ""]


def markdown_report(runs: Sequence[ReportedRun], curves_png: Path, figures: Sequence[RunFigures],
                    groups: Sequence[ReportedGroup] = (), bands_png: Path | None = None,
                    published: Sequence[str] = ()) -> str:
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
        *group_section(groups, bands_png),
        *published,
        *cost_table(runs),
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


def _file_stem(index: int, run: ReportedRun) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run.path.resolve().name).strip("-") or "run"
    return f"run{index + 1:02d}-{name}"


def build_report(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    """Read every run (failing before writing anything), then write plots, report.md and summary.csv. A seed group's
    directory stands for its seed runs, and adds mean ± std over them."""
    if not run_dirs:
        raise ReportError("no run directory given")
    paths, group_members = expand_groups(run_dirs)
    if not paths:
        raise ReportError(f"the groups {', '.join(map(str, run_dirs))} hold no finished seed run yet")
    runs = with_unique_labels([load_run(path) for path in paths])
    groups = load_groups(group_members, runs)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    styles = run_styles(len(runs))
    curves_png = plot_accuracy_curves(runs, styles, output)
    figures = []
    for index, (run, style) in enumerate(zip(runs, styles)):
        stem = _file_stem(index, run)
        figures.append(RunFigures(run, plot_accuracy_matrix(run, output, f"matrix_{stem}"),
                                  plot_forgetting(run, style, output, f"forgetting_{stem}")))
    bands_png = plot_group_bands(groups, output) if groups else None
    (output / SUMMARY_CSV).write_text(summary_csv(runs), encoding="utf-8")
    report = output / REPORT_FILE
    report.write_text(markdown_report(runs, curves_png, figures, groups, bands_png, published_section(run_dirs)),
                      encoding="utf-8")
    return report
