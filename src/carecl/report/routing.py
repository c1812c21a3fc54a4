"""Routing diagnostics for BR-MoE learners (CaRE): does each block route a sample to its own task?

On the test images of the seen classes, with the task-free forward used at inference, per block:

- **R@M** (router recall): the sample's true task's router is among the M selected routers;
- **E@K** (expert recall): the true task's expert is among the experts the selected routers mix
  (their top-K, weight > 0);
- **R@1**: the true task's class perceptron is the most confident (lowest entropy) of all;
- **entropy gap**: min entropy of the other tasks' perceptrons − entropy of the true task's
  perceptron (> 0: the true task wins), and the true task's **rank** (1 = most confident);
- **expert usage**: each expert's share of the routing weight, how often each expert and each
  router is selected.

The true task of a sample is the task that introduced its class. This mirrors Table 7 of the
CaRE paper (R@2 and E@3 per layer). The numbers come from the layers' opt-in routing trace
(`BRMoELayer.routing_trace`, one `RoutingRecord` per forward), which is reset afterwards.

    diagnostics = diagnose_routing(load_experiment(RunDirectory.open("runs/demo")))   # carecl.engine, carecl.runs
    print(diagnostics.table())
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from carecl.errors import CareclError
from carecl.formatting import format_number

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from carecl.tuners.brmoe import BRMoELayer, BRMoEViT, RoutingRecord
    from carecl.engine.experiment import Experiment

TABLE_MD = "routing.md"
TABLE_CSV = "routing.csv"
USAGE_CSV = "expert_usage.csv"
# Number formats of the table's value columns (R@M, E@K, R@1, entropy gap, rank): trained
# perceptrons are confident for almost any input, so entropy gaps are often ~1e-3 nats.
DISPLAY_FORMATS = (".2f", ".2f", ".2f", ".3g", ".2f")
CSV_FORMATS = (".4f", ".4f", ".4f", ".6g", ".4f")


class DiagnosticsError(CareclError, ValueError):
    """The learner (or run) has no BR-MoE routing to diagnose, or nothing to diagnose it on."""


# --------------------------------------------------------------------------- per-block outcomes


@dataclass
class BlockRouting:
    """What one block decided for every sample (arrays over the N samples, counts over the T tasks)."""

    router_hit: np.ndarray  # (N,) bool: true task's router selected
    expert_hit: np.ndarray  # (N,) bool: true task's expert mixed with weight > 0
    entropy_gap: np.ndarray  # (N,) float: min other entropy − true entropy (nan with a single task)
    true_rank: np.ndarray  # (N,) int: 1 + number of perceptrons strictly more confident than the true one
    expert_weight: np.ndarray  # (T,) routing weight each expert received, summed over samples and routers
    expert_selections: np.ndarray  # (T,) samples whose mixture uses the expert
    router_selections: np.ndarray  # (T,) samples that select the router

    @property
    def router_recall(self) -> float:
        return _percent(self.router_hit)

    @property
    def expert_recall(self) -> float:
        return _percent(self.expert_hit)

    @property
    def top1_router_accuracy(self) -> float:
        return _percent(self.true_rank == 1)

    @property
    def mean_entropy_gap(self) -> float:
        return float(np.mean(self.entropy_gap)) if len(self.entropy_gap) and not np.isnan(self.entropy_gap).all() else math.nan

    @property
    def mean_true_rank(self) -> float:
        return float(np.mean(self.true_rank)) if len(self.true_rank) else math.nan

    @property
    def expert_weight_share(self) -> np.ndarray:
        """Each expert's fraction of all routing weight in this block (sums to 1)."""
        total = self.expert_weight.sum()
        return self.expert_weight / total if total > 0 else np.zeros_like(self.expert_weight)

    @classmethod
    def concatenate(cls, parts: Sequence[BlockRouting]) -> BlockRouting:
        return cls(
            router_hit=np.concatenate([p.router_hit for p in parts]),
            expert_hit=np.concatenate([p.expert_hit for p in parts]),
            entropy_gap=np.concatenate([p.entropy_gap for p in parts]),
            true_rank=np.concatenate([p.true_rank for p in parts]),
            expert_weight=np.sum([p.expert_weight for p in parts], axis=0),
            expert_selections=np.sum([p.expert_selections for p in parts], axis=0),
            router_selections=np.sum([p.router_selections for p in parts], axis=0),
        )


def _percent(flags: np.ndarray) -> float:
    return float(100.0 * np.mean(flags)) if len(flags) else math.nan


