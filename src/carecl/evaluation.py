"""Evaluate a learner on the test data of every class seen so far."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from carecl.methods.base import Method
from carecl.metrics import TaskEvaluation


@torch.no_grad()
def collect_scores(method: Method, loader: DataLoader, device: torch.device, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Class scores and targets over a loader, with the learner in eval mode."""
    method.eval()
    scores, targets = [], []
    for images, labels in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
        scores.append(method.predict(images.to(device, non_blocking=True)).float().cpu().numpy())
        targets.append(labels.numpy())
    return np.concatenate(scores), np.concatenate(targets)


def evaluate(method: Method, loader: DataLoader, device: torch.device, task: int, topk: int, progress: bool = False) -> TaskEvaluation:
    scores, targets = collect_scores(method, loader, device, progress)
    return TaskEvaluation.from_predictions(task, scores, targets, method.scenario.boundaries, topk)
