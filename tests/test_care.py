import json

import pytest
import torch

from carecl.statistics import StackedGaussians
from carecl.engine import Experiment, RunProgress, learn_task, load_experiment, run_experiment
from carecl.engine.loggers import RunLogger
from carecl.methods.care import CaRE
from carecl.runs.directory import RunDirectory

from helpers import tiny_config

CARE = {"name": "care", "brmoe": {"adapter_dim": 8, "expert_dim": 4}, "alignment": {"epochs": 2, "samples_per_class": 8}}


def care_config(**overrides):
    method = {**CARE, **overrides.pop("method", {})}
    return tiny_config(method=method, **overrides)


class LearningRates(RunLogger):
    def __init__(self) -> None:
        self.by_step: list[float] = []

    def log_step(self, global_step: int, scalars) -> None:
        self.by_step.append(scalars["lr"])


def release_schedule(epochs: int, eta_min: float, lr: float, steps_per_epoch: int) -> list[float]:
    """The lr of each step under the release: CosineAnnealingLR(T_max=epochs, eta_min) stepped per epoch."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=eta_min)
    rates = []
    for _ in range(epochs):
        rates += [optimizer.param_groups[0]["lr"]] * steps_per_epoch
        optimizer.step()
        scheduler.step()
    return rates


def test_learning_rate_of_every_step_follows_the_release_schedule(single_thread):
    # 12 training images per class, batch 8: 3 steps per epoch on a 2-class task.
    lr, min_lr, epochs = 0.1, 0.001, 6
    experiment = Experiment.build(care_config(train={"epochs": epochs, "lr": lr, "min_lr": min_lr, "batch_size": 8},
                                        method={"alignment": {"epochs": 1, "samples_per_class": 4}}))
    first, second = (LearningRates(), LearningRates())
    learn_task(experiment, experiment.scenario.task(0), progress=RunProgress(), logger=first)
    learn_task(experiment, experiment.scenario.task(1), progress=RunProgress(), logger=second)
    assert first.by_step == pytest.approx(release_schedule(epochs, min_lr, lr, 3))
    # Later tasks: a full cosine of its own to lr/2 over epochs//2, then from there to min_lr.
    half = epochs // 2
    expected = release_schedule(half, lr / 2, lr, 3) + release_schedule(half, min_lr, lr / 2, 3)
    assert second.by_step == pytest.approx(expected)


def test_published_decay_scales_newest_classes_most_at_a_later_task(monkeypatch, single_thread):
    # Spec §6, measured against the release: 4 classes per task, alignment at task 3.
    config = care_config(data={"synthetic_classes": 16, "init_cls": 4, "increment": 4},
                         method={"alignment": {"epochs": 1, "samples_per_class": 2, "decay": True}})
    assert config.method.alignment.decay_formula == "release"
    experiment = Experiment.build(config)
    scales = []
    original = StackedGaussians.sample

    def record(self, n_per_class, mean_scale=None, generator=None):
        scales.append(mean_scale)
        return original(self, n_per_class, mean_scale, generator)

    monkeypatch.setattr(StackedGaussians, "sample", record)
    for task in experiment.scenario.tasks():
        learn_task(experiment, task)
    expected = [.925, .9, .9, .9, .9, .875, .875, .875, .875, .85, .85, .85, .85, .825, .825, .825]
    torch.testing.assert_close(scales[-1], torch.tensor(expected))


def test_optimised_parameters_are_current_parts_shared_adapters_and_classifier():
    experiment = Experiment.build(care_config())
    method: CaRE = experiment.method
    for task in experiment.scenario.tasks()[:2]:
        learn_task(experiment, task)
    method.begin_task(experiment.scenario.task(2))
    trainable = {id(p) for p in method.trainable_parameters()}
    names = {name for name, p in method.named_parameters() if id(p) in trainable}
    assert all(not p.requires_grad for p in method.backbone.parameters())
    assert not any(n.startswith("backbone.") for n in names)
    assert {n for n in names if n.startswith("classifier.")} == {f"classifier.heads.{i}" for i in range(3)}
    # Everything trainable is either the classifier or something BR-MoE declares trainable.
    declared = {id(p) for p in method.model.trainable_parameters()}
    assert trainable == declared | {id(p) for p in method.classifier.parameters()}
    # Gradients reach only those parameters.
    images = torch.rand(4, 3, 16, 16)
    targets = torch.tensor([4, 5, 4, 5])
    method.train()
    method.training_loss(images, targets, experiment.scenario.task(2)).loss.backward()
    for name, p in method.named_parameters():
        if id(p) not in trainable:
            assert p.grad is None, name


def test_auxiliary_loss_switches_change_the_loss():
    torch.manual_seed(0)
    losses = {}
    for aux_cos, self_dist in [(True, True), (False, True), (True, False)]:
        experiment = Experiment.build(care_config(method={"aux_cos_loss": aux_cos, "self_dist_loss": self_dist}))
        task = experiment.scenario.task(0)
        experiment.method.begin_task(task)
        experiment.method.eval()  # no dropout: the same forward for every variant
        losses[(aux_cos, self_dist)] = experiment.method.training_loss(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1]), task).loss.item()
    assert len({round(v, 6) for v in losses.values()}) == 3


# The demo's shipped ViT, pre-trained on generated glyphs: a random tiny ViT's CLS token
# barely depends on its input, so no adapter method can learn on top of it.
DEMO_BACKBONE = {"name": "vit_tiny_patch16_224", "pretrained": False, "weights": "asset:tiny_vit_glyphs.safetensors",
                 "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4}}


def test_care_end_to_end_and_reload(tmp_path):
    # Digits (shipped with scikit-learn) in 3 tasks of 4, 3, 3 classes: an unequal first task.
    digits = {"dataset": "digits", "image_size": 16, "init_cls": 4, "increment": 3}
    config = care_config(train={"epochs": 4, "lr": 0.003, "batch_size": 32}, backbone=DEMO_BACKBONE, data=digits)
    summary = run_experiment(config, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["tasks"]) == 3
    assert summary.a_last > 40.0  # chance is 10%
    experiment = load_experiment(RunDirectory.open(tmp_path / "run"))
    images = torch.rand(5, 3, 16, 16)
    method: CaRE = experiment.method
    method.eval()
    assert method.logits(images).shape == (5, 10)
    assert method.features(images, task=1).shape == (5, 64)
    # Statistics and weights survive the round trip: re-evaluation equals the recorded result.
    from carecl.engine.evaluation import evaluate

    again = evaluate(method, experiment.test_loader(10), experiment.device, 2, 2)
    assert again.top1 == pytest.approx(summary.a_last)
    assert sorted(method.statistics.class_ids) == list(range(10))


def test_iterative_prediction_combines_two_distributions():
    experiment = Experiment.build(care_config(train={"epochs": 0}))
    for task in experiment.scenario.tasks()[:2]:
        learn_task(experiment, task)
    method: CaRE = experiment.method
    method.eval()
    images = torch.rand(3, 3, 16, 16)
    scores = method.predict(images)
    assert scores.shape == (3, 4)
    assert torch.allclose(scores.sum(dim=1), torch.full((3,), 2.0), atol=1e-5)
    method.options.iter_pred_max_tasks = 1  # past the cap: single pass
    assert torch.allclose(method.predict(images), method.logits(images))


def test_iterative_prediction_runs_through_task_index_60_as_in_the_release():
    method: CaRE = Experiment.build(care_config(train={"epochs": 0})).method
    used = {}
    for learned in (1, 2, 60, 61, 62):
        method.regrow(0, learned)
        used[learned] = method.uses_iterative_prediction()
    # Release: `_cur_task == 0 or _cur_task > 60` -> single pass; _cur_task = learned - 1.
    assert used == {1: False, 2: True, 60: True, 61: True, 62: False}


def test_care_learns_generated_glyphs_over_three_tasks(tmp_path):
    # Glyph classes unseen in the shipped backbone's pre-training, 3 tasks of 2.
    glyphs = {"dataset": "glyphs", "synthetic_classes": 6, "synthetic_train_per_class": 20, "init_cls": 2, "increment": 2}
    config = care_config(train={"epochs": 4, "lr": 0.003, "batch_size": 16}, backbone=DEMO_BACKBONE, data=glyphs)
    summary = run_experiment(config, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [task["n_samples"] for task in metrics["tasks"]] == [12, 24, 36]
    assert summary.a_last > 70.0  # chance is 1/6
