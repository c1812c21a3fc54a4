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


def build_optimizer(train: TrainConfig, groups: list[ParameterGroup], lr: float) -> torch.optim.Optimizer:
    """`train.optimizer` over the groups: each at lr x its scale, with its own weight decay or train.weight_decay."""
    param_groups = [{"params": group.parameters, "lr": lr * group.lr_scale, "name": group.name,
                     "weight_decay": train.weight_decay if group.weight_decay is None else group.weight_decay}
                    for group in groups if group.parameters]
    return OPTIMIZERS[train.optimizer](param_groups, train)


def coda_cosine(optimizer: torch.optim.Optimizer, phase: Phase) -> torch.optim.lr_scheduler.LRScheduler:
    """CODA-Prompt's CosineSchedule: lr x cos(99π·epoch / (200·(K - 1))), K = schedule_epochs."""
    span = max(phase.schedule_epochs - 1, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: math.cos(99 * math.pi * epoch / (200 * span)))


def cosine_annealing(optimizer: torch.optim.Optimizer, phase: Phase) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(phase.schedule_epochs, 1), eta_min=phase.min_lr)


SCHEDULES = {"cosine": cosine_annealing, "coda_cosine": coda_cosine}


def build_scheduler(optimizer: torch.optim.Optimizer, phase: Phase) -> torch.optim.lr_scheduler.LRScheduler:
    """The phase's schedule, stepped once per epoch (every group follows it from its own starting lr):
    MultiStepLR at the phase's milestones, else `SCHEDULES[phase.schedule]`."""
    if phase.milestones:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(phase.milestones), gamma=phase.lr_decay)
    if phase.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {phase.schedule!r}; known: {sorted(SCHEDULES)}")
    return SCHEDULES[phase.schedule](optimizer, phase)
