"""Classifier alignment (CaRE §6; SLCA-style baselines): retrain the classifier alone on features
sampled from every seen class's Gaussian (statistics.py), which rebalances old and new heads
without storing any exemplar.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from carecl.alignment_config import AlignmentConfig
from carecl.statistics import GaussianClassStatistics, StackedGaussians

DECAY_FORMULAS = ("intended", "release", "equal_tasks")


# ---------------------------------------------------------------- decay


def decay_scales(
    task_of_class: Sequence[int] | np.ndarray,
    current_task: int,
    formula: str,
    current_task_size: int,
) -> torch.Tensor:
    """Mean scale per class: 0.9 + 0.1 * (task_c + 1) / (current_task + 1).

    "intended": task_c = task_of_class[c], so the current task's classes keep scale 1 and
    older tasks shrink towards 0.9.

    "release": task_c = c // (-current_task_size), Python floor division by a negative task
    size (only the length of `task_of_class` is used). Class 0 gets task 0, classes 1..size get
    -1 (scale exactly 0.9), classes size+1..2*size get -2 (below 0.9), and so on: every mean
    shrinks more than intended, and the *newest* classes shrink the most. E.g. 3 tasks of 2
    classes, current_task 2: intended [.933, .933, .967, .967, 1, 1], release
    [.933, .9, .9, .867, .867, .833].

    "equal_tasks": task_c = c // current_task_size (SLCA's code): the intended formula when every
    task has the current task's size.
    """
    if formula not in DECAY_FORMULAS:
        raise ValueError(f"decay formula must be one of {DECAY_FORMULAS}, got {formula!r}")
    if current_task < 0:
        raise ValueError(f"current_task must be >= 0, got {current_task}")
    n_classes = len(task_of_class)
    if formula == "intended":
        tasks = torch.as_tensor(np.asarray(task_of_class), dtype=torch.float64)
    else:
        if current_task_size <= 0:
            raise ValueError(f"current_task_size must be positive for the {formula} formula, got {current_task_size}")
        # "release": the release's bug, kept bit for bit: floor division by the negated task size.
        size = -current_task_size if formula == "release" else current_task_size
        tasks = torch.tensor([c // size for c in range(n_classes)], dtype=torch.float64)
    return (0.9 + 0.1 * (tasks + 1) / (current_task + 1)).to(torch.float32)


# ---------------------------------------------------------------- alignment


def align_classifier(
    classifier: nn.Module,
    stats: GaussianClassStatistics,
    config: AlignmentConfig,
    *,
    n_seen_classes: int,
    scale: float,
    batch_size: int,
    task_of_class: Sequence[int] | np.ndarray | None = None,
    current_task: int = 0,
    current_task_size: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    on_epoch_end: Callable[[int, float, float], None] | None = None,
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
    steps_per_epoch: int | None = None,
) -> list[float]:
    """Retrain `classifier` alone on features sampled from the class Gaussians.

    Each epoch: `samples_per_class` draws per seen class (means scaled by `decay_scales` when
    `config.decay`), shuffled, then `n_seen_classes` SGD steps of CE(scale * cos, y) on
    mini-batches of `samples_per_class`. CosineAnnealingLR(T_max=config.scheduler_t_max) steps
    once per epoch. `on_epoch_end(epoch, mean_loss, lr_after_step)` is called after each epoch.
    `logits(features)` replaces `scale * classifier(features)[:, :n_seen_classes]` for heads that are
    not a CosineClassifier (SLCA's logit-normalised linear heads); the classifier's trainable parameters
    are trained either way. `steps_per_epoch` < n_seen_classes uses only that many of each epoch's
    mini-batches (HiDe-Prompt's code steps once per *old* class).
    Returns the mean loss of each epoch ([] when `config.epochs == 0`).
    """
    if config.epochs == 0:
        return []
    if logits is None and classifier.n_classes < n_seen_classes:
        raise ValueError(f"classifier has {classifier.n_classes} classes, fewer than n_seen_classes={n_seen_classes}")
    class_ids = list(range(n_seen_classes))
    missing = [c for c in class_ids if c not in stats]
    if missing:
        raise ValueError(f"no class statistics for seen classes {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    mean_scale = None
    if config.decay:
        if task_of_class is None:
            raise ValueError("alignment.decay needs task_of_class")
        mean_scale = decay_scales(task_of_class, current_task, config.decay_formula, current_task_size)[:n_seen_classes]
    device = torch.device(device) if device is not None else next(classifier.parameters()).device
    samples_per_class = config.resolved_samples_per_class(batch_size)
    gaussians = stats.stacked(class_ids, device)

    parameters = [p for p in classifier.parameters() if p.requires_grad]
    # foreach: one kernel per update for all heads (300+ at B100 Inc3) instead of a Python loop over them.
    optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                                foreach=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.scheduler_t_max)
    was_training = classifier.training
    classifier.train()
    losses: list[float] = []
    epochs = tqdm(range(config.epochs), desc="alignment", disable=not progress, leave=False)
    for epoch in epochs:
        loss = _align_epoch(logits or (lambda f: scale * classifier(f)[:, :n_seen_classes]), gaussians, optimizer,
                            samples_per_class, steps_per_epoch or n_seen_classes, mean_scale, generator)
        scheduler.step()
        losses.append(loss)
        epochs.set_postfix(loss=f"{loss:.4f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, loss, optimizer.param_groups[0]["lr"])
    classifier.train(was_training)
    return losses


def _align_epoch(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    gaussians: StackedGaussians,
    optimizer: torch.optim.Optimizer,
    samples_per_class: int,
    steps: int,
    mean_scale: torch.Tensor | None,
    generator: torch.Generator | None,
) -> float:
    with torch.no_grad():
        features, labels = gaussians.sample(samples_per_class, mean_scale, generator)
    device = features.device
    source = generator.device if generator is not None else device
    order = torch.randperm(features.shape[0], generator=generator, device=source).to(device)
    total = torch.zeros((), device=device)
    for step in range(steps):
        # Gather one shuffled mini-batch at a time rather than permuting the whole sample set.
        batch = order[step * samples_per_class : (step + 1) * samples_per_class]
        loss = F.cross_entropy(logits_of(features[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    mean_loss = (total / steps).item()
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"classifier alignment loss is {mean_loss}")
    return mean_loss
