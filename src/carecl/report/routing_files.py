"""What `carecl diagnose` writes: the routing tables (markdown, CSV, expert usage) and the figure (recall per
block, entropy-gap distributions, expert weight shares, R@M per true task) as PNG + SVG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from carecl.report.figures import save_figure
from carecl.report.routing import TABLE_CSV, TABLE_MD, USAGE_CSV, RoutingDiagnostics

FIGURE_STEM = "routing"
# Above this many tasks a heatmap's task axis is thinned and its colour bar carries the detail.
MAX_LABELLED_TASKS = 20


def plot_routing(routing: RoutingDiagnostics, output: str | Path, stem: str = FIGURE_STEM) -> Path:
    """Recall per block, entropy-gap distributions, expert weight shares, R@M per true task: PNG + SVG."""
    from matplotlib.figure import Figure

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(12.0, 8.5), layout="constrained")
    (recall, gaps), (usage, by_task) = figure.subplots(2, 2)
    _plot_recall(routing, recall)
    _plot_gaps(routing, gaps)
    _plot_heatmap(figure, usage, np.array([100.0 * b.expert_weight_share for b in routing.blocks]),
                       "Share of the routing weight per expert", "expert (= task that created it)",
                       "weight share (%)", "magma", vmin=0.0)
    _plot_heatmap(figure, by_task, routing.router_recall_by_task(), f"R@{routing.topk_routers} by the sample's true task",
                       "true task of the sample", f"R@{routing.topk_routers} (%)", "viridis", vmin=0.0, vmax=100.0)
    figure.suptitle(f"BR-MoE routing · {routing.caption().split(';')[0]}", fontsize="medium")
    return save_figure(figure, output, stem)

def _plot_recall(routing: RoutingDiagnostics, axes: Any) -> None:
    blocks = np.arange(1, len(routing.blocks) + 1)
    series = ((f"R@{routing.topk_routers}: true task's router selected", routing.router_recall, "o"),
              (f"E@{routing.topk_experts}: true task's expert mixed", routing.expert_recall, "s"),
              ("R@1: true task's perceptron most confident", [b.top1_router_accuracy for b in routing.blocks], "^"))
    for label, values, marker in series:
        axes.plot(blocks, values, marker=marker, linewidth=1.6, markersize=5, label=label, clip_on=False)
    chance = 100.0 * min(routing.topk_routers, routing.n_tasks) / routing.n_tasks
    axes.axhline(chance, color="0.4", linestyle=":", linewidth=1.2, label=f"R@{routing.topk_routers} of routers drawn at random")
    axes.set_ylim(0, 100)
    axes.set_xticks(blocks if len(blocks) <= 24 else blocks[:: math.ceil(len(blocks) / 12)])
    axes.set_xlabel("block")
    axes.set_ylabel("samples (%)")
    axes.set_title("Routing recall per block", fontsize="medium")
    axes.grid(True, alpha=0.35)
    axes.legend(loc="lower left", fontsize="small", framealpha=0.9)

def _plot_gaps(routing: RoutingDiagnostics, axes: Any) -> None:
    blocks = np.arange(1, len(routing.blocks) + 1)
    gaps = [b.entropy_gap[np.isfinite(b.entropy_gap)] for b in routing.blocks]
    axes.axhline(0.0, color="black", linewidth=0.8)
    if any(len(g) for g in gaps):
        axes.boxplot([g if len(g) else [math.nan] for g in gaps], positions=blocks, widths=0.6, showfliers=False,
                     showmeans=True, meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black",
                                                "markersize": 4})
    else:
        axes.text(0.5, 0.5, "a single task: no other perceptron to compare with", ha="center", va="center",
                  transform=axes.transAxes)
    axes.set_xlabel("block")
    axes.set_ylabel("min other entropy − true entropy (nats)")
    axes.set_title("Entropy gap of the true task's perceptron (> 0: it wins; — median, ◇ mean)", fontsize="medium")
    axes.grid(True, axis="y", alpha=0.35)

def _plot_heatmap(figure: Any, axes: Any, values: np.ndarray, title: str, xlabel: str, label: str,
                  colormap: str, vmin: float, vmax: float | None = None) -> None:
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    n_blocks, n_tasks = values.shape
    image = axes.imshow(np.ma.masked_invalid(values), cmap=colormaps[colormap].with_extremes(bad="0.85"),
                        vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest",
                        extent=(0.5, n_tasks + 0.5, n_blocks + 0.5, 0.5))
    if n_tasks <= MAX_LABELLED_TASKS:
        axes.set_xticks(np.arange(1, n_tasks + 1))
    else:
        axes.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    axes.set_yticks(np.arange(1, n_blocks + 1) if n_blocks <= 24 else np.arange(1, n_blocks + 1, math.ceil(n_blocks / 12)))
    axes.set_xlabel(xlabel)
    axes.set_ylabel("block")
    axes.set_title(title, fontsize="medium")
    figure.colorbar(image, ax=axes, label=label, shrink=0.9)


DEFINITIONS = (
    "Per block, over the test samples of the seen classes (task-free forward), the sample's true task being the "
    "task that introduced its class: R@M = % whose true task's router is among the M selected routers; "
    "E@K = % whose true task's expert is among the experts the selected routers mix (top-K, weight > 0); "
    "R@1 = % whose true task's class perceptron is the most confident (lowest entropy); entropy gap = mean of "
    "(min entropy of the other tasks' perceptrons − entropy of the true task's), > 0 when the true task wins; "
    "rank = mean rank of the true task's perceptron (1 = most confident)."
)


def write_diagnostics(diagnostics: RoutingDiagnostics, output: str | Path) -> dict[str, Path]:
    """routing.md, routing.csv, expert_usage.csv and routing.png/.svg in `output` (created if needed)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    png = plot_routing(diagnostics, output)
    files = {"markdown": output / TABLE_MD, "csv": output / TABLE_CSV, "usage": output / USAGE_CSV, "figure": png}
    files["csv"].write_text(diagnostics.csv(), encoding="utf-8")
    files["usage"].write_text(diagnostics.usage_csv(), encoding="utf-8")
    files["markdown"].write_text(
        "# BR-MoE routing diagnostics\n\n" + DEFINITIONS + "\n\n" + diagnostics.markdown()
        + f"\nPer expert and task: [{USAGE_CSV}]({USAGE_CSV})\n\n![routing]({png.name})  \n[SVG]({png.with_suffix('.svg').name})\n",
        encoding="utf-8")
    return files
