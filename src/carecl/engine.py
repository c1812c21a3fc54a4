"""The one training loop: tasks, phases, epochs, evaluation, run directory."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from carecl.backbones import create_backbone
from carecl.config import ExperimentConfig, TrainConfig
from carecl.data import BenchmarkData, TaskDataset, build_dataset
from carecl.errors import CareclError
from carecl.evaluation import evaluate
from carecl.methods import build_method
from carecl.methods.base import Method, Phase, TaskContext
from carecl.metrics import RunSummary, TaskEvaluation
from carecl.rundir import RunDirectory
from carecl.scenario import Scenario, Task

log = logging.getLogger("carecl")


class TrainingError(CareclError, RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(train: TrainConfig, parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=train.weight_decay)
    raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {train.optimizer!r}")


@dataclass
class Learner:
    """Everything a run needs, built (and validated) before any training starts."""

    config: ExperimentConfig
    data: BenchmarkData
    scenario: Scenario
    method: Method
    device: torch.device

    @classmethod
    def build(cls, config: ExperimentConfig) -> "Learner":
        data = build_dataset(config.data)
        scenario = Scenario.build(
            data.n_classes, config.data.init_cls, config.data.increment,
            seed=config.seed, shuffle=config.data.shuffle, explicit_order=config.data.class_order,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # random-init backbones are reproducible from the config
            backbone = create_backbone(config.backbone)
        device = resolve_device(config.train.device)
        method = build_method(config, backbone, scenario).to(device)
        return cls(config, data, scenario, method, device)

    # ---- loaders ---------------------------------------------------------------------
    def _loader(self, split: str, low: int, high: int, train: bool, seed: int = 0) -> DataLoader:
        source = self.data.train if split == "train" else self.data.test
        transform = self.data.train_transform if train else self.data.test_transform
        dataset = TaskDataset(source, self.scenario.label_map, low, high, transform)
        batch = self.config.train.batch_size if train else self.config.eval.batch_size
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + seed) if train else None
        return DataLoader(
            dataset, batch_size=batch, shuffle=train, generator=generator,
            num_workers=self.config.data.num_workers, pin_memory=self.device.type == "cuda",
        )

    def train_loader(self, task: Task) -> DataLoader:
        return self._loader("train", task.low, task.high, train=True, seed=task.index)

    def statistics_loader(self, task: Task) -> DataLoader:
        return self._loader("train", task.low, task.high, train=False)

    def test_loader(self, n_seen: int) -> DataLoader:
        return self._loader("test", 0, n_seen, train=False)

    def context(self, task: Task) -> TaskContext:
        return TaskContext(task, self.scenario, self.device, lambda: self.statistics_loader(task), self.config.train.progress)


def fit_phase(learner: Learner, phase: Phase, task: Task, loader: DataLoader) -> None:
    """Train the method's trainable parameters for one phase: fresh SGD, per-epoch cosine."""
    method, train = learner.method, learner.config.train
    optimizer = build_optimizer(train, method.trainable_parameters(), phase.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(phase.schedule_epochs, 1), eta_min=phase.min_lr)
    epochs = tqdm(range(phase.epochs), desc=f"task {task.index} {phase.name}", leave=False, disable=not train.progress)
    for _ in epochs:
        method.train()
        total, count = 0.0, 0
        for images, targets in loader:
            images, targets = images.to(learner.device, non_blocking=True), targets.to(learner.device, non_blocking=True)
            step = method.training_loss(images, targets, task)
            if not torch.isfinite(step.loss):
                raise TrainingError(f"task {task.index} phase {phase.name}: loss became {step.loss.item()}; stopping")
            optimizer.zero_grad(set_to_none=True)
            step.loss.backward()
            optimizer.step()
            total, count = total + step.loss.item() * len(targets), count + len(targets)
        scheduler.step()
        epochs.set_postfix(loss=f"{total / max(count, 1):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        log.debug("task %d %s: loss %.4f", task.index, phase.name, total / max(count, 1))
    optimizer.zero_grad(set_to_none=True)  # free gradient memory; nothing stale leaks into the next task


def learn_task(learner: Learner, task: Task) -> None:
    method = learner.method
    method.begin_task(task)
    method.to(learner.device)
    context = learner.context(task)
    phases = method.training_phases(task)
    loader = learner.train_loader(task) if phases else None
    for phase in phases:
        method.begin_phase(phase, context)
        fit_phase(learner, phase, task, loader)
        method.end_phase(phase, context)
    method.end_task(context)
    method.n_learned_tasks = task.index + 1


def run_experiment(config: ExperimentConfig, output: str | Path) -> RunSummary:
    """Build everything (failing early on bad input), then learn and evaluate task by task."""
    seed_everything(config.seed)
    learner = Learner.build(config)
    run = RunDirectory.create(output, config)
    scenario = learner.scenario
    handler = attach_log_file(run.path)
    try:
        log.info("%s on %s: %d classes in %d tasks %s, device %s", config.method.name, config.data.dataset,
                 scenario.n_classes, scenario.n_tasks, list(scenario.sizes)[:8], learner.device)
        with logging_redirect_tqdm():
            return learn_all_tasks(learner, run)
    finally:
        log.removeHandler(handler)
        handler.close()


def learn_all_tasks(learner: Learner, run: RunDirectory) -> RunSummary:
    config, scenario = learner.config, learner.scenario
    evaluations: list[TaskEvaluation] = []
    wall_times: list[float] = []
    for task in tqdm(scenario.tasks(), desc="tasks", unit="task", disable=not config.train.progress):
        started = time.perf_counter()
        learn_task(learner, task)
        evaluation = evaluate(learner.method, learner.test_loader(task.high), learner.device, task.index, config.eval.topk)
        wall_times.append(time.perf_counter() - started)
        evaluations.append(evaluation)
        log.info("task %d/%d  classes %d  top1 %.2f  top%d %.2f  old %s  new %.2f  (%.1fs)",
                 task.index + 1, scenario.n_tasks, task.high, evaluation.top1, evaluation.k, evaluation.topk,
                 "-" if task.index == 0 else f"{evaluation.old_accuracy:.2f}", evaluation.new_accuracy, wall_times[-1])
        save_learner(run, learner)
        summary = run.write_metrics(evaluations, {"class_order": scenario.order.tolist(), "task_sizes": list(scenario.sizes), "wall_time_s": wall_times})
    return summary


def save_learner(run: RunDirectory, learner: Learner) -> None:
    scenario = learner.scenario
    info = {"n_learned_tasks": learner.method.n_learned_tasks, "class_order": scenario.order.tolist(), "task_sizes": list(scenario.sizes)}
    run.save_state(learner.method.state_tensors(), info)


def load_learner(run: RunDirectory) -> Learner:
    """Rebuild a run's learner from its config and saved state (replaying the tasks' growth)."""
    config = run.config()
    learner = Learner.build(config)
    tensors, info = run.load_state()
    if info["class_order"] != learner.scenario.order.tolist():
        raise ValueError(f"{run.path}: saved class order differs from the one its config produces")
    for task in learner.scenario.tasks()[: info["n_learned_tasks"]]:
        learner.method.begin_task(task)
    learner.method.n_learned_tasks = info["n_learned_tasks"]
    learner.method.load_state_tensors(tensors)
    learner.method.to(learner.device)
    return learner


def attach_log_file(directory: Path) -> logging.Handler:
    handler = logging.FileHandler(directory / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    return handler
