"""Baselines on frozen or first-session-adapted features: each core step against its closed form, and
each method through three tasks of the one training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carecl.classifiers import AnalyticClassifier, MahalanobisClassifier, RidgeClassifier, select_ridge
from carecl.engine import Experiment, learn_task, run_experiment

from helpers import DEMO_BACKBONE, GLYPHS, tiny_config


def blobs(n_per_class: int, n_classes: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(n_classes, dim, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


# ---------------------------------------------------------------- ridge (RanPAC)


def test_ridge_solution_is_numpys_closed_form_on_everything_seen():
    features, labels = blobs(20, 4, 6)
    head = RidgeClassifier(6, 4)
    first, second = labels < 2, labels >= 2
    head.fit_task(features[first], labels[first])
    ridge = head.fit_task(features[second], labels[second])
    x, y = features.double().numpy(), np.eye(4)[labels.numpy()]
    expected = np.linalg.solve(x.T @ x + ridge * np.eye(6), x.T @ y).T
    np.testing.assert_allclose(head.weight.numpy(), expected, rtol=1e-9, atol=1e-10)
    assert ridge in RidgeClassifier.RIDGES


def test_ridge_is_chosen_by_validation_mse_on_the_last_fifth():
    features, labels = blobs(10, 3, 5, seed=1)
    h, y = features.double(), torch.nn.functional.one_hot(labels, 3).double()
    losses = []
    for ridge in RidgeClassifier.RIDGES:
        w = np.linalg.solve(h[:24].numpy().T @ h[:24].numpy() + ridge * np.eye(5), h[:24].numpy().T @ y[:24].numpy())
        losses.append(((h[24:].numpy() @ w - y[24:].numpy()) ** 2).mean())
    assert select_ridge(h, y, RidgeClassifier.RIDGES) == RidgeClassifier.RIDGES[int(np.argmin(losses))]


# ---------------------------------------------------------------- recursive least squares (ACIL)


def test_recursive_analytic_update_equals_the_joint_ridge_solve():
    features, labels = blobs(15, 6, 8, seed=2)
    head, gamma = AnalyticClassifier(8, gamma=0.5), 0.5
    for task in range(3):  # classes 2t, 2t+1 arrive in task t
        rows = (labels >= 2 * task) & (labels < 2 * task + 2)
        head.fit_task(features[rows], labels[rows], 2 * task + 2)
    x, y = features.double().numpy(), np.eye(6)[labels.numpy()]
    joint = np.linalg.solve(x.T @ x + gamma * np.eye(8), x.T @ y)
    np.testing.assert_allclose(head.weight.numpy(), joint, rtol=1e-8, atol=1e-9)
    # One task at a time or several chunks of one task: the same solution.
    chunked = AnalyticClassifier(8, gamma=0.5)
    for rows in (slice(0, 40), slice(40, 90)):
        chunked.fit_task(features[rows], labels[rows], 6)
    np.testing.assert_allclose(chunked.weight.numpy(), joint, rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------- Mahalanobis (FeCAM)


def test_mahalanobis_scores_on_a_hand_case():
    head = MahalanobisClassifier(2, alpha1=0.0, alpha2=0.0)
    head.grow(1)
    # Normalised samples spread along the x axis more than along y: covariance diag(0.02, 0.005) after L2.
    samples = torch.tensor([[1.0, 0.2], [1.0, -0.2], [1.0, 0.0], [0.9, 0.1], [0.9, -0.1]])
    head.fit_classes(samples, torch.zeros(5, dtype=torch.long), range(1))
    unit = torch.nn.functional.normalize(samples.double(), dim=-1)
    mean = unit.mean(0)
    covariance = torch.cov(unit.T)
    correlation = covariance / (covariance.diagonal().sqrt()[:, None] * covariance.diagonal().sqrt()[None, :])
    point = torch.tensor([[0.6, 0.8]])
    difference = torch.nn.functional.normalize(point.double(), dim=-1) - mean
    expected = -(difference @ torch.linalg.pinv(correlation) @ difference.T).item()
    assert head(point, 1).item() == pytest.approx(expected, rel=1e-6)


def test_mahalanobis_shrinkage_adds_the_mean_diagonal_and_off_diagonal():
    from carecl.classifiers import shrink_covariance

    covariance = torch.tensor([[2.0, 0.5, 0.1], [0.5, 1.0, 0.3], [0.1, 0.3, 3.0]], dtype=torch.float64)
    shrunk = shrink_covariance(covariance, 10.0, 10.0)
    diagonal_mean, off_mean = 2.0, 0.3
    expected = covariance + 10 * diagonal_mean * torch.eye(3) + 10 * off_mean * (1 - torch.eye(3))
    torch.testing.assert_close(shrunk, expected.double())


# ---------------------------------------------------------------- through the loop


METHODS = {
    "fecam": {"name": "fecam"},
    "acil": {"name": "acil", "buffer_size": 256},
    "ranpac": {"name": "ranpac", "projection_dim": 128, "first_session": {"tuner": "adapter", "adapter": {"bottleneck": 8}}},
    "aper_adapter": {"name": "aper_adapter", "first_session": {"adapter": {"bottleneck": 8}}},
    "aper_ssf": {"name": "aper_ssf"},
    "aper_vpt_shallow": {"name": "aper_vpt_shallow", "first_session": {"vpt": {"n_prompts": 2}}},
    "aper_vpt_deep": {"name": "aper_vpt_deep", "first_session": {"vpt": {"n_prompts": 2}}},
    "slca": {"name": "slca", "milestones": [3], "alignment": {"epochs": 1, "scheduler_t_max": 1, "samples_per_class": 8}},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_three_tasks_through_the_loop(name, tmp_path):
    if name == "slca":  # it trains linear heads from scratch: it needs a pre-trained ViT (a random one's CLS barely moves)
        config = tiny_config(method=METHODS[name], train={"epochs": 4, "lr": 0.05}, backbone=DEMO_BACKBONE, data=GLYPHS)
    else:
        config = tiny_config(method=METHODS[name], train={"epochs": 2, "lr": 0.05})
    summary = run_experiment(config, tmp_path / "run")
    assert len(summary.top1_curve) == 3
    assert summary.a_last > 40.0  # 6 generated classes: chance is 16.7


@pytest.mark.parametrize("name", ["aper_adapter", "aper_ssf", "aper_vpt_deep", "ranpac"])
def test_first_session_adaptation_changes_the_features_and_later_tasks_do_not(name):
    experiment = Experiment.build(tiny_config(method=METHODS[name], train={"epochs": 2, "lr": 0.1}))
    method = experiment.method
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    method.eval()
    with torch.no_grad():
        before = method.embed(images).clone()
    learn_task(experiment, experiment.scenario.task(0))
    with torch.no_grad():
        adapted = method.embed(images).clone()
    assert not torch.allclose(before, adapted, atol=1e-5)
    tuned = {k: v.clone() for k, v in method.tuner.state_dict().items()}
    for task in experiment.scenario.tasks()[1:]:
        assert method.training_phases(task) == []
        learn_task(experiment, task)
    assert all(torch.equal(tuned[k], v) for k, v in method.tuner.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(method.embed(images), adapted)


def test_aper_concatenates_the_frozen_and_the_adapted_features():
    experiment = Experiment.build(tiny_config(method=METHODS["aper_adapter"], train={"epochs": 1}))
    method = experiment.method
    learn_task(experiment, experiment.scenario.task(0))
    images = torch.rand(3, 3, 16, 16)
    method.eval()
    with torch.no_grad():
        features = method.embed(images)
        frozen = method.tuner.remove()(images)
    width = frozen.shape[1]
    assert features.shape == (3, 2 * width)
    torch.testing.assert_close(features[:, :width], frozen)


# ---------------------------------------------------------------- SLCA


def test_slca_is_a_slow_learner_with_aligned_heads_for_evaluation_only():
    from carecl.engine.optim import build_optimizer

    config = tiny_config(method={"name": "slca", "milestones": [1], "alignment": {"epochs": 2, "scheduler_t_max": 2,
                                                                                  "samples_per_class": 8}},
                         train={"epochs": 2, "lr": 0.1})
    experiment = Experiment.build(config)
    method = experiment.method
    first, second = experiment.scenario.tasks()[:2]
    backbone_before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    learn_task(experiment, first)
    phase, = method.training_phases(second)
    method.begin_task(second)
    optimizer = build_optimizer(config.train, method.parameter_groups(phase), phase.lr)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.001, 0.1])
    assert phase.milestones == (1,)
    # Continue the task through the loop (its begin_task already ran).
    head0 = {k: v.clone() for k, v in method.heads[0].state_dict().items()}
    from carecl.runs.state import MidTaskState

    learn_task(experiment, second, resume=MidTaskState(phase=0, epoch=0))
    assert any(not torch.equal(backbone_before[k], v) for k, v in method.backbone.state_dict().items()), \
        "the backbone must learn (slowly)"
    assert all(torch.equal(head0[k], v) for k, v in method.heads[0].state_dict().items()), "old heads stay frozen"
    assert not torch.allclose(method.aligned[0].weight, method.heads[0].weight), "alignment retrains every head, on a copy"
    images = torch.rand(3, 3, 16, 16)
    method.eval()
    with torch.no_grad():
        expected = method.logits(method.backbone(images), method.aligned)[:, :4]
        torch.testing.assert_close(method.predict(images), expected)


def test_slca_logit_normalisation_divides_by_the_mean_task_norm():
    experiment = Experiment.build(tiny_config(method={"name": "slca", "logit_norm": 0.5}))
    method = experiment.method
    for task in experiment.scenario.tasks()[:2]:
        method.begin_task(task)
    logits = torch.tensor([[3.0, 4.0, 0.0, 1.0]])  # task norms 5 and 1: mean 3
    torch.testing.assert_close(method.normalised_logits(logits), logits / 3 / 0.5)


def test_every_first_session_choice_builds_an_injector_and_none_builds_nothing():
    import timm
    from typing import get_args, get_type_hints

    from carecl.methods.feature_learner import FirstSessionConfig, build_first_session_tuner
    from carecl.tuners.vpt import VPTInjector
    from helpers import TINY_VIT

    choices = get_args(get_type_hints(FirstSessionConfig)["tuner"])
    for choice in choices:
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)
        tuner = build_first_session_tuner(vit, FirstSessionConfig(tuner=choice))
        assert (tuner is None) == (choice == "none"), choice
        if choice.startswith("vpt"):
            assert isinstance(tuner, VPTInjector) and tuner.deep == (choice == "vpt_deep")


@pytest.mark.parametrize("rows, width", [(30, 5), (20, 50)], ids=["more rows: eigendecomposition", "fewer: SVD"])
def test_every_ridge_comes_from_one_factorisation_and_matches_its_own_solve(rows, width):
    generator = torch.Generator().manual_seed(3)
    h = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.arange(rows) % 3, 3).double()
    n_train = int(rows * 0.8)
    losses = []
    for ridge in RidgeClassifier.RIDGES[6:]:  # λ >= 0.01: well conditioned enough to solve directly
        w = torch.linalg.solve(h[:n_train].T @ h[:n_train] + ridge * torch.eye(width, dtype=torch.float64),
                               h[:n_train].T @ y[:n_train])
        losses.append(((h[n_train:] @ w - y[n_train:]) ** 2).mean().item())
    assert select_ridge(h, y, RidgeClassifier.RIDGES[6:]) == RidgeClassifier.RIDGES[6:][int(np.argmin(losses))]


def test_a_ridge_too_small_for_cholesky_is_solved_as_the_authors_do():
    from carecl.classifiers import ridge_solve

    # Few rows through a wide projection (RanPAC on the demo): roundoff leaves the Gram matrix's null space
    # eigenvalues just below zero, here made explicit, and G + 1e-8 I is indefinite.
    generator = torch.Generator().manual_seed(5)
    h = torch.randn(30, 200, generator=generator, dtype=torch.float64)
    gram = h.T @ h - 1e-6 * torch.eye(200, dtype=torch.float64)
    right = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    shifted = gram + 1e-8 * torch.eye(200, dtype=torch.float64)
    assert int(torch.linalg.cholesky_ex(shifted).info) != 0
    assert torch.equal(ridge_solve(gram, 1e-8, right), torch.linalg.solve(shifted, right))
    well_posed = ridge_solve(gram, 10.0, right)  # and a ridge that keeps G + λI positive definite goes through Cholesky
    torch.testing.assert_close(well_posed, torch.linalg.solve(gram + 10.0 * torch.eye(200, dtype=torch.float64), right))


def test_the_woodbury_update_in_place_is_the_inverse_of_the_grown_gram_matrix():
    from carecl.classifiers import woodbury_update_

    generator = torch.Generator().manual_seed(4)
    first, second = (torch.randn(n, 12, generator=generator, dtype=torch.float64) for n in (20, 7))
    inverse = torch.linalg.inv(first.T @ first + 0.3 * torch.eye(12, dtype=torch.float64))
    kept = inverse.data_ptr()
    woodbury_update_(inverse, second)
    assert inverse.data_ptr() == kept  # updated where it lies: no h x h copy
    expected = torch.linalg.inv(first.T @ first + second.T @ second + 0.3 * torch.eye(12, dtype=torch.float64))
    torch.testing.assert_close(inverse, expected)
