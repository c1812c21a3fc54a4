"""HiDe-Prompt and NoRGa: the gate equals its formula and reduces to plain prefix tuning with α = 0; the
task-identity head trains on the frozen features and its statistics are theirs; prompt momentum mixes
earlier slots without training them and merges the slot at the end; the gate scales train in the first
task only; alignment steps once per old class; both learn through the loop and resume mid-task."""

from __future__ import annotations

import pytest
import torch

from carecl.alignment import align_classifier
from carecl.alignment_config import AlignmentConfig
from carecl.engine import Experiment, learn_task, run_experiment
from carecl.methods.norga import gated_prefix_scores
from carecl.statistics import GaussianClassStatistics

from helpers import DEMO_BACKBONE, GLYPHS, check_interrupted_run_resumes_identically, tiny_config

COMMON = {"prompt_layers": [0, 1], "prompt_length": 2, "tii_epochs": 1, "tii_lr": 0.002,
          "alignment": {"epochs": 2}, "tii_alignment": {"epochs": 2}}
HIDE, NORGA = {"name": "hide_prompt", **COMMON}, {"name": "norga", **COMMON}
TRAIN = {"epochs": 1, "optimizer": "adam", "lr": 0.01, "weight_decay": 0.0, "clip_grad_norm": 1.0}


def test_the_gate_adds_alpha_sigma_tau_s_to_prefix_scores_only():
    scores = torch.tensor([[[[0.5, -1.0, 2.0, 3.0]]]])  # 2 prefix columns, then 2 token columns
    gated = gated_prefix_scores(scores, 2, torch.tensor(0.7), torch.tensor(1.5), torch.tanh)
    expected = torch.tensor([[[[0.5 + 1.5 * torch.tanh(torch.tensor(0.35)), -1.0 + 1.5 * torch.tanh(torch.tensor(-0.7)),
                                2.0, 3.0]]]])
    torch.testing.assert_close(gated, expected)
    identity = gated_prefix_scores(scores, 2, torch.tensor(0.7), torch.tensor(1.5), lambda x: x)
    torch.testing.assert_close(identity[..., :2], (1 + 1.5 * 0.7) * scores[..., :2])  # σ = id: a rescaling
    torch.testing.assert_close(gated_prefix_scores(scores, 2, torch.tensor(0.7), torch.tensor(0.0), torch.tanh), scores)


@pytest.mark.parametrize("gate", ["tanh", "identity"])
def test_norga_with_alpha_zero_is_hide_prompt(gate):
    norga = Experiment.build(tiny_config(method={**NORGA, "gate": gate})).method.eval()
    hide = Experiment.build(tiny_config(method=HIDE)).method.eval()
    hide.load_state_dict(norga.state_dict(), strict=False)
    images, slots = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        gated = norga.features_with_slots(images, None, slots)
        norga.act_scale[:, 1] = 0.0
        plain = norga.features_with_slots(images, None, slots)
        torch.testing.assert_close(plain, hide.features_with_slots(images, None, slots))
    assert not torch.allclose(gated, plain, atol=1e-5), "the gate must matter with alpha = 1"


def test_the_task_identity_head_trains_on_frozen_features_and_keeps_their_statistics():
    experiment = Experiment.build(tiny_config(method={**HIDE, "tii_epochs": 2}, train=TRAIN))
    method = experiment.method
    first = experiment.scenario.task(0)
    method.begin_task(first)
    tii_phase = method.training_phases(first)[0]
    assert tii_phase.name == "task identity"
    method.begin_phase(tii_phase, experiment.context(first))
    images, targets = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 1, 0])
    method.train()
    method.training_loss(images, targets, first).loss.backward()
    assert method.prompts.grad is None and method.head.weight.grad is None, "the prompts phase is not trained here"
    assert method.tii_head.weight.grad.abs().sum() > 0
    # The TII statistics are the frozen ViT's features, whatever the prompts hold.
    learn = Experiment.build(tiny_config(method=HIDE, train=TRAIN))
    learn_task(learn, learn.scenario.task(0))
    frozen = GaussianClassStatistics()
    features, labels = [], []
    for batch, classes in learn.statistics_loader(learn.scenario.task(0)):
        features.append(learn.method.query(batch))
        labels.append(classes)
    features, labels = torch.cat(features), torch.cat(labels)
    for c in (0, 1):
        frozen.add_class(c, features[labels == c])
        torch.testing.assert_close(learn.method.tii_statistics.mean(c), frozen.mean(c))


