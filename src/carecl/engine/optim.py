"""Optimisers and schedules from a method's parameter groups (the config names the optimiser)."""

from __future__ import annotations

import math

import torch

from carecl.config import TrainConfig
from carecl.methods.base import ParameterGroup, Phase

OPTIMIZERS = {
    "sgd": lambda groups, train: torch.optim.SGD(groups, momentum=train.momentum),
    "adam": lambda groups, train: torch.optim.Adam(groups),
    "adamw": lambda groups, train: torch.optim.AdamW(groups),
}


def build_optimizer(train: TrainConfig, groups: list[ParameterGroup], lr: float, name: str | None = None
                    ) -> torch.optim.Optimizer:
    """`name` (default `train.optimizer`) over the groups: each at lr x its scale, with its own weight decay or
    train.weight_decay."""
    name = name or train.optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimiser {name!r}; known: {sorted(OPTIMIZERS)}")
    param_groups = [{"params": group.parameters, "lr": lr * group.lr_scale, "name": group.name,
                     "weight_decay": train.weight_decay if group.weight_decay is None else group.weight_decay}
                    for group in groups if group.parameters]
    return OPTIMIZERS[name](param_groups, train)


def coda_cosine(optimizer: torch.optim.Optimizer, phase: Phase, batches_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """CODA-Prompt's CosineSchedule: lr x cos(99π·epoch / (200·(K - 1))), K = schedule_epochs."""
    span = max(phase.schedule_epochs - 1, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: math.cos(99 * math.pi * epoch / (200 * span)))


def cosine_annealing(optimizer: torch.optim.Optimizer, phase: Phase, batches_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(phase.schedule_epochs, 1), eta_min=phase.min_lr)


def warmup_cosine_factor(step: int, warmup: int, total: int) -> float:
    """lr / base lr at optimiser step `step` (0-based): (step + 1) / warmup while warming up, then
    0.5 (1 + cos(π (step - warmup) / (total - warmup))): 0 at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def warmup_cosine(optimizer: torch.optim.Optimizer, phase: Phase, batches_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = steps_in_phase(phase, batches_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, phase.warmup_steps, total))


def tenfold_decay_every_10_epochs(optimizer: torch.optim.Optimizer, phase: Phase, batches_per_epoch: int
                                  ) -> torch.optim.lr_scheduler.LRScheduler:
    """Per step: lr x 0.1^floor(epoch / 10), epoch = step // batches_per_epoch (MoE-Adapters4CL's autoencoders)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1 ** (step // max(batches_per_epoch, 1) // 10))


def constant(optimizer: torch.optim.Optimizer, phase: Phase, batches_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


SCHEDULES = {"cosine": cosine_annealing, "coda_cosine": coda_cosine, "warmup_cosine": warmup_cosine, "constant": constant,
             "tenfold_decay_every_10_epochs": tenfold_decay_every_10_epochs}
# Schedules stepped after every optimiser step rather than every epoch.
PER_STEP_SCHEDULES = frozenset({"warmup_cosine", "tenfold_decay_every_10_epochs"})


def steps_in_phase(phase: Phase, batches_per_epoch: int) -> int:
    return phase.steps if phase.steps is not None else phase.epochs * batches_per_epoch


def build_scheduler(optimizer: torch.optim.Optimizer, phase: Phase, batches_per_epoch: int = 1
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    """The phase's schedule (every group follows it from its own starting lr): MultiStepLR at the phase's
    milestones, else `SCHEDULES[phase.schedule]`; stepped once per epoch, or per optimiser step for
    PER_STEP_SCHEDULES (whose length is the phase's steps: `batches_per_epoch` x epochs unless fixed)."""
    if phase.milestones:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(phase.milestones), gamma=phase.lr_decay)
    if phase.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {phase.schedule!r}; known: {sorted(SCHEDULES)}")
    return SCHEDULES[phase.schedule](optimizer, phase, batches_per_epoch)
