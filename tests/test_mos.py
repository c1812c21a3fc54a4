"""MOS: a merge equals its formula; the training forward merges each block as the authors' forward does;
the class statistics read class by class with one merging forward per batch; inference sets are the mean
of earlier snapshots; the retrieval that runs only the visited adapters equals the authors' loop over all
of them; a run resumes mid-task to identical numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from carecl.engine import Experiment, learn_task, run_experiment
from carecl.methods.mos import merge_towards_mean
from carecl.methods.regularisers import orthogonality_loss
from carecl.tuners.adapter import AdapterConfig

from helpers import (DEMO_BACKBONE, GLYPHS, TINY_VIT, check_interrupted_run_resumes_identically, randomised_bank,
                     tiny_config)

MOS = {"name": "mos", "adapter": {"bottleneck": 4}, "alignment": {"epochs": 2, "scheduler_t_max": 2, "samples_per_class": 8}}
DEPTH = TINY_VIT["depth"]


def closed_form(theta: torch.Tensor, mean: torch.Tensor, merges: int, momentum: float = 0.1) -> torch.Tensor:
    return mean + (1 - momentum) ** merges * (theta - mean)


def test_a_merge_is_an_ema_step_towards_the_mean_of_the_snapshots():
    generator = torch.Generator().manual_seed(0)
    blocks = [([torch.randn(3, 2, generator=generator)], [torch.randn(3, 2, generator=generator)]) for _ in range(2)]
    before = [parameters[0].clone() for parameters, _ in blocks]
    merge_towards_mean(blocks, [1, 3], n_snapshots=2, momentum=0.1)
    for (parameters, totals), start, merges in zip(blocks, before, [1, 3]):
        torch.testing.assert_close(parameters[0], closed_form(start, totals[0] / 2, merges))
    unchanged = [parameters[0].clone() for parameters, _ in blocks]
    merge_towards_mean(blocks, [2, 2], n_snapshots=0, momentum=0.1)  # no snapshot yet: nothing to merge towards
    merge_towards_mean(blocks, [2, 2], n_snapshots=2, momentum=0.0)
    assert all(torch.equal(parameters[0], u) for (parameters, _), u in zip(blocks, unchanged))


def _method_with_one_snapshot(seed: int = 0):
    experiment = Experiment.build(tiny_config(method=MOS))
    method = experiment.method
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter, total in zip(method.working.adapters.parameters(), method.snapshot_sums):
            parameter.normal_(0, 0.3, generator=generator)
            total.normal_(0, 0.3, generator=generator)
    return experiment, method


def test_the_training_forward_merges_every_block_before_each_block_runs_and_each_step_once_more():
    experiment, method = _method_with_one_snapshot()
    second = experiment.scenario.task(1)  # one snapshot (task 0) to merge towards
    start = [[p.detach().clone() for p in adapter.parameters()] for adapter in method.working.adapters]
    images, targets = torch.rand(4, 3, 16, 16), torch.tensor([2, 3, 3, 2])
    for old_class in (0, 1):
        method.statistics.add_class(old_class, torch.randn(5, method.backbone.num_features))
    method.eval()
    with torch.no_grad():  # block L runs after L + 1 merges
        for block, (adapter, (_, totals)) in enumerate(zip(method.working.adapters, method.working_blocks())):
            for parameter, begin, total in zip(adapter.parameters(), start[block], totals):
                parameter.copy_(closed_form(begin, total, block + 1))
        expected_features = method.backbone(images)
        for adapter, begin in zip(method.working.adapters, start):
            for parameter, value in zip(adapter.parameters(), begin):
                parameter.copy_(value)
    step = method.training_loss(images, targets, second)
    old_means = torch.stack([method.statistics.mean(c) for c in (0, 1)]).float()
    expected = (F.cross_entropy(method.head(expected_features)[:, 2:4], targets - 2)
                + 0.1 * orthogonality_loss(expected_features, old_means, 0.8))
    torch.testing.assert_close(step.loss, expected, rtol=1e-5, atol=1e-6)
    for adapter, begin, (_, totals) in zip(method.working.adapters, start, method.working_blocks()):
        for parameter, value, total in zip(adapter.parameters(), begin, totals):
            torch.testing.assert_close(parameter.detach(), closed_form(value, total, DEPTH))
    step.loss.backward()  # the merges after the forward went through .data: no autograd version error
    method.after_optimizer_step(second)
    for adapter, begin, (_, totals) in zip(method.working.adapters, start, method.working_blocks()):
        for parameter, value, total in zip(adapter.parameters(), begin, totals):
            torch.testing.assert_close(parameter.detach(), closed_form(value, total, DEPTH + 1))


def test_the_orthogonality_loss_is_cross_entropy_of_rows_against_themselves():
    generator = torch.Generator().manual_seed(3)
    features, means = torch.randn(3, 4, generator=generator), torch.randn(2, 4, generator=generator)
    rows = torch.cat([means, features])
    expected = -torch.log_softmax(rows @ rows.T / 0.8, dim=1).diagonal().mean()
    torch.testing.assert_close(orthogonality_loss(features, means, 0.8), expected)


@pytest.mark.parametrize("inference_adapters", ["merged", "snapshots"])
def test_statistics_merge_once_per_class_batch_and_inference_sets_follow_the_snapshots(inference_adapters):
    # 12 images per class in batches of 3 x 2 = 6: two batches per class, four per task.
    config = tiny_config(method={**MOS, "inference_adapters": inference_adapters, "alignment": {"epochs": 0}},
                         train={"epochs": 1, "batch_size": 2, "lr": 0.05})
    experiment = Experiment.build(config)
    method = experiment.method
    first, second = experiment.scenario.tasks()[:2]
    learn_task(experiment, first)
    snapshot0 = [t.clone() for t in method.snapshot_sums]
    set0 = [p.clone() for p in method.bank.sets[0].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(set0, snapshot0)), "task 0's inference set is its snapshot"

    original = method.end_task
    working_after_training = {}

    def spy(context):
        working_after_training["values"] = [p.detach().clone() for p in method.working.adapters.parameters()]
        original(context)

    method.end_task = spy
    learn_task(experiment, second)
    snapshot1 = [total - s0 for total, s0 in zip(method.snapshot_sums, snapshot0)]
    torch.testing.assert_close(snapshot1, working_after_training["values"])
    for parameter, snapshot, s0 in zip(method.working.adapters.parameters(), snapshot1, snapshot0):
        torch.testing.assert_close(parameter.detach(), closed_form(snapshot, s0, 4 * DEPTH))
    expected_set1 = snapshot0 if inference_adapters == "merged" else snapshot1
    torch.testing.assert_close(list(method.bank.sets[1].parameters()), expected_set1)
    assert all(torch.equal(p, s) for p, s in zip(method.bank.sets[0].parameters(), set0)), "old sets stay"


def test_per_image_sets_equal_running_each_set_alone():
    bank = randomised_bank(AdapterConfig(bottleneck=4), n_sets=3)
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    chosen = torch.tensor([2, 0, 2, 1, 0])
    with torch.no_grad():
        each = torch.stack([_features_with(bank, t, images) for t in range(3)], dim=1)
        torch.testing.assert_close(bank.features_per_image(images, chosen), each[torch.arange(5), chosen])


def _features_with(bank, index, images):
    with bank.using(index):
        return bank.vit(images)


def _authors_prediction(method, images):
    """Their `_eval_cnn`: features through EVERY task's adapters, then a per-image loop of at most 4 forwards."""
    n_classes, n_tasks = method.n_seen_classes, method.n_learned_tasks
    task_of = method.scenario.task_of_class()
    with method.working.bypassed():
        every = method.bank.features_of_sets(images, range(n_tasks))
    prototype = F.normalize(every[:, 0], dim=1) @ F.normalize(method.prototypes[:n_classes], dim=1).T
    hops, final = [], []
    for image in range(len(images)):
        previous, loops = int(task_of[int(prototype[image].argmax())]), 0
        while True:
            loops += 1
            logits = method.head(every[image, previous][None])[:, :n_classes]
            named = int(task_of[int(logits.argmax())])
            if loops >= 4 or named == previous:
                break
            previous = named
        hops.append(loops - 1)
        final.append(logits)
    scores = torch.cat(final).softmax(1) + (prototype / (1 / n_tasks)).softmax(1)
    return scores, hops