def test_prompt_momentum_mixes_earlier_slots_without_training_them_and_merges_at_the_end():
    experiment = Experiment.build(tiny_config(method={**HIDE, "prompt_momentum": 0.3, "tii_epochs": 0}, train=TRAIN))
    method = experiment.method
    first, second = experiment.scenario.tasks()[:2]
    learn_task(experiment, first)
    method.begin_task(second)
    torch.testing.assert_close(method.prompts[1], method.prompts[0])  # slot 1 starts from slot 0
    with torch.no_grad():
        method.prompts[1].normal_()
    images, targets = torch.rand(4, 3, 16, 16), torch.tensor([2, 3, 3, 2])
    method.train()
    mixed = method.slot_prompts(torch.tensor([1, 1]), second)
    torch.testing.assert_close(mixed[0], 0.7 * method.prompts[1] + 0.3 * method.prompts[0])
    phase = method.training_phases(second)[0]
    method.begin_phase(phase, experiment.context(second))
    method.training_loss(images, targets, second).loss.backward()
    gradient = method.prompts.grad.flatten(1).abs().amax(1)
    assert gradient[0] == 0 and gradient[1] > 0 and torch.all(gradient[2:] == 0)
    slot0, slot1 = method.prompts[0].detach().clone(), method.prompts[1].detach().clone()
    method.merge_slot(1)
    torch.testing.assert_close(method.prompts[1].detach(), 0.7 * slot1 + 0.3 * slot0)


def test_norga_gate_scales_train_in_the_first_task_only():
    experiment = Experiment.build(tiny_config(method={**NORGA, "tii_epochs": 0}, train=TRAIN))
    method = experiment.method
    first, second = experiment.scenario.tasks()[:2]
    learn_task(experiment, first)
    after_first = method.act_scale.detach().clone()
    assert not torch.allclose(after_first, torch.ones_like(after_first)), "task 0 trains the gate scales"
    learn_task(experiment, second)
    torch.testing.assert_close(method.act_scale.detach(), after_first)
    assert all(p is not method.act_scale for p in method.prompt_parameters())


def test_alignment_steps_once_per_old_class_when_asked():
    torch.manual_seed(0)
    statistics = GaussianClassStatistics()
    for c in range(4):
        statistics.add_class(c, torch.randn(6, 3) + c)
    head = torch.nn.Linear(3, 4)
    steps = []
    original = head.forward
    head.forward = lambda x: (steps.append(len(x)), original(x))[1]
    config = AlignmentConfig(epochs=2, lr=0.01, scheduler_t_max=2, samples_per_class=5, decay=False)
    align_classifier(head, statistics, config, n_seen_classes=4, scale=1.0, batch_size=8, logits=head,
                     steps_per_epoch=3, generator=torch.Generator().manual_seed(0))
    assert steps == [5] * 6  # 2 epochs x 3 steps of 5 samples, of the 4 x 5 drawn per epoch


@pytest.mark.parametrize("options", [HIDE, NORGA], ids=["hide_prompt", "norga"])
def test_three_tasks_through_the_loop(options, tmp_path):
    config = tiny_config(method={**options, "tii_epochs": 2}, train={**TRAIN, "epochs": 2},
                         backbone=DEMO_BACKBONE, data=GLYPHS)
    summary = run_experiment(config, tmp_path / "run")
    assert len(summary.top1_curve) == 3
    assert summary.a_last > 40.0  # 6 generated classes: chance is 16.7


@pytest.mark.parametrize("kill_point", ["task1/task-identity/epoch1/batch0", "task1/prompts/epoch1/batch0"],
                         ids=["in-the-task-identity-phase", "in-the-prompts-phase"])
def test_interrupted_mid_task_resumes_to_identical_results(kill_point, tmp_path, monkeypatch):
    config = tiny_config(method={**NORGA, "tii_epochs": 2}, train={**TRAIN, "epochs": 2, "batch_size": 8,
                                                                   "checkpoint_every_epochs": 1})
    check_interrupted_run_resumes_identically(config, kill_point, tmp_path, monkeypatch)
