"""Incremental evaluation, exact for methods whose class scores never change once a class is learned
(`Method.fixed_class_scores`: SimpleCIL, APER, FeCAM): each task's test images are read and embedded once;
afterwards every evaluation scores only the classes learned since the previous one on the stored features
and merges them into each image's stored top-k. After task t of a 301-task run that is 2-3 new classes
against every stored image instead of every image through the backbone against every class.

Methods that retrain shared weights or a joint head (CaRE's shared adapters and aligned head, RanPAC's and
ACIL's ridge heads, every adapter or prompt learner) move old classes' scores, so they are evaluated in full.
The store lives in memory: a resumed run rebuilds it at its first evaluation (the same numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from carecl.engine.costs import Stopwatch
from carecl.metrics import TaskEvaluation


@dataclass
class StoredTask:
    """One task's test images as the evaluator keeps them: features, targets, top-k over the classes scored so far."""

    features: Tensor
    targets: Tensor
    top_scores: Tensor
    top_classes: Tensor


def merge_top_k(scores: Tensor, classes: Tensor, new_scores: Tensor, first_new: int, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of (stored top-k) ∪ (scores of classes first_new.. ), highest first."""
    new_classes = torch.arange(first_new, first_new + new_scores.shape[1], device=new_scores.device).expand_as(new_scores)
    all_scores, all_classes = torch.cat([scores, new_scores], dim=1), torch.cat([classes, new_classes], dim=1)
    top_scores, where = all_scores.topk(min(k, all_scores.shape[1]), dim=1)
    return top_scores, all_classes.gather(1, where)


class IncrementalEvaluator:
    def __init__(self) -> None:
        self.tasks: dict[int, StoredTask] = {}
        self.scored_classes = 0

    @torch.no_grad()
    def evaluate(self, experiment, task, watch: Stopwatch | None = None) -> TaskEvaluation:
        method, device, k = experiment.method, experiment.device, experiment.config.eval.topk
        method.eval()
        watch, n_scored = watch or Stopwatch(device), 0
        for evaluated in experiment.scenario.tasks()[:task.index + 1]:
            stored = self.tasks.get(evaluated.index)
            if stored is None:
                self.tasks[evaluated.index] = self.embed_task(experiment, evaluated, task.high, k, watch)
                n_scored += len(self.tasks[evaluated.index].targets)
            elif task.high > self.scored_classes and len(stored.targets):
                with watch:
                    new = method.scores_from_features(stored.features.to(device), self.scored_classes, task.high).float()
                    stored.top_scores, stored.top_classes = merge_top_k(stored.top_scores.to(device),
                                                                        stored.top_classes.to(device), new,
                                                                        self.scored_classes, k)
                n_scored += len(stored.targets)
        self.scored_classes = task.high
        parts = [self.tasks[t.index] for t in experiment.scenario.tasks()[:task.index + 1]]
        targets = torch.cat([part.targets for part in parts]).numpy()
        classes = torch.cat([part.top_classes.cpu() for part in parts]).numpy()
        top1 = classes[:, 0] == targets
        in_topk = (classes == targets[:, None]).any(axis=1)
        watch.count(n_scored)
        return TaskEvaluation.from_correct(task.index, top1, in_topk, targets, experiment.scenario.boundaries, k)

    def embed_task(self, experiment, evaluated, high: int, k: int, watch: Stopwatch) -> StoredTask:
        method, device = experiment.method, experiment.device
        features, targets = [], []
        for images, labels in experiment.task_test_loader(evaluated):
            with watch:
                features.append(method.eval_features(images.to(device, non_blocking=True)).float().cpu())
            targets.append(labels)
        if not features:  # a task without test images (classes learned later from a folder without test/)
            empty = torch.zeros(0, min(k, high))
            return StoredTask(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long), empty, empty.long())
        stored_features = torch.cat(features)
        with watch:
            scores = method.scores_from_features(stored_features.to(device), 0, high).float()
            top_scores, top_classes = scores.topk(min(k, high), dim=1)
        return StoredTask(stored_features, torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long),
                          top_scores, top_classes)
