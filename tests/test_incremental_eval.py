"""Incremental evaluation gives exactly the full evaluation's numbers for the methods whose class scores never
change (SimpleCIL, APER, FeCAM), also when evaluating only every few tasks; other methods are evaluated in
full; the top-k merge by hand."""

from __future__ import annotations

import json

import pytest
import torch

from carecl.engine import Experiment, run_experiment
from carecl.engine.incremental_eval import merge_top_k

from helpers import tiny_config

DATA = {"synthetic_classes": 10, "synthetic_train_per_class": 8, "synthetic_test_per_class": 5}
METHODS = [{"name": "simplecil"}, {"name": "fecam"},
           {"name": "aper_adapter", "first_session": {"tuner": "adapter", "adapter": {"bottleneck": 4}}}]


def metrics(path):
    document = json.loads((path / "metrics.json").read_text())
    return document["summary"], [(t["top1"], t["topk"], t["group_accuracy"]) for t in document["tasks"]]


@pytest.mark.parametrize("method", METHODS, ids=[m["name"] for m in METHODS])
@pytest.mark.parametrize("every", [1, 2])
def test_incremental_evaluation_equals_the_full_one(tmp_path, method, every):
    evaluation = {"batch_size": 7, "topk": 3, "every_n_tasks": every}
    incremental = tiny_config(method=method, data=DATA, eval=evaluation)
    full = tiny_config(method=method, data=DATA, eval={**evaluation, "incremental": False})
    run_experiment(incremental, tmp_path / "incremental")
    run_experiment(full, tmp_path / "full")
    (summary_i, tasks_i), (summary_f, tasks_f) = metrics(tmp_path / "incremental"), metrics(tmp_path / "full")
    assert tasks_i == tasks_f and summary_i["matrix"] == summary_f["matrix"]


def test_methods_without_fixed_scores_are_evaluated_in_full(tmp_path):
    from carecl.engine.loop import evaluate_task

    experiment = Experiment.build(tiny_config(method={"name": "ranpac", "projection_dim": 16}, data=DATA))
    assert not experiment.method.fixed_class_scores
    from carecl.engine import learn_task

    learn_task(experiment, experiment.scenario.task(0))
    evaluate_task(experiment, experiment.scenario.task(0))
    assert experiment.incremental_evaluator.tasks == {}


def test_merge_top_k_by_hand():
    scores, classes = torch.tensor([[0.9, 0.5]]), torch.tensor([[3, 0]])
    top_scores, top_classes = merge_top_k(scores, classes, torch.tensor([[0.7, 0.95, 0.1]]), 4, 3)
    assert top_classes.tolist() == [[5, 3, 4]]
    torch.testing.assert_close(top_scores, torch.tensor([[0.95, 0.9, 0.7]]))
