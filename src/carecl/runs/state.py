"""Where a run stands, typed: the record of finished tasks (`RunProgress`) and the loop's position
inside an unfinished task (`MidTaskState`), each written into checkpoints and read back the same way.

Also the rule of what a resume may change in a run's config. Nothing here builds a learner:
engine/checkpointing.py does, from these records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from carecl.config import ExperimentConfig, config_to_dict
from carecl.metrics import RunSummary, TaskEvaluation
from carecl.scenario import Scenario

# Keys a resumed run may change: where the data lives and how the loop runs, and the learning rate
# of the tasks still to learn (a lower one after a diverged loss); never what finished tasks computed.
RESUME_OVERRIDABLE = frozenset({
    "train.lr", "train.min_lr",
    "data.root", "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.strict",
    "train.device", "train.threads", "train.progress", "train.checkpoint_every_epochs", "train.compile",
    "eval.every_n_tasks", "eval.batch_size", "logging.tensorboard", "logging.every_n_steps",
})


@dataclass
class RunProgress:
    """What the finished tasks measured: the metrics so far, kept in every checkpoint.

    One wall time and skipped-image summary per finished task; evaluations only of the tasks
    `eval.every_n_tasks` evaluated; optimiser steps so far (the loggers' global step).
    """

    evaluations: list[TaskEvaluation] = field(default_factory=list)
    wall_times: list[float] = field(default_factory=list)
    skipped_images: list[dict[str, Any]] = field(default_factory=list)
    global_step: int = 0
    # Per finished task: trainable and added parameters, seconds per phase, peak memory (engine/costs.py).
    costs: list[dict[str, Any]] = field(default_factory=list)
    # The validation split's evaluations, beside the test set's (data.validation_fraction).
    validation: list[TaskEvaluation] = field(default_factory=list)

    @property
    def n_tasks(self) -> int:
        return len(self.wall_times)

    def metrics_extra(self, scenario: Scenario, evaluated_split: str = "test") -> dict[str, Any]:
        extra = {"evaluated_on": evaluated_split, "class_order": scenario.order.tolist(),
                 "task_sizes": list(scenario.sizes), "wall_time_s": self.wall_times,
                 "skipped_images": self.skipped_images, "costs": self.costs}
        if self.validation:
            extra["validation"] = {"summary": RunSummary.from_evaluations(self.validation).__dict__,
                                   "tasks": [e.__dict__ for e in self.validation]}
        return extra

    def to_json(self) -> dict[str, Any]:
        return {"evaluations": [e.__dict__ for e in self.evaluations], "wall_time_s": self.wall_times,
                "skipped_images": self.skipped_images, "global_step": self.global_step, "costs": self.costs,
                "validation": [e.__dict__ for e in self.validation]}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> "RunProgress":
        return cls([evaluation_from_json(e) for e in document["evaluations"]],
                   list(document["wall_time_s"]), list(document["skipped_images"]), int(document["global_step"]),
                   list(document.get("costs") or []),
                   [evaluation_from_json(e) for e in document.get("validation") or []])


    def merge_recorded(self, metrics: dict[str, Any] | None) -> None:
        """Take the evaluations and wall times metrics.json recorded for finished tasks after this record's
        checkpoint was written (a task is checkpointed before its evaluation), so they are not redone."""
        if not metrics:
            return
        self._merge(self.evaluations, metrics.get("tasks") or [])
        self._merge(self.validation, (metrics.get("validation") or {}).get("tasks") or [])
        recorded = metrics.get("wall_time_s") or []
        for index, seconds in enumerate(recorded[: self.n_tasks]):
            self.wall_times[index] = float(seconds)

    def _merge(self, evaluations: list[TaskEvaluation], documents: list[Any]) -> None:
        known = {e.task for e in evaluations}
        for document in documents:
            if isinstance(document, dict) and document.get("task", self.n_tasks) < self.n_tasks and document["task"] not in known:
                evaluations.append(evaluation_from_json(document))
        evaluations.sort(key=lambda e: e.task)


def evaluation_from_json(document: dict[str, Any]) -> TaskEvaluation:
    """JSON has null for NaN (old accuracy of the first task, empty groups)."""
    nan = float("nan")
    values = {k: (nan if v is None and k != "group_accuracy" else v) for k, v in document.items()}
    values["group_accuracy"] = [nan if a is None else a for a in document["group_accuracy"]]
    return TaskEvaluation(**values)


@dataclass
class MidTaskState:
    """The loop's position inside a task, as a mid-task checkpoint holds it and a resume continues it.

    `phase` phases are done (end_phase included) and `epoch` epochs of the next one. Optimiser,
    scheduler and gradient-scaler states exist only mid-phase (`optimizer` None at a phase boundary);
    the optimiser's tensors travel apart from its JSON document (safetensors, never pickled).
    """

    phase: int
    epoch: int
    elapsed: float = 0.0
    loader_generator: torch.Tensor | None = None
    optimizer: dict[str, Any] | None = None
    optimizer_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    skipped_files: dict[str, str] = field(default_factory=dict)

    @property
    def mid_phase(self) -> bool:
        return self.optimizer is not None

    def position(self) -> dict[str, int]:
        return {"phase": self.phase, "epoch": self.epoch}

    def document(self) -> dict[str, Any]:
        """The JSON part (tensors: `tensors()`)."""
        return {"optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler,
                "task_elapsed_s": self.elapsed, "skipped_in_task": self.skipped_files}

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.optimizer_tensors)
        if self.loader_generator is not None:
            tensors["loader.generator"] = self.loader_generator
        return tensors

    @classmethod
    def read(cls, position: dict[str, int], document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "MidTaskState":
        return cls(
            phase=int(position["phase"]), epoch=int(position["epoch"]),
            elapsed=float(document.get("task_elapsed_s", 0.0)),
            loader_generator=tensors.get("loader.generator"),
            optimizer=document.get("optimizer"),
            optimizer_tensors={k: v for k, v in tensors.items() if k.startswith("optimizer.")},
            scheduler=document.get("scheduler"), scaler=document.get("scaler"),
            skipped_files=dict(document.get("skipped_in_task") or {}),
        )


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
