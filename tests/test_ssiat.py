"""SSIAT: the semantic shift equals the authors' kernel formula, the shared adapters keep learning while
old heads stay, alignment retrains every head and is kept, CosFace is CE of s·(cos − m), and a run resumes
mid-task (with the pre-training features it holds) to identical numbers."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from carecl.engine import Experiment, learn_task, run_experiment
from carecl.methods.ssiat import semantic_shift

from helpers import DEMO_BACKBONE, GLYPHS, check_interrupted_run_resumes_identically, tiny_config

SSIAT = {"name": "ssiat", "adapter": {"bottleneck": 4}, "later_epochs": 1,
         "alignment": {"epochs": 2, "scheduler_t_max": 2, "samples_per_class": 8}}


def test_semantic_shift_is_the_kernel_weighted_mean_displacement():
    generator = torch.Generator().manual_seed(0)
    before, after = torch.randn(7, 3, generator=generator), torch.randn(7, 3, generator=generator)
    means = torch.randn(2, 3, generator=generator)
    sigma = 1.5
    expected = np.zeros((2, 3))
    for c in range(2):  # the authors' numpy: w = exp(-|y1 - mu|^2 / 2 sigma^2) + 1e-5, normalised over samples
        w = np.array([np.exp(-np.sum((before[i].numpy() - means[c].numpy()) ** 2) / (2 * sigma ** 2)) + 1e-5
                      for i in range(7)])
        expected[c] = (w / w.sum()) @ (after - before).numpy()
    np.testing.assert_allclose(semantic_shift(before, after, means, sigma).numpy(), expected, rtol=1e-6, atol=1e-9)
    # No displacement, no shift; one near sample dominates its class.
    assert torch.allclose(semantic_shift(before, before, means, sigma), torch.zeros(2, 3, dtype=torch.float64))


def test_cosface_loss_is_cross_entropy_of_scaled_cosines_minus_the_margin():
    experiment = Experiment.build(tiny_config(method={**SSIAT, "margin": 0.3, "scale": 10.0}))
    method, task = experiment.method, experiment.scenario.task(0)
    method.begin_task(task)
    images, targets = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 1, 0])
    method.eval()
    cosines = method.classifier(method.backbone(images))[:, :2]
    expected = F.cross_entropy(10.0 * (cosines - 0.3 * F.one_hot(targets, 2)), targets)
    torch.testing.assert_close(method.training_loss(images, targets, task).loss, expected)


def test_shared_adapters_learn_every_task_old_heads_stay_and_alignment_is_kept(monkeypatch):
    config = tiny_config(method=SSIAT, train={"epochs": 2, "lr": 0.1})
    experiment = Experiment.build(config)
    method = experiment.method
    first, second = experiment.scenario.tasks()[:2]
    learn_task(experiment, first)
    adapters = {k: v.clone() for k, v in method.tuner.state_dict().items()}
    head0 = method.classifier.heads[0].detach().clone()
    means0 = torch.stack([method.statistics.mean(c) for c in range(2)])
    aligned = {}

    def spy(self, *args, **options):  # the heads just before alignment (after the task's training)
        aligned["before"] = [h.detach().clone() for h in self.classifier.heads]
        return original(self, *args, **options)

    from carecl.methods.ssiat import SSIAT as Learner
    original = Learner.align_head
    monkeypatch.setattr(Learner, "align_head", spy)
    learn_task(experiment, second)
    assert any(not torch.equal(adapters[k], v) for k, v in method.tuner.state_dict().items()), \
        "the shared adapters are tuned again in the second task"
    torch.testing.assert_close(aligned["before"][0], head0, msg="training the second task leaves the first head alone")
    assert not torch.allclose(method.classifier.heads[0], head0), "alignment retrains old heads, and they are kept"
    shifted = torch.stack([method.statistics.mean(c) for c in range(2)])
    assert not torch.allclose(shifted, means0), "old means move by the estimated shift"
    assert method.features_before.shape[0] == 0, "the pre-training features are dropped once the task ends"


def test_without_shift_compensation_old_means_stay():
    experiment = Experiment.build(tiny_config(method={**SSIAT, "shift_compensation": False}, train={"epochs": 1}))
    method = experiment.method
    first, second = experiment.scenario.tasks()[:2]
    learn_task(experiment, first)
    means0 = torch.stack([method.statistics.mean(c) for c in range(2)])
    learn_task(experiment, second)
    torch.testing.assert_close(torch.stack([method.statistics.mean(c) for c in range(2)]), means0)


def test_three_tasks_through_the_loop(tmp_path):
    # Cosine heads at s = 20 need features that differ: the shipped pre-trained demo ViT on its glyphs
    # (a random ViT maps the generated patterns to nearly one direction).
    config = tiny_config(method={**SSIAT, "later_epochs": 2}, train={"epochs": 2, "lr": 0.05},
                         backbone=DEMO_BACKBONE, data=GLYPHS)
    summary = run_experiment(config, tmp_path / "run")
    assert len(summary.top1_curve) == 3
    assert summary.a_last > 40.0  # 6 generated classes: chance is 16.7


def test_interrupted_mid_task_resumes_to_identical_results(tmp_path, monkeypatch):
    config = tiny_config(method={**SSIAT, "later_epochs": 2},
                         train={"epochs": 2, "batch_size": 8, "checkpoint_every_epochs": 1})
    check_interrupted_run_resumes_identically(config, "task1/adapter/epoch1/batch0", tmp_path, monkeypatch)
