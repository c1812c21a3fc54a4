"""Evaluate a learner on the test data of every class seen so far."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from carecl.methods.base import Method
from carecl.distributed import SINGLE_PROCESS, Distributed
from carecl.metrics import TaskEvaluation, correct_predictions


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


def evaluate(method: Method, loader: DataLoader, device: torch.device, task: int, topk: int, progress: bool = False,
             distributed: Distributed = SINGLE_PROCESS) -> TaskEvaluation:
    """Accuracy on `loader`; under torchrun each rank scores its shard and per-sample results are gathered."""
    scores, targets = collect_scores(method, loader, device, progress)
    top1, in_topk = correct_predictions(scores, targets, topk)
    shards = distributed.all_gather_objects((top1, in_topk, targets))
    top1, in_topk, targets = (np.concatenate(parts) for parts in zip(*shards))
    return TaskEvaluation.from_correct(task, top1, in_topk, targets, method.scenario.boundaries, topk)
