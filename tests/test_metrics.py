import math

import numpy as np

from carecl.metrics import RunSummary, TaskEvaluation, accuracy_matrix, forgetting, topk_correct


def one_hot_scores(predictions, n_classes):
    scores = np.zeros((len(predictions), n_classes))
    scores[np.arange(len(predictions)), predictions] = 1.0
    return scores


def test_topk_correct():
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.04, 0.06]])
    assert topk_correct(scores, np.array([2, 1]), 1).tolist() == [False, False]
    assert topk_correct(scores, np.array([2, 1]), 2).tolist() == [True, False]
    assert topk_correct(scores, np.array([2, 1]), 10).tolist() == [True, True]


def test_task_evaluation_groups_old_new_by_hand():
    # Two tasks: classes {0,1} and {2,3}; 6 samples.
    targets = np.array([0, 1, 1, 2, 3, 3])
    predictions = np.array([0, 0, 1, 2, 2, 3])  # group0: 2/3 right, group1: 2/3 right
    evaluation = TaskEvaluation.from_predictions(1, one_hot_scores(predictions, 4), targets, np.array([0, 2, 4]), k=2)
    assert math.isclose(evaluation.top1, 100 * 4 / 6)
    assert np.allclose(evaluation.group_accuracy, [100 * 2 / 3, 100 * 2 / 3])
    assert math.isclose(evaluation.old_accuracy, 100 * 2 / 3)
    assert math.isclose(evaluation.new_accuracy, 100 * 2 / 3)
    assert evaluation.n_samples == 6


def test_first_task_has_no_old_accuracy():
    evaluation = TaskEvaluation.from_predictions(0, one_hot_scores(np.array([0, 1]), 2), np.array([0, 0]), np.array([0, 2]), 1)
    assert math.isnan(evaluation.old_accuracy)
    assert evaluation.new_accuracy == 50.0


def make_eval(task, groups):
    return TaskEvaluation(task, float(np.mean(groups)), 100.0, 5, groups, float("nan"), groups[-1], 10)


def test_matrix_average_and_forgetting_by_hand():
    evaluations = [make_eval(0, [90.0]), make_eval(1, [80.0, 70.0]), make_eval(2, [60.0, 75.0, 50.0])]
    matrix = accuracy_matrix(evaluations)
    assert np.isnan(matrix[0, 1]) and matrix[2, 1] == 75.0
    # group 0: best earlier 90 -> final 60 = 30; group 1: best earlier 70 -> 75 = -5; mean 12.5
    assert math.isclose(forgetting(matrix), 12.5)
    summary = RunSummary.from_evaluations(evaluations)
    assert summary.top1_curve == [90.0, 75.0, (60 + 75 + 50) / 3]
    assert math.isclose(summary.a_last, 185 / 3)
    assert math.isclose(summary.average_accuracy, (90 + 75 + 185 / 3) / 3)


def test_forgetting_undefined_for_one_task():
    assert math.isnan(forgetting(np.array([[50.0]])))
