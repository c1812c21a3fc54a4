"""Evaluate a learner: on the test data of every class seen so far in one head (class-incremental), or task by
task, each in its own label space (task-incremental, MTIL)."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from carecl.engine.costs import Stopwatch
from carecl.methods.base import Method
from carecl.distributed import SINGLE_PROCESS, Distributed
from carecl.metrics import TaskEvaluation, accuracy, correct_predictions
from carecl.scenario import Task


def scored_batches(predict: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device: torch.device,
                   watch: Stopwatch, progress: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(scores, labels) of each batch of `loader`; `watch` times the `predict` calls alone and counts their images."""
    for images, labels in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
        images = images.to(device, non_blocking=True)
        with watch:
            predicted = predict(images)
        watch.count(len(images))
        yield predicted.float().cpu().numpy(), labels.numpy()


@torch.no_grad()
def collect_scores(method: Method, loader: DataLoader, device: torch.device, progress: bool = False,
                   watch: Stopwatch | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class scores and targets over a loader, with the learner in eval mode (unreadable images skipped);
    `watch` times the predict calls alone."""
    method.eval()
    batches = list(scored_batches(method.predict, loader, device, watch or Stopwatch(device), progress))
    scores, targets = [b[0] for b in batches], [b[1] for b in batches]
    if not scores:  # every image skipped: accuracies come out NaN rather than crashing
        return np.zeros((0, method.n_seen_classes), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(scores), np.concatenate(targets)


def evaluate(method: Method, loader: DataLoader, device: torch.device, task: int, topk: int, progress: bool = False,
             distributed: Distributed = SINGLE_PROCESS, watch: Stopwatch | None = None) -> TaskEvaluation:
    """Accuracy on `loader`; under torchrun each rank scores its shard and per-sample results are gathered;
    `watch` times the predict calls (and counts their images)."""
    scores, targets = collect_scores(method, loader, device, progress, watch)
    top1, in_topk = correct_predictions(scores, targets, topk)
    shards = distributed.all_gather_objects((top1, in_topk, targets))
    top1, in_topk, targets = (np.concatenate(parts) for parts in zip(*shards))
    return TaskEvaluation.from_correct(task, top1, in_topk, targets, method.scenario.boundaries, topk)


@torch.no_grad()
def task_correct(method: Method, task: Task, loader: DataLoader, device: torch.device, topk: int,
                 distributed: Distributed, watch: Stopwatch | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (top-1, top-k) correctness of `predict_in_task` on one task's test images, gathered over ranks."""
    method.eval()
    top1, in_topk = [np.zeros(0, dtype=bool)], [np.zeros(0, dtype=bool)]
    for scores, labels in scored_batches(lambda images: method.predict_in_task(images, task), loader, device,
                                         watch or Stopwatch(device)):
        correct = correct_predictions(scores, labels - task.low, topk)
        top1.append(correct[0])
        in_topk.append(correct[1])
    shards = distributed.all_gather_objects((np.concatenate(top1), np.concatenate(in_topk)))
    return tuple(np.concatenate(parts) for parts in zip(*shards))


def evaluate_in_tasks(method: Method, loaders: list[tuple[Task, DataLoader]], device: torch.device, task: int, topk: int,
                      distributed: Distributed = SINGLE_PROCESS, watch: Stopwatch | None = None) -> TaskEvaluation:
    """Task-incremental accuracy after task `task`: each of `loaders`' tasks (learned ones, maybe later ones too)
    scored in its own label space; top-1 / top-k pool the learned tasks' test images."""
    results = [(evaluated, *task_correct(method, evaluated, loader, device, topk, distributed, watch))
               for evaluated, loader in loaders]
    learned = [r for r in results if r[0].index <= task]
    top1 = np.concatenate([r[1] for r in learned])
    in_topk = np.concatenate([r[2] for r in learned])
    old = np.concatenate([r[1] for r in learned if r[0].index < task] or [np.zeros(0, dtype=bool)])
    return TaskEvaluation(task=task, top1=accuracy(top1), topk=accuracy(in_topk), k=topk,
                          group_accuracy=[accuracy(r[1]) for r in results], old_accuracy=accuracy(old),
                          new_accuracy=accuracy(learned[-1][1]), n_samples=int(len(top1)))
