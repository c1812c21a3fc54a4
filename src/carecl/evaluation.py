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
    """Class scores and targets over a loader, with the learner in eval mode (unreadable images skipped)."""
    method.eval()
    scores, targets = [], []
    for images, labels in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
        scores.append(method.predict(images.to(device, non_blocking=True)).float().cpu().numpy())
        targets.append(labels.numpy())
    if not scores:  # every image skipped: accuracies come out NaN rather than crashing
        return np.zeros((0, method.n_seen_classes), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(scores), np.concatenate(targets)


def evaluate(method: Method, loader: DataLoader, device: torch.device, task: int, topk: int, progress: bool = False) -> TaskEvaluation:
    scores, targets = collect_scores(method, loader, device, progress)
    return TaskEvaluation.from_predictions(task, scores, targets, method.scenario.boundaries, topk)