def block_outcomes(record: RoutingRecord, true_tasks: Tensor, n_tasks: int) -> BlockRouting:
    """One block's decisions on one batch, scored against each sample's true task (B,)."""
    true_tasks = true_tasks.to(record.routers.device, torch.long)
    batch = len(true_tasks)
    used = record.weights > 0  # padded slots (experts newer than their router) carry weight 0
    expert_hit = ((record.experts == true_tasks[:, None, None]) & used).flatten(1).any(1)
    router_hit = (record.routers == true_tasks[:, None]).any(1)
    if record.confidence is None:
        # A single learned task: nothing was chosen, nothing competes with the true task.
        gap = torch.full((batch,), math.nan, dtype=torch.float64)
        rank = torch.ones(batch, dtype=torch.long)
    else:
        entropies = -record.confidence.double()
        true_entropy = entropies.gather(1, true_tasks[:, None])
        others = entropies.scatter(1, true_tasks[:, None], math.inf)
        gap = others.min(1).values - true_entropy[:, 0]
        rank = 1 + (entropies < true_entropy).sum(1)
    expert_uses = torch.zeros(batch, n_tasks, dtype=torch.long, device=used.device)
    expert_uses.scatter_add_(1, record.experts.flatten(1), used.flatten(1).long())
    router_uses = torch.zeros(batch, n_tasks, dtype=torch.long, device=used.device)
    router_uses.scatter_add_(1, record.routers, torch.ones_like(record.routers))
    weight = torch.zeros(n_tasks, dtype=torch.float64, device=used.device)
    weight.index_add_(0, record.experts.flatten(), record.weights.flatten().double())
    return BlockRouting(
        router_hit=router_hit.cpu().numpy(),
        expert_hit=expert_hit.cpu().numpy(),
        entropy_gap=gap.cpu().numpy(),
        true_rank=rank.cpu().numpy(),
        expert_weight=weight.cpu().numpy(),
        expert_selections=(expert_uses > 0).sum(0).cpu().numpy(),
        router_selections=(router_uses > 0).sum(0).cpu().numpy(),
    )


# --------------------------------------------------------------------------- the whole model