@pytest.mark.parametrize("seed", [4, 7])  # images with 0 and 2 hops; with 1 and 3 (the cap) hops
def test_retrieval_of_visited_adapters_equals_the_authors_loop_over_every_adapter(seed):
    experiment = Experiment.build(tiny_config(method=MOS, data={"synthetic_classes": 8}))
    method = experiment.method
    for task in experiment.scenario.tasks():
        method.begin_task(task)
    method._n_learned_tasks = 4
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(24, 3, 16, 16, generator=generator)
    method.eval()
    with torch.no_grad():
        for adapters in method.bank.sets:
            for parameter in adapters.parameters():
                parameter.normal_(0, 1.0, generator=generator)
        # A random ViT maps every image near one feature: a head on the deviations makes the tasks it names vary.
        with method.working.bypassed():
            centre = method.bank.features_of_sets(images, range(4)).mean((0, 1))
            method.prototypes.copy_(method.bank.features_of_sets(images[:8], range(1)).squeeze(1) - centre)
        method.head.weight.normal_(0, 100, generator=generator)
        method.head.bias.copy_(-method.head.weight @ centre)
        expected, hops = _authors_prediction(method, images)
        scores = method.predict(images)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    assert len(set(hops)) == 2 and max(hops) >= 2, f"the case must exercise refinement, hops {hops}"
    torch.testing.assert_close(method.class_probabilities(images).sum(1), torch.ones(24))


def test_three_tasks_through_the_loop(tmp_path):
    config = tiny_config(method=MOS, train={"epochs": 2, "lr": 0.05}, backbone=DEMO_BACKBONE, data=GLYPHS)
    summary = run_experiment(config, tmp_path / "run")
    assert len(summary.top1_curve) == 3
    assert summary.a_last > 40.0  # 6 generated classes: chance is 16.7


def test_interrupted_mid_task_resumes_to_identical_results(tmp_path, monkeypatch):
    config = tiny_config(method=MOS, train={"epochs": 2, "batch_size": 8, "checkpoint_every_epochs": 1})
    check_interrupted_run_resumes_identically(config, "task1/adapter/epoch1/batch0", tmp_path, monkeypatch)
