"""Where a run stands: its record of finished tasks, the loop state inside a task, and how both
are written into checkpoints (carecl.runs.checkpoints) and restored from them for a resume.

A checkpoint holds the learner and everything else the loop's future depends on (RNG states, the
optimiser, scheduler and gradient scaler, metrics so far), so a restored run goes on
to the same numbers as a run never interrupted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from carecl.runs import checkpoints as ckpt
from carecl.runs.checkpoints import (
    LEARNER_INFO,
    LEARNER_TENSORS,
    TRAINER_INFO,
    TRAINER_TENSORS,
    Checkpoint,
    CheckpointError,
    capture_rng,
    optimizer_state,
    restore_rng,
)
from carecl.config import ConfigError, ExperimentConfig, config_from_dict, config_to_dict
from carecl.backbones import backbone_preprocessing
from carecl.data import BenchmarkData, DatasetError, build_dataset
from carecl.engine.experiment import Learner, seed_everything
from carecl.metrics import TaskEvaluation
from carecl.runs.directory import CLASSES_FILE, CONFIG_FILE, RunClasses, RunDirectory, RunDirectoryError
from carecl.scenario import Scenario

log = logging.getLogger("carecl")

# Keys a resumed run may change: where the data lives and how the loop runs, never what it computes.
RESUME_OVERRIDABLE = frozenset({
    "data.root", "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.strict",
    "train.device", "train.progress", "train.checkpoint_every_epochs", "train.compile",
    "eval.every_n_tasks", "logging.tensorboard", "logging.every_n_steps",
})


@dataclass
class RunRecord:
    """What the finished tasks measured: the metrics so far, kept in every checkpoint.

    One wall time and skipped-image summary per finished task; evaluations only of the tasks
    `eval.every_n_tasks` evaluated; optimiser steps so far (the loggers' global step).
    """

    evaluations: list[TaskEvaluation] = field(default_factory=list)
    wall_times: list[float] = field(default_factory=list)
    skipped_images: list[dict[str, Any]] = field(default_factory=list)
    global_step: int = 0

    @property
    def n_tasks(self) -> int:
        return len(self.wall_times)

    def metrics_extra(self, scenario: Scenario) -> dict[str, Any]:
        return {"class_order": scenario.order.tolist(), "task_sizes": list(scenario.sizes),
                "wall_time_s": self.wall_times, "skipped_images": self.skipped_images}

    def to_json(self) -> dict[str, Any]:
        return {"evaluations": [e.__dict__ for e in self.evaluations], "wall_time_s": self.wall_times,
                "skipped_images": self.skipped_images, "global_step": self.global_step}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> "RunRecord":
        return cls([_evaluation_from_json(e) for e in document["evaluations"]],
                   list(document["wall_time_s"]), list(document["skipped_images"]), int(document.get("global_step", 0)))


def _evaluation_from_json(document: dict[str, Any]) -> TaskEvaluation:
    """JSON has null for NaN (old accuracy of the first task, empty groups)."""
    nan = float("nan")
    values = {k: (nan if v is None and k != "group_accuracy" else v) for k, v in document.items()}
    values["group_accuracy"] = [nan if a is None else a for a in document["group_accuracy"]]
    return TaskEvaluation(**values)


@dataclass
class TrainerState:
    """The loop's state inside a task, as a mid-task checkpoint records it.

    `phase` phases are done (end_phase included) and `epoch` epochs of the next one; optimiser,
    scheduler and the phase-start values of the trainable parameters exist only mid-phase.
    """

    phase: int
    epoch: int
    loader: DataLoader | None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    phase_start: dict[str, torch.Tensor] | None = None
    # fp16's gradient scaler (scale, growth tracker); None without one.
    scaler: dict[str, Any] | None = None


@dataclass
class TaskResume:
    """A task interrupted after a mid-task checkpoint: where to go on, and the loop state to restore."""

    phase: int
    epoch: int
    loader_generator: torch.Tensor | None
    optimizer: dict[str, Any] | None
    optimizer_tensors: dict[str, torch.Tensor]
    scheduler: dict[str, Any] | None
    phase_start: dict[str, torch.Tensor]
    elapsed: float
    scaler: dict[str, Any] | None = None

    @property
    def mid_phase(self) -> bool:
        return self.optimizer is not None


def save_learner(run: RunDirectory, learner: Learner) -> None:
    """The learner alone, as after its last finished task (no trainer state: it cannot be resumed)."""
    scenario = learner.scenario
    info = {"n_learned_tasks": learner.method.n_learned_tasks, "class_order": scenario.order.tolist(), "task_sizes": list(scenario.sizes)}
    run.save_state(learner.method.state_tensors(), info)


def save_checkpoint(run: RunDirectory, learner: Learner, record: RunRecord, state: TrainerState | None = None,
                    elapsed: float = 0.0) -> str:
    """A resumable checkpoint: after the last task in `record`, or inside the next one (`state`)."""
    method, scenario = learner.method, learner.scenario
    in_task = state is not None
    info = {
        "n_learned_tasks": method.n_learned_tasks,
        "grown_tasks": method.n_learned_tasks + int(in_task),
        "class_order": scenario.order.tolist(),
        "task_sizes": list(scenario.sizes),
        "position": {"phase": state.phase, "epoch": state.epoch} if in_task else None,
    }
    rng, tensors = capture_rng()
    document: dict[str, Any] = {
        "format": ckpt.FORMAT_VERSION,
        "config": config_to_dict(learner.config),
        "record": record.to_json(),
        "rng": rng,
        "skipped_in_task": learner.skipped_images.files if in_task else {},
        "task_elapsed_s": elapsed,
        "data": data_fingerprint(learner.data),
    }
    if in_task:
        if state.loader is not None and state.loader.generator is not None:  # None: a DistributedSampler's seeded order
            tensors["loader.generator"] = state.loader.generator.get_state()
        if state.optimizer is not None:
            document["optimizer"], optimizer_tensors = optimizer_state(state.optimizer, "optimizer")
            tensors.update(optimizer_tensors)
            document["scheduler"] = state.scheduler.state_dict()
            tensors.update({f"phase_start.{k}": v for k, v in state.phase_start.items()})
            document["scaler"] = state.scaler
    name = run.save_state(method.state_tensors(), info, trainer_tensors=tensors, trainer_info=document)
    log.debug("checkpoint %s written", name)
    return name


def data_fingerprint(data: BenchmarkData) -> dict[str, Any]:
    """Enough of the dataset to notice that a resume would see different data."""
    return {"name": data.name, "classes": data.class_names, "train": len(data.train), "test": len(data.test)}


def grow_and_load(learner: Learner, checkpoint_tensors: dict[str, torch.Tensor], info: dict[str, Any], source: Path) -> None:
    """Replay begin_task for every task the saved learner had grown, then load its tensors."""
    scenario, method = learner.scenario, learner.method
    if info["class_order"] != scenario.order.tolist():
        raise CheckpointError(f"{source}: saved class order differs from the one the run's config produces")
    for task in scenario.tasks()[: info.get("grown_tasks", info["n_learned_tasks"])]:
        method.begin_task(task)
    method.n_learned_tasks = info["n_learned_tasks"]
    try:
        method.load_state_tensors(checkpoint_tensors)
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{source}: the saved learner does not fit the run's config: {error}") from None
    method.to(learner.device)


def load_learner(run: RunDirectory, *, need_data: bool = True, data_root: str | Path | None = None) -> Learner:
    """Rebuild a run's learner from its config and the last finished task's checkpoint.

    With its dataset, which must have the classes the run recorded (classes.json): evaluation and
    diagnosis need the test set. With `need_data=False` (prediction), a dataset that cannot be built
    or has other classes is done without: the learner is built from the recorded classes instead
    (Learner.for_inference), the same model and transform. `data_root` replaces the config's data.root.
    """
    config = run.config_for_loading()
    if data_root is not None:
        config.data.root = str(data_root)
    recorded = run.classes()
    data = _dataset_of_run(run, config, recorded, need_data)
    learner = Learner.build(config, data) if data is not None else Learner.for_inference(config, recorded)
    tensors, info = run.load_state()
    grow_and_load(learner, tensors, info, run.path)
    return learner


def _dataset_of_run(run: RunDirectory, config: ExperimentConfig, recorded: RunClasses | None,
                    need_data: bool) -> BenchmarkData | None:
    """The run's dataset, checked against its recorded classes; None where prediction can do without it."""
    try:
        data = build_dataset(config.data, backbone_preprocessing(config.backbone))
    except DatasetError as error:
        if need_data:
            raise
        if recorded is None:
            raise RunDirectoryError(f"{run.path / CLASSES_FILE} not found (the run was written before carecl "
                                    f"recorded its classes), so it needs its dataset, which cannot be built: {error}") from None
        log.debug("%s: loading without the dataset (%s), classes from %s", run.path, error, CLASSES_FILE)
        return None
    difference = recorded.difference(data.class_names) if recorded is not None else None
    if difference is None:
        return data
    if need_data:
        raise DatasetError(f"the dataset of {run.path} (data.root {config.data.root}) no longer has the classes "
                           f"recorded in {run.path / CLASSES_FILE} at training: {difference}")
    log.debug("%s: the dataset's classes differ from %s (%s); using the recorded ones", run.path, CLASSES_FILE, difference)
    return None


def restore(run: RunDirectory, checkpoint: Checkpoint, config: ExperimentConfig) -> tuple[Learner, RunRecord, TaskResume | None]:
    """A learner exactly as when `checkpoint` was written, RNG states included (restored last)."""
    if not checkpoint.has(TRAINER_INFO):
        raise CheckpointError(f"checkpoint {checkpoint.path} holds no training state (it was written by save_state, "
                              "e.g. an imported model): it can be evaluated but not resumed")
    document = checkpoint.document(TRAINER_INFO)
    trainer = checkpoint.tensors(TRAINER_TENSORS)
    saved_config = config_from_dict(document["config"])
    differing = [key for key in config_differences(saved_config, run.config()) if key not in RESUME_OVERRIDABLE]
    if differing:
        raise CheckpointError(f"{run.path / CONFIG_FILE} differs from the config checkpoint {checkpoint.path} was "
                              f"written with, at {', '.join(differing)}; restore the file to resume")
    info = checkpoint.document(LEARNER_INFO)
    seed_everything(config.seed)
    learner = Learner.build(config)
    saved_data, data_now = document.get("data"), data_fingerprint(learner.data)
    if saved_data is not None and saved_data != data_now:
        changed = ", ".join(f"{k} {saved_data.get(k) if k != 'classes' else len(saved_data[k])} -> "
                            f"{data_now[k] if k != 'classes' else len(data_now[k])}"
                            for k in data_now if saved_data.get(k) != data_now[k])
        raise CheckpointError(f"the data differ from those checkpoint {checkpoint.path} was trained on ({changed}); "
                              "resuming would not continue the same run")
    grow_and_load(learner, checkpoint.tensors(LEARNER_TENSORS), info, checkpoint.path)
    record = RunRecord.from_json(document["record"])
    resume = None
    if info.get("position") is not None:
        position = info["position"]
        resume = TaskResume(
            phase=position["phase"], epoch=position["epoch"],
            loader_generator=trainer.get("loader.generator"),
            optimizer=document.get("optimizer"),
            optimizer_tensors={k: v for k, v in trainer.items() if k.startswith("optimizer.")},
            scheduler=document.get("scheduler"),
            phase_start={k[len("phase_start."):]: v for k, v in trainer.items() if k.startswith("phase_start.")},
            elapsed=float(document.get("task_elapsed_s", 0.0)),
            scaler=document.get("scaler"),
        )
        learner.skipped_images.reset(document.get("skipped_in_task"))
    restore_rng(document["rng"], trainer)
    return learner, record, resume


def resume_config(run: RunDirectory, given: ExperimentConfig | None, overrides: Sequence[str]) -> ExperimentConfig:
    """The config to resume `run` with: its own, where `given`/`overrides` may change only RESUME_OVERRIDABLE keys."""
    from carecl.config import load_config

    stored = run.config()
    wanted = given if given is not None else load_config(run.path / CONFIG_FILE, overrides)
    differing = [key for key in config_differences(stored, wanted) if key not in RESUME_OVERRIDABLE]
    if differing:
        raise ConfigError(
            f"cannot resume {run.path} with a different config: {', '.join(differing)} differ from "
            f"{run.path / CONFIG_FILE} (a resumed run keeps its config; only {', '.join(sorted(RESUME_OVERRIDABLE))} may change)"
        )
    return wanted


def config_differences(first: ExperimentConfig, second: ExperimentConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    def flatten(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    a, b = flatten(config_to_dict(first), ""), flatten(config_to_dict(second), "")
    return sorted(key for key in a.keys() | b.keys() if not _same(a.get(key), b.get(key)))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b
