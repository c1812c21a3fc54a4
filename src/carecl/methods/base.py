"""The method interface: a small class with hooks that the one training loop calls."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from carecl.config import ExperimentConfig, MethodConfig
from carecl.distributed import SINGLE_PROCESS, Distributed
from carecl.registry import Registry
from carecl.scenario import Scenario, Task

if TYPE_CHECKING:
    from torch.utils.data import DataLoader


def cosine_lr(base_lr: float, min_lr: float, period: int, epoch: int) -> float:
    """Learning rate of CosineAnnealingLR(T_max=period, eta_min=min_lr) after `epoch` steps."""
    if period <= 0:
        return base_lr
    return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * epoch / period)) / 2


@dataclass(frozen=True)
class Phase:
    """A stretch of training with a fresh optimiser and one cosine schedule (stepped per epoch).

    The schedule has period `schedule_epochs`; a phase may stop before the period ends (CaRE's
    first half of a task stops half-way down its cosine).
    """

    name: str
    epochs: int
    lr: float
    min_lr: float
    schedule_epochs: int

    @property
    def final_lr(self) -> float:
        return cosine_lr(self.lr, self.min_lr, self.schedule_epochs, self.epochs)


@dataclass
class StepOutput:
    """A training step's loss and the scalars worth logging."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class TaskContext:
    """What the engine hands to end-of-phase / end-of-task hooks."""

    task: Task
    scenario: Scenario
    device: torch.device
    # Loader over the current task's training images with *test* transforms (class statistics).
    statistics_loader: Callable[[], "DataLoader"]
    progress: bool = False
    # Under torchrun the statistics loader yields this rank's shard: reduce sums over ranks with it.
    distributed: Distributed = SINGLE_PROCESS


class Method(nn.Module):
    """Base class of continual learners; subclasses override the hooks they need.

    Call order for each task: begin_task -> for each phase: begin_phase, [training_loss ...], end_phase
    -> end_task -> predict (evaluation). `begin_task` must be deterministic given the task,
    so that a saved run can be rebuilt by replaying it before loading weights.
    """

    config_class: type[MethodConfig] = MethodConfig

    def __init__(self, config: ExperimentConfig, backbone: nn.Module, scenario: Scenario) -> None:
        super().__init__()
        self.experiment = config
        self.options = config.method
        self.scenario = scenario
        self.n_learned_tasks = 0

    @property
    def n_seen_classes(self) -> int:
        return int(self.scenario.boundaries[self.n_learned_tasks])

    def backbone_modules(self) -> list[nn.Module]:
        """Frozen modules rebuilt from the config rather than saved with each checkpoint."""
        return []

    def module_state_tensors(self) -> dict[str, torch.Tensor]:
        """The module's weights and buffers except the frozen backbone."""
        frozen = {id(t) for module in self.backbone_modules() for t in [*module.parameters(), *module.buffers()]}
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if id(v) not in frozen}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything learned (weights, buffers, statistics) except the frozen backbone."""
        return self.module_state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = set(self.module_state_tensors())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise KeyError(f"saved learner state does not fit: missing {missing[:10]}, unexpected {unexpected[:10]}")
        self.load_state_dict(tensors, strict=False)

    # ---- hooks -------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        """Grow whatever this task needs (experts, heads, ...)."""

    def training_phases(self, task: Task) -> list[Phase]:
        train = self.experiment.train
        if train.epochs == 0 or not self.trainable_parameters():
            return []
        return [Phase("train", train.epochs, train.lr, train.min_lr, train.epochs)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def training_loss(self, images: torch.Tensor, targets: torch.Tensor, task: Task) -> StepOutput:
        raise NotImplementedError(f"{type(self).__name__} does not train by gradient descent")

    def begin_phase(self, phase: Phase, context: TaskContext) -> None:
        """Called before each training phase (CaRE: snapshot the shared-adapter anchor)."""

    def end_phase(self, phase: Phase, context: TaskContext) -> None:
        """Called after each training phase (CaRE: class statistics and alignment)."""

    def end_task(self, context: TaskContext) -> None:
        """Called once the task's training is over (prototypes, freezing, ...)."""

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Scores (batch, n_seen_classes) over all classes seen so far."""
        raise NotImplementedError


MethodBuilder = Callable[[ExperimentConfig, nn.Module, Scenario], Method]
METHODS: Registry[type[Method]] = Registry("method")
