"""MoAL: recursive least squares equals the joint ridge solution; the first analytic head is 0.9 x the validated
ridge solution; the adapters end a later task at their per-epoch moving average; rumination learns only
from what the head gets wrong; the mean-calibration map recovers a linear drift; a run resumes mid-task."""

from __future__ import annotations

import torch

from carecl.classifiers import select_ridge
from carecl.engine import Experiment, learn_task
from carecl.methods.moal import RIDGES, fit_linear_map, rls_update

from helpers import check_interrupted_run_resumes_identically, tiny_config

MOAL = {"name": "moal", "adapter": {"bottleneck": 4}, "hidden": 48, "progressive_epochs": 2, "calibration_epochs": 5}


def test_recursive_least_squares_equals_the_joint_ridge_solution():
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(30, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(30, 3, generator=generator, dtype=torch.float64)
    ridge = 0.5
    inverse = torch.linalg.inv(h[:10].T @ h[:10] + ridge * torch.eye(6, dtype=torch.float64))
    weight = inverse @ h[:10].T @ y[:10]
    for rows in (slice(10, 17), slice(17, 30)):
        inverse, weight = rls_update(inverse, weight, h[rows], y[rows])
    joint = torch.linalg.solve(h.T @ h + ridge * torch.eye(6, dtype=torch.float64), h.T @ y)
    torch.testing.assert_close(weight, joint)


def test_the_first_analytic_head_is_the_scaled_validated_ridge_solution():
    experiment = Experiment.build(tiny_config(method=MOAL, train={"epochs": 1, "batch_size": 64}))
    method = experiment.method
    task = experiment.scenario.task(0)
    learn_task(experiment, task)
    # The same augmented pass (pass 1: the same shuffle; the synthetic images have no random augmentation).
    context = experiment.context(task)
    method.eval()
    with torch.no_grad():
        hidden, labels = zip(*[(method.expand(f), t) for f, t in method.augmented_batches(context, 1)])
    h, y = torch.cat(hidden), torch.nn.functional.one_hot(torch.cat(labels), task.high).float()
    ridge = select_ridge(h, y, RIDGES)
    inverse = torch.linalg.inv((h.T @ h).double() + ridge * torch.eye(h.shape[1], dtype=torch.float64)).float()
    torch.testing.assert_close(method.analytic_weight, 0.9 * (inverse @ (h.T @ y)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(method.analytic_inverse, inverse)


def test_a_later_task_ends_with_the_adapters_at_their_moving_average():
    experiment = Experiment.build(tiny_config(method={**MOAL, "alpha": 0.5}, train={"epochs": 1}))
    method = experiment.method
    learn_task(experiment, experiment.scenario.task(0))
    start = method.adapter_vector().clone()
    seen = []
    original = method.after_epoch

    def record(phase, epoch):
        seen.append(method.adapter_vector().clone())  # the trained adapters at the end of each epoch
        original(phase, epoch)

    method.after_epoch = record
    learn_task(experiment, experiment.scenario.task(1))
    expected = 0.5 * (0.5 * start + 0.5 * seen[0]) + 0.5 * seen[1]
    torch.testing.assert_close(method.adapter_vector(), expected)
    assert not torch.allclose(seen[1], expected)  # the moving average, not the last trained weights
    torch.testing.assert_close(method.previous_adapters, expected)


def test_rumination_learns_only_from_the_mistakes():
    experiment = Experiment.build(tiny_config(method=MOAL))
    method = experiment.method
    task = experiment.scenario.task(0)
    method.begin_task(task)
    method.analytic_inverse = torch.eye(48)
    features = torch.randn(8, method.random_buffer.shape[1])
    labels = (method.expand(features) @ torch.randn(48, 2)).argmax(1)
    method.analytic_weight = torch.linalg.lstsq(method.expand(features), torch.nn.functional.one_hot(labels, 2).float() * 10).solution
    assert ((method.expand(features) @ method.analytic_weight).argmax(1) == labels).all()
    before = method.analytic_weight.clone()
    method.update_analytic_head([(features, labels)], task, wrong_only=True)
    assert torch.equal(method.analytic_weight, before)  # nothing wrong: nothing learned
    method.update_analytic_head([(features, 1 - labels)], task, wrong_only=True)
    assert not torch.equal(method.analytic_weight, before)


def test_the_calibration_map_recovers_a_linear_drift():
    from carecl.methods.moal import MoALConfig

    generator = torch.Generator().manual_seed(0)
    old = torch.randn(200, 5, generator=generator)
    drift = torch.randn(5, 5, generator=generator) * 0.3 + torch.eye(5)
    new = old @ drift + 0.5
    mapping = fit_linear_map(old, new, MoALConfig(calibration_epochs=200), torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(mapping(old), new) < 1e-3


def test_a_moal_run_interrupted_mid_task_resumes_identically(tmp_path, monkeypatch):
    config = tiny_config(method=MOAL, train={"epochs": 2, "checkpoint_every_epochs": 1})
    check_interrupted_run_resumes_identically(config, "task1/progressive-adaptation/epoch1/batch0", tmp_path, monkeypatch)
