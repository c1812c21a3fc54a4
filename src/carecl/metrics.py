"""Continual-learning metrics (pure NumPy): accuracy matrix, A_last, average accuracy, forgetting, and the
multi-domain task-incremental (MTIL) Transfer / Avg / Last of a matrix that also measured unlearned tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def topk_correct(scores: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Per-sample booleans: is the target among the k highest scores?"""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, kth=k - 1, axis=1)[:, :k]
    return (top == targets[:, None]).any(axis=1)


def correct_predictions(scores: np.ndarray, targets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (top-1 correct, target among the top k) from (n, classes) scores."""
    return scores.argmax(axis=1) == targets, topk_correct(scores, targets, k)


def accuracy(correct: np.ndarray) -> float:
    return float(100.0 * correct.mean()) if len(correct) else float("nan")


@dataclass
class TaskEvaluation:
    """What one evaluation after task t measured on the test data of all seen classes."""

    task: int
    top1: float
    topk: float
    k: int
    group_accuracy: list[float]  # accuracy on each task's classes (length t+1)
    old_accuracy: float  # classes of tasks < t (nan at t=0)
    new_accuracy: float  # classes of task t
    n_samples: int

    @classmethod
    def from_predictions(
        cls, task: int, scores: np.ndarray, targets: np.ndarray, boundaries: np.ndarray, k: int
    ) -> "TaskEvaluation":
        """scores: (n, n_seen) class scores; targets: positions in the class order."""
        return cls.from_correct(task, *correct_predictions(scores, targets, k), targets, boundaries, k)

    @classmethod
    def from_correct(
        cls, task: int, top1: np.ndarray, topk: np.ndarray, targets: np.ndarray, boundaries: np.ndarray, k: int
    ) -> "TaskEvaluation":
        """From per-sample top-1 / top-k correctness (what ranks gather instead of scores)."""
        group_of_sample = np.searchsorted(boundaries, targets, side="right") - 1
        groups = [accuracy(top1[group_of_sample == g]) for g in range(task + 1)]
        old = group_of_sample < task
        return cls(
            task=task,
            top1=accuracy(top1),
            topk=accuracy(topk),
            k=k,
            group_accuracy=groups,
            old_accuracy=accuracy(top1[old]),
            new_accuracy=accuracy(top1[~old]),
            n_samples=int(len(targets)),
        )


def accuracy_matrix(evaluations: list[TaskEvaluation]) -> np.ndarray:
    """M[i, j] = accuracy on task j's classes at the i-th evaluation (nan where task j was not yet learned).

    With an evaluation after every task, row i is after task i and M is square.
    """
    width = max((len(e.group_accuracy) for e in evaluations), default=0)
    matrix = np.full((len(evaluations), width), np.nan)
    for i, evaluation in enumerate(evaluations):
        matrix[i, : len(evaluation.group_accuracy)] = evaluation.group_accuracy
    return matrix


def learned_part(matrix: np.ndarray, evaluated_tasks) -> np.ndarray:
    """The matrix with the entries of tasks not yet learned at each evaluation (zero-shot ones) set to nan."""
    learned = np.array(matrix, dtype=float, copy=True)
    for row, task in enumerate(evaluated_tasks):
        learned[row, task + 1:] = np.nan
    return learned


def measures_unlearned_tasks(matrix: np.ndarray, evaluated_tasks) -> bool:
    return any(np.isfinite(np.asarray(matrix)[row, task + 1:]).any() for row, task in enumerate(evaluated_tasks))


def transfer(matrix: np.ndarray, evaluated_tasks) -> float:
    """MTIL's Transfer: mean over tasks j > 0 of the mean accuracy on j at the evaluations before j was learned."""
    matrix = np.asarray(matrix, dtype=float)
    per_task = []
    for column in range(1, matrix.shape[1]):
        before = [matrix[row, column] for row, task in enumerate(evaluated_tasks) if task < column]
        if before:
            per_task.append(np.mean(before))
    return float(np.mean(per_task)) if per_task else float("nan")


def task_averaged(matrix: np.ndarray) -> float:
    """MTIL's Avg: mean over tasks of the mean accuracy on the task over all evaluations."""
    return float(np.mean(np.nanmean(np.asarray(matrix, dtype=float), axis=0))) if np.size(matrix) else float("nan")


def last_row_average(matrix: np.ndarray) -> float:
    """MTIL's Last: mean over tasks of their accuracy at the last evaluation."""
    return float(np.nanmean(np.asarray(matrix, dtype=float)[-1])) if np.size(matrix) else float("nan")


def forgetting_per_group(matrix: np.ndarray) -> np.ndarray:
    """For each task group but the last column: best accuracy at an earlier evaluation minus accuracy at
    the last one; nan for a group no earlier evaluation measured."""
    drops = np.full(max(matrix.shape[1] - 1, 0), np.nan)
    earlier, last = matrix[:-1], matrix[-1]
    for j in range(len(drops)):
        measured = earlier[:, j][~np.isnan(earlier[:, j])]
        if len(measured):
            drops[j] = measured.max() - last[j]
    return drops


def forgetting(matrix: np.ndarray) -> float:
    """Mean over the groups learned before the last evaluation's task of
    (best accuracy at an earlier evaluation - accuracy at the last one)."""
    if matrix.shape[0] < 2:
        return float("nan")
    drops = forgetting_per_group(matrix)
    measured = drops[~np.isnan(drops)]
    return float(np.mean(measured)) if len(measured) else float("nan")


def last_accuracy(curve) -> float:
    """A_last: top-1 accuracy at the last evaluation."""
    return float(curve[-1]) if len(curve) else float("nan")


def average_incremental_accuracy(curve) -> float:
    """Ā: mean top-1 accuracy over the evaluations (after every task unless eval.every_n_tasks > 1)."""
    return float(np.mean(curve)) if len(curve) else float("nan")


@dataclass
class RunSummary:
    top1_curve: list[float]
    a_last: float
    # Ā: mean of the top-1 accuracy over the evaluations (after each task unless eval.every_n_tasks > 1).
    average_accuracy: float
    forgetting: float
    matrix: list[list[float]] = field(default_factory=list)
    # 0-based task index of each evaluation (of each curve point and matrix row).
    evaluated_tasks: list[int] = field(default_factory=list)
    # MTIL's Transfer / Avg / Last (nan unless the evaluations also measured tasks not yet learned).
    transfer: float = float("nan")
    task_average: float = float("nan")
    last_task_average: float = float("nan")

    @classmethod
    def from_evaluations(cls, evaluations: list[TaskEvaluation]) -> "RunSummary":
        curve = [e.top1 for e in evaluations]
        matrix = accuracy_matrix(evaluations)
        tasks = [e.task for e in evaluations]
        zero_shot = measures_unlearned_tasks(matrix, tasks)
        return cls(
            top1_curve=curve,
            a_last=last_accuracy(curve),
            average_accuracy=average_incremental_accuracy(curve),
            forgetting=forgetting(learned_part(matrix, tasks)),
            matrix=matrix.tolist(),
            evaluated_tasks=tasks,
            transfer=transfer(matrix, tasks) if zero_shot else float("nan"),
            task_average=task_averaged(matrix) if zero_shot else float("nan"),
            last_task_average=last_row_average(matrix) if zero_shot else float("nan"),
        )