@dataclass
class RoutingDiagnostics:
    """Routing outcomes of every block of a BR-MoE model on a set of samples with known tasks."""

    blocks: list[BlockRouting]
    true_tasks: np.ndarray  # (N,)
    n_tasks: int
    topk_routers: int  # M, as configured (all routers when M >= T)
    topk_experts: int  # K, as configured

    @property
    def n_samples(self) -> int:
        return len(self.true_tasks)

    @property
    def router_recall(self) -> np.ndarray:
        """R@M per block (%)."""
        return np.array([b.router_recall for b in self.blocks])

    @property
    def expert_recall(self) -> np.ndarray:
        """E@K per block (%)."""
        return np.array([b.expert_recall for b in self.blocks])

    def router_recall_by_task(self) -> np.ndarray:
        """(blocks, tasks): R@M over the samples of each true task (nan for a task without samples)."""
        masks = [self.true_tasks == task for task in range(self.n_tasks)]
        return np.array([[_percent(b.router_hit[m]) if m.any() else math.nan for m in masks] for b in self.blocks])

    # ---- tables ------------------------------------------------------------------------
    @property
    def columns(self) -> tuple[str, ...]:
        return ("block", f"R@{self.topk_routers}", f"E@{self.topk_experts}", "R@1", "entropy_gap", "true_rank")

    def rows(self) -> list[tuple[str, float, float, float, float, float]]:
        """One row per block (numbered from 1) and a last row of means over the blocks."""
        rows = [(str(index + 1), b.router_recall, b.expert_recall, b.top1_router_accuracy, b.mean_entropy_gap,
                 b.mean_true_rank) for index, b in enumerate(self.blocks)]
        means = [_nanmean([row[column] for row in rows]) for column in range(1, 6)]
        return rows + [("mean", *means)]

    def table(self) -> str:
        """Plain-text table for the terminal."""
        header = f"{'block':>5}  " + "  ".join(f"{name:>11}" for name in self.columns[1:])
        lines = [self.caption(), header, "-" * len(header)]
        for block, *values in self.rows():
            lines.append(f"{block:>5}  " + "  ".join(f"{text:>11}" for text in _formatted(values, DISPLAY_FORMATS)))
        return "\n".join(lines)

    def markdown(self) -> str:
        names = ["block", f"R@{self.topk_routers} (%)", f"E@{self.topk_experts} (%)", "R@1 (%)",
                 "entropy gap (nats)", "rank of true task"]
        lines = [f"_{self.caption()}_", "", "| " + " | ".join(names) + " |", "|" + "|".join(["---:"] * len(names)) + "|"]
        for block, *values in self.rows():
            lines.append("| " + " | ".join([block, *_formatted(values, DISPLAY_FORMATS)]) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        stream = io.StringIO()
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(self.columns)
        for block, *values in self.rows():
            writer.writerow([block, *_formatted(values, CSV_FORMATS)])
        return stream.getvalue()

    def usage_csv(self) -> str:
        """Per block and task: the expert's weight share and selection rate, the router's selection rate."""
        stream = io.StringIO()
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(("block", "task", "expert_weight_share", "expert_selection_rate", "router_selection_rate"))
        n = max(self.n_samples, 1)
        for index, b in enumerate(self.blocks):
            share = b.expert_weight_share
            for task in range(self.n_tasks):
                writer.writerow((index + 1, task + 1, f"{share[task]:.6f}", f"{b.expert_selections[task] / n:.6f}",
                                 f"{b.router_selections[task] / n:.6f}"))
        return stream.getvalue()

    def caption(self) -> str:
        return (f"{self.n_samples} test samples, {self.n_tasks} tasks, M = {self.topk_routers} routers, "
                f"K = {self.topk_experts} experts per router; entropy gap = min entropy of the other tasks' "
                f"perceptrons − entropy of the true task's")


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _formatted(values: Sequence[float], formats: Sequence[str]) -> list[str]:
    return [format_number(value, spec) for value, spec in zip(values, formats)]


# --------------------------------------------------------------------------- collecting


@contextmanager
def routing_traces(layers: Sequence[BRMoELayer]) -> Iterator[list[list[RoutingRecord]]]:
    """Switch on every layer's routing trace for the block; always switched off again afterwards."""
    traces: list[list[RoutingRecord]] = []
    try:
        for layer in layers:
            layer.routing_trace = []
            traces.append(layer.routing_trace)
        yield traces
    finally:
        for layer in layers:
            layer.routing_trace = None


@torch.no_grad()
def diagnose_model(model: BRMoEViT, batches: Iterable[tuple[Tensor, Tensor]],
                   device: torch.device | str | None = None) -> RoutingDiagnostics:
    """Routing diagnostics of a BR-MoE ViT on (images, true task) batches, task-free forwards in eval mode."""
    if model.n_tasks == 0:
        raise DiagnosticsError("the BR-MoE model has learned no task yet: nothing to diagnose")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    parts: list[list[BlockRouting]] = [[] for _ in model.layers]
    tasks: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        with routing_traces(list(model.layers)) as traces:
            for images, true_tasks in batches:
                true_tasks = torch.as_tensor(true_tasks, dtype=torch.long)
                if len(true_tasks) and not 0 <= int(true_tasks.min()) <= int(true_tasks.max()) < model.n_tasks:
                    raise DiagnosticsError(f"true tasks must lie in [0, {model.n_tasks}), got {true_tasks.tolist()[:10]}")
                model(images.to(device))
                for block, trace in enumerate(traces):
                    (record,) = trace  # one record per task-free forward
                    parts[block].append(block_outcomes(record, true_tasks, model.n_tasks))
                    trace.clear()
                tasks.append(true_tasks.numpy())
    finally:
        model.train(was_training)
    if not tasks:
        raise DiagnosticsError("no samples to diagnose routing on (empty loader)")
    return RoutingDiagnostics(
        blocks=[BlockRouting.concatenate(block) for block in parts],
        true_tasks=np.concatenate(tasks),
        n_tasks=model.n_tasks,
        topk_routers=model.config.topk_routers,
        topk_experts=model.config.topk_experts,
    )


def brmoe_model_of(method: torch.nn.Module) -> BRMoEViT:
    """The learner's BR-MoE ViT (CaRE's `model`); an error for methods without one."""
    # Imported here: timm is slow to import and `carecl --help` needs none of it.
    from carecl.tuners.brmoe import BRMoEViT

    models = [module for module in method.modules() if isinstance(module, BRMoEViT)]
    if len(models) != 1:
        name = getattr(getattr(method, "options", None), "name", type(method).__name__)
        raise DiagnosticsError(f"method {name!r} has {'no' if not models else len(models)} BR-MoE models: "
                               "routing diagnostics need exactly one (CaRE)")
    return models[0]


def diagnose_routing(experiment: Experiment, loader: DataLoader | None = None) -> RoutingDiagnostics:
    """Routing diagnostics of a learner on `loader` (default: the test images of all seen classes).

    The loader yields (images, labels) with labels as positions in the class order, as
    `Learner.test_loader` does; each sample's true task is the task that introduced its class.
    """
    method = experiment.method
    model = brmoe_model_of(method)
    if method.n_learned_tasks == 0:
        raise DiagnosticsError("the learner has learned no task yet: nothing to diagnose")
    loader = loader if loader is not None else experiment.test_loader(method.n_seen_classes)
    task_of_class = torch.as_tensor(experiment.scenario.task_of_class(), dtype=torch.long)
    was_training = method.training
    method.eval()
    try:
        return diagnose_model(model, ((images, task_of_class[labels]) for images, labels in loader), experiment.device)
    finally:
        method.train(was_training)
