import json

import pytest
import torch

from carecl.engine import Learner, learn_task, load_learner, run_experiment
from carecl.methods.care import CaRE
from carecl.rundir import RunDirectory

from conftest import tiny_config

CARE = {"name": "care", "adapter_dim": 8, "expert_dim": 4, "alignment": {"epochs": 2, "samples_per_class": 8}}


def care_config(**overrides):
    method = {**CARE, **overrides.pop("method", {})}
    return tiny_config(method=method, **overrides)


def test_two_phase_schedule_for_later_tasks():
    learner = Learner.build(care_config(train={"epochs": 6, "lr": 0.1, "min_lr": 0.0}))
    method: CaRE = learner.method
    first, = method.training_phases(learner.scenario.task(0))
    assert (first.epochs, first.lr, first.schedule_epochs) == (6, 0.1, 6)
    a, b = method.training_phases(learner.scenario.task(1))
    assert (a.epochs, a.lr, a.schedule_epochs) == (3, 0.1, 6)
    assert a.final_lr == pytest.approx(0.05)  # half-way down the full cosine
    assert (b.epochs, b.lr, b.schedule_epochs, b.min_lr) == (3, pytest.approx(0.05), 3, 0.0)


def test_optimised_parameters_are_current_parts_shared_adapters_and_classifier():
    learner = Learner.build(care_config())
    method: CaRE = learner.method
    for task in learner.scenario.tasks()[:2]:
        learn_task(learner, task)
    method.begin_task(learner.scenario.task(2))
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
    method.training_loss(images, targets, learner.scenario.task(2)).loss.backward()
    for name, p in method.named_parameters():
        if id(p) not in trainable:
            assert p.grad is None, name


def test_auxiliary_loss_switches_change_the_loss():
    torch.manual_seed(0)
    losses = {}
    for aux_cos, self_dist in [(True, True), (False, True), (True, False)]:
        learner = Learner.build(care_config(method={"aux_cos_loss": aux_cos, "self_dist_loss": self_dist}))
        task = learner.scenario.task(0)
        learner.method.begin_task(task)
        learner.method.eval()  # no dropout: the same forward for every variant
        losses[(aux_cos, self_dist)] = learner.method.training_loss(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1]), task).loss.item()
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
    learner = load_learner(RunDirectory.open(tmp_path / "run"))
    images = torch.rand(5, 3, 16, 16)
    method: CaRE = learner.method
    method.eval()
    assert method.logits(images).shape == (5, 10)
    assert method.features(images, task=1).shape == (5, 64)
    # Statistics and weights survive the round trip: re-evaluation equals the recorded result.
    from carecl.evaluation import evaluate

    again = evaluate(method, learner.test_loader(10), learner.device, 2, 2)
    assert again.top1 == pytest.approx(summary.a_last)
    assert sorted(method.statistics.class_ids) == list(range(10))


def test_iterative_prediction_combines_two_distributions():
    learner = Learner.build(care_config(train={"epochs": 0}))
    for task in learner.scenario.tasks()[:2]:
        learn_task(learner, task)
    method: CaRE = learner.method
    method.eval()
    images = torch.rand(3, 3, 16, 16)
    scores = method.predict(images)
    assert scores.shape == (3, 4)
    assert torch.allclose(scores.sum(dim=1), torch.full((3,), 2.0), atol=1e-5)
    method.options.iter_pred_max_tasks = 1  # past the cap: single pass
    assert torch.allclose(method.predict(images), method.logits(images))


def test_care_learns_generated_glyphs_over_three_tasks(tmp_path):
    # Glyph classes unseen in the shipped backbone's pre-training, 3 tasks of 2.
    glyphs = {"dataset": "glyphs", "synthetic_classes": 6, "synthetic_train_per_class": 20, "init_cls": 2, "increment": 2}
    config = care_config(train={"epochs": 4, "lr": 0.003, "batch_size": 16}, backbone=DEMO_BACKBONE, data=glyphs)
    summary = run_experiment(config, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [task["n_samples"] for task in metrics["tasks"]] == [12, 24, 36]
    assert summary.a_last > 70.0  # chance is 1/6
