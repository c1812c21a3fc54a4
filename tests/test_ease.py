"""EASE: batched adapter sets equal one set at a time, old subspaces stay untouched, the prototype
complement and the reweighted scores equal their formulas, and a run resumes to identical numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from carecl.engine import Experiment, learn_task, run_experiment
from carecl.tuners.adapter import AdapterConfig
from carecl.tuners.adapter_bank import AdapterBankInjector

from helpers import check_interrupted_run_resumes_identically, randomised_bank, tiny_config

EASE = {"name": "ease", "adapter": {"bottleneck": 4}}


@pytest.mark.parametrize("config", [AdapterConfig(bottleneck=4), AdapterConfig(bottleneck=4, scale=None, layer_norm=True)],
                         ids=["fixed-scale", "learned-scale-and-norm"])
def test_batched_sets_equal_running_each_set_alone(config):
    bank = randomised_bank(config, n_sets=3)
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one_by_one = torch.stack([_features_with(bank, t, images) for t in range(3)], dim=1)
        plain = bank.vit(images)
        for per_pass in (512, 10):  # all three sets in one forward; two forwards (2 sets, then 1)
            torch.testing.assert_close(bank.features_of_sets(images, range(3), per_pass), one_by_one)
        torch.testing.assert_close(bank.features_of_sets(images, range(1, 3)), one_by_one[:, 1:])
    assert all(not torch.allclose(one_by_one[:, t], plain, atol=1e-4) for t in range(3)), "each set must matter"
    assert not torch.allclose(one_by_one[:, 0], one_by_one[:, 1], atol=1e-4)


def _features_with(bank: AdapterBankInjector, index: int, images: torch.Tensor) -> torch.Tensor:
    with bank.using(index):
        return bank.vit(images)


def test_a_new_subspace_leaves_the_old_ones_untouched():
    experiment = Experiment.build(tiny_config(method=EASE, train={"epochs": 2, "lr": 0.1}))
    method = experiment.method
    first, second = experiment.scenario.tasks()[:2]
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    learn_task(experiment, first)
    method.eval()
    with torch.no_grad():
        features_after_first = method.subspace_features(images)
        plain = method.bank.vit(images)
    set0 = {k: v.clone() for k, v in method.bank.sets[0].state_dict().items()}
    prototypes0 = method.prototypes[first.low: first.high, 0].clone()
    assert not torch.allclose(features_after_first[:, 0], plain, atol=1e-5), "training must change subspace 0"
    learn_task(experiment, second)
    method.eval()
    assert all(torch.equal(set0[k], v) for k, v in method.bank.sets[0].state_dict().items())
    with torch.no_grad():
        features = method.subspace_features(images)
    assert features.shape == (4, 2, method.backbone.num_features)
    torch.testing.assert_close(features[:, 0], features_after_first[:, 0])
    assert not torch.allclose(features[:, 1], features[:, 0], atol=1e-5)
    torch.testing.assert_close(method.prototypes[first.low: first.high, 0], prototypes0)


def test_prototype_complement_is_the_softmax_weighted_sum_of_present_classes():
    experiment = Experiment.build(tiny_config(method=EASE))
    method = experiment.method
    for task in experiment.scenario.tasks():
        method.begin_task(task)
    torch.manual_seed(3)
    method.prototypes.normal_()
    real = method.prototypes.clone()
    method.complement_old_classes(2)
    # Element by element, as the authors' loops: classes of task `old` in subspace `newer` from the
    # classes of tasks >= newer, weighted by softmax_j cos(old class in subspace old, class j there).
    bounds = experiment.scenario.boundaries
    expected = real.clone()
    for old in range(2):
        for newer in range(old + 1, 3):
            present = range(bounds[newer], bounds[3])
            for i in range(bounds[old], bounds[old + 1]):
                cosines = torch.tensor([F.cosine_similarity(real[i, old], real[j, old], dim=0) for j in present])
                weights = cosines.softmax(0)
                expected[i, newer] = sum(w * real[j, newer] for w, j in zip(weights, present))
    torch.testing.assert_close(method.prototypes, expected)
    below_diagonal = [(k, s) for k in range(6) for s in range(3) if s <= k // 2]
    assert all(torch.equal(method.prototypes[k, s], real[k, s]) for k, s in below_diagonal), "real means stay"


@pytest.mark.parametrize("use_init_ptm", [False, True])
def test_reweighted_scores_on_a_hand_case(use_init_ptm):
    options = {**EASE, "alpha": 0.4, "use_init_ptm": use_init_ptm, "beta": 0.5}
    experiment = Experiment.build(tiny_config(method=options, data={"synthetic_classes": 4}))
    method = experiment.method
    for task in experiment.scenario.tasks():
        method.begin_task(task)
    method._n_learned_tasks = 2
    width, offset = method.backbone.num_features, int(use_init_ptm)
    torch.manual_seed(4)
    method.prototypes.normal_()
    features = torch.randn(3, offset + 2, width)
    cos = lambda b, k, s: F.cosine_similarity(features[b, s], method.prototypes[k, s], dim=0).item()  # noqa: E731
    scores = method.class_scores(features)
    for b in range(3):
        for k in range(4):
            own, other = k // 2, 1 - k // 2  # two tasks of two classes: the other task's subspace weighs alpha / 1
            expected = cos(b, k, own + offset) + 0.4 * cos(b, k, other + offset)
            if use_init_ptm:
                expected += 0.5 * cos(b, k, 0)
            assert scores[b, k].item() == pytest.approx(expected, abs=1e-5)
    method.options.reweight = False
    plain = F.normalize(features.flatten(1), dim=-1) @ F.normalize(method.prototypes.flatten(1), dim=-1).T
    torch.testing.assert_close(method.class_scores(features), plain)


def test_three_tasks_through_the_loop(tmp_path):
    config = tiny_config(method=EASE, train={"epochs": 2, "lr": 0.05})
    summary = run_experiment(config, tmp_path / "run")
    assert len(summary.top1_curve) == 3
    assert summary.a_last > 40.0  # 6 generated classes: chance is 16.7
    assert not math.isnan(summary.average_accuracy)


def test_interrupted_mid_task_resumes_to_identical_results(tmp_path, monkeypatch):
    config = tiny_config(method=EASE, train={"epochs": 2, "batch_size": 8, "checkpoint_every_epochs": 1})
    check_interrupted_run_resumes_identically(config, "task1/task-adapters/epoch1/batch0", tmp_path, monkeypatch)
