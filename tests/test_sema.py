"""SEMA: the loss window and z-scores as the authors' Records compute them; a block expands when all its adapters
find a batch out of distribution, at most once per task; frozen adapters never change; a task without a
shift trains the head only; a run interrupted after an expansion resumes identically."""

from __future__ import annotations

import pytest
import torch

from carecl.engine import Experiment, learn_task
from carecl.tuners.sema import LossWindow, SEMAConfig, SEMAInjector

from helpers import check_interrupted_run_resumes_identically, tiny_config, tiny_vit

SEMA = {"name": "sema", "sema": {"bottleneck": 4, "rd_dim": 8, "first_expandable": 1, "last_expandable": 1}, "rd_epochs": 2,
        "detect_batch_size": 8}


def test_the_loss_window_fills_drops_the_overflow_then_slides():
    window = LossWindow(4)
    window.add(torch.tensor([1.0, 2.0, 3.0]))
    window.add(torch.tensor([4.0, 5.0]))  # one free slot: 5 is dropped, as the authors' Records does
    assert window.values.tolist() == [1.0, 2.0, 3.0, 4.0] and int(window.length) == 4
    window.add(torch.tensor([6.0]))
    assert window.values.tolist() == [2.0, 3.0, 4.0, 6.0]
    values = torch.tensor([2.0, 3.0, 4.0, 6.0])
    expected = ((torch.tensor([10.0]) - values.mean()) / values.var().sqrt()).abs()  # unbiased variance, |z|
    torch.testing.assert_close(window.z_scores(torch.tensor([10.0])), expected)
    window.updating.fill_(False)
    window.add(torch.tensor([100.0]))
    assert window.values.tolist() == [2.0, 3.0, 4.0, 6.0]
    assert LossWindow(4).z_scores(torch.tensor([9.0])).item() == 0.0  # two values or fewer: no z-score yet


def injector_with_window(threshold: float) -> SEMAInjector:
    injector = SEMAInjector(tiny_vit(), SEMAConfig(bottleneck=4, rd_dim=8, threshold=threshold, first_expandable=1,
                                                   last_expandable=1))
    seen = torch.rand(16, 3, 16, 16)
    injector.train()
    for _ in range(3):  # fill block 1's window with the losses of in-distribution images
        injector.begin_forward()
        injector.vit.forward_features(seen)
    injector.eval()
    return injector


def test_a_block_expands_when_every_adapter_sees_the_batch_out_of_distribution():
    injector = injector_with_window(threshold=3.0)
    injector.detecting = True
    injector.begin_forward()
    injector.vit.forward_features(torch.rand(8, 3, 16, 16))
    assert injector.expansion is None  # images like the ones seen
    injector.begin_forward()
    injector.vit.forward_features(torch.rand(8, 3, 16, 16) * 40 - 20)
    assert injector.expansion == 1
    injector.layers[1].added_for_task.fill_(True)  # one expansion per block per task
    injector.begin_forward()
    injector.vit.forward_features(torch.rand(8, 3, 16, 16) * 40 - 20)
    assert injector.expansion is None
    injector.layers[1].added_for_task.fill_(False)
    injector.layers[1].add_adapter()  # the new adapter's own window is empty: its z-scores are 0, below the threshold
    injector.begin_forward()
    injector.vit.forward_features(torch.rand(8, 3, 16, 16) * 40 - 20)
    assert injector.expansion is None


def test_adapters_freeze_after_their_task_and_a_task_without_shift_trains_the_head_only():
    experiment = Experiment.build(tiny_config(method={**SEMA, "sema": {**SEMA["sema"], "threshold": 1e9}}, train={"epochs": 2}))
    method = experiment.method
    learn_task(experiment, experiment.scenario.task(0))
    adapters = {k: v.clone() for k, v in method.tuner.state_dict().items()}
    head = method.head.weight.detach().clone()
    learn_task(experiment, experiment.scenario.task(1))
    assert all(torch.equal(v, method.tuner.state_dict()[k]) for k, v in adapters.items())
    assert not torch.equal(head, method.head.weight)
    assert [len(layer.adapters) for layer in method.tuner.layers] == [1, 1]


def test_a_detected_shift_adds_an_adapter_that_trains_while_the_old_ones_stay(tmp_path):
    experiment = Experiment.build(tiny_config(method={**SEMA, "sema": {**SEMA["sema"], "threshold": 0.0}}, train={"epochs": 2}))
    method = experiment.method
    learn_task(experiment, experiment.scenario.task(0))
    first = [p.detach().clone() for p in method.tuner.layers[1].adapters[0].parameters()]
    learn_task(experiment, experiment.scenario.task(1))
    layer = method.tuner.layers[1]
    assert len(layer.adapters) == 2 and len(method.tuner.layers[0].adapters) == 1
    assert all(torch.equal(a, b) for a, b in zip(first, layer.adapters[0].parameters()))
    up = layer.adapters[1].functional.up
    assert up.weight.abs().sum() + up.bias.abs().sum() > 0  # trained away from its zero start
    assert not bool(layer.adapters[1].window.updating)  # described, then frozen


def test_a_run_interrupted_after_an_expansion_resumes_identically(tmp_path, monkeypatch):
    config = tiny_config(method={**SEMA, "sema": {**SEMA["sema"], "threshold": 0.0}}, train={"epochs": 2, "checkpoint_every_epochs": 1})
    check_interrupted_run_resumes_identically(config, "task1/descriptors/epoch1/batch0", tmp_path, monkeypatch)


def test_expandable_blocks_must_exist_and_default_to_the_last_three():
    from carecl.config import ConfigError

    with pytest.raises(ConfigError, match=r"method.sema.first_expandable 9 is not a block of the ViT \(it has 2"):
        Experiment.build(tiny_config(method={"name": "sema", "sema": {"first_expandable": 9, "last_expandable": 11}}))
    assert Experiment.build(tiny_config(method={"name": "sema"})).method.expandable_blocks == [0, 1]
    assert SEMAConfig().expandable_range(12) == range(9, 12)  # the authors' adapt_start_layer 9 .. end 11
