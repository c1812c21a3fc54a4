"""Routing diagnostics: exact recall on a model whose routing is forced, and on a trained run."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import timm
import torch

from carecl.tuners.brmoe import BRMoEConfig, BRMoEViT
from carecl.cli.main import main
from carecl.report.routing import DiagnosticsError, diagnose_model, diagnose_routing
from carecl.engine import Experiment, learn_task, load_experiment, run_experiment
from carecl.runs.directory import RunDirectory

from helpers import TINY_VIT, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

CARE = {"name": "care", "brmoe": {"adapter_dim": 8, "expert_dim": 4}, "alignment": {"epochs": 2, "samples_per_class": 8}}

# Fresh experts output 0 (zero scale), so every perceptron sees c_i = 0 and outputs its bias, and
# every router scores its bias: the biases below fix each block's routing for every input.
# Block 0: perceptron confidence 0 > 2 > 1 -> routers {0, 2}; router 2 prefers expert 1, then 2.
# Block 1: perceptron confidence 1 > 0 > 2 -> routers {1, 0}; router 1 prefers expert 0, then 1.
PERCEPTRON_BIASES = [[[4.0, 0.0], [0.0, 0.0], [2.0, 0.0]],
                     [[1.0, 0.0], [6.0, 0.0], [0.0, 0.0]]]
ROUTER_BIASES = [[[0.0], [0.0, 3.0], [0.0, 5.0, 1.0]],
                 [[0.0], [3.0, 0.0], [1.0, 0.0, 0.0]]]


def entropy(logits: list[float]) -> float:
    p = torch.tensor(logits, dtype=torch.float64).softmax(0)
    return float(-(p * p.log()).sum())


@torch.no_grad()
def force_routing(model: BRMoEViT) -> BRMoEViT:
    for layer, perceptron_biases, router_biases in zip(model.layers, PERCEPTRON_BIASES, ROUTER_BIASES):
        for perceptron, bias in zip(layer.perceptrons, perceptron_biases):
            perceptron[1].weight.zero_()
            perceptron[1].bias.copy_(torch.tensor(bias))
        for router, bias in zip(layer.routers, router_biases):
            router.weight.zero_()
            router.bias.copy_(torch.tensor(bias))
    model.invalidate_caches()
    return model


def forced_model(topk_experts: int, n_tasks: int = 3) -> BRMoEViT:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)
    model = BRMoEViT(vit, BRMoEConfig(adapter_dim=8, expert_dim=4, topk_routers=2, topk_experts=topk_experts))
    for _ in range(n_tasks):
        model.add_task(2)
    return force_routing(model) if n_tasks == 3 else model


# Two batches (the diagnostics concatenate them) of five samples with these true tasks.
TRUE_TASKS = [torch.tensor([0, 1, 2]), torch.tensor([2, 1])]


def batches():
    generator = torch.Generator().manual_seed(3)
    return [(torch.rand(len(tasks), 3, 16, 16, generator=generator), tasks) for tasks in TRUE_TASKS]


def test_recall_rank_and_gap_on_forced_routing():
    diagnostics = diagnose_model(forced_model(topk_experts=1), batches())
    first, second = diagnostics.blocks
    assert diagnostics.true_tasks.tolist() == [0, 1, 2, 2, 1]
    # Block 0 selects routers {0, 2}: tasks 0 and 2 are recalled (3 of 5 samples).
    assert first.router_hit.tolist() == [True, False, True, True, False]
    assert first.router_recall == pytest.approx(60.0)
    # K = 1: router 0 mixes expert 0, router 2 expert 1.
    assert first.expert_hit.tolist() == [True, True, False, False, True]
    assert first.true_rank.tolist() == [1, 3, 2, 2, 3]
    assert first.top1_router_accuracy == pytest.approx(20.0)
    e0, e1, e2 = (entropy(b) for b in PERCEPTRON_BIASES[0])
    expected_gaps = [e2 - e0, e0 - e1, e0 - e2, e0 - e2, e0 - e1]
    np.testing.assert_allclose(first.entropy_gap, expected_gaps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first.expert_weight_share, [0.5, 0.5, 0.0], atol=1e-6)
    assert first.expert_selections.tolist() == [5, 5, 0] and first.router_selections.tolist() == [5, 0, 5]
    # Block 1 selects routers {1, 0}, both mixing expert 0 only.
    assert second.router_recall == pytest.approx(60.0) and second.expert_recall == pytest.approx(20.0)
    assert second.true_rank.tolist() == [2, 1, 3, 3, 1]
    np.testing.assert_allclose(second.expert_weight_share, [1.0, 0.0, 0.0], atol=1e-6)
    # Counted once per sample although both routers pick it.
    assert second.expert_selections.tolist() == [5, 0, 0]
    np.testing.assert_allclose(diagnostics.router_recall_by_task(), [[100, 0, 100], [100, 100, 0]])


def test_expert_recall_with_two_experts_per_router():
    diagnostics = diagnose_model(forced_model(topk_experts=2), batches())
    first, second = diagnostics.blocks
    # Block 0: router 2's top-2 are experts 1 and 2, so every task's expert is mixed.
    assert first.expert_recall == pytest.approx(100.0)
    p = math.exp(5) / (math.exp(5) + math.exp(1))
    np.testing.assert_allclose(first.expert_weight_share, [0.5, 0.5 * p, 0.5 * (1 - p)], rtol=1e-5)
    # Block 1: router 1 mixes experts 0 and 1, router 0 expert 0.
    assert second.expert_hit.tolist() == [True, True, False, False, True]
    assert second.expert_selections.tolist() == [5, 5, 0]
    assert diagnostics.rows()[1][2] == pytest.approx(60.0)
    assert diagnostics.rows()[-1][1] == pytest.approx(60.0)  # mean R@2 over the blocks


def test_padded_expert_slots_are_not_selections():
    # K = 3: router 0 scores expert 0 only and router 1 experts 0-1; their other slots are padding
    # (weight 0) that name experts 1 and 2 and must not count.
    second = diagnose_model(forced_model(topk_experts=3), batches()).blocks[1]
    assert second.expert_hit.tolist() == [True, True, False, False, True]
    assert second.expert_selections.tolist() == [5, 5, 0]
    p = math.exp(3) / (math.exp(3) + 1)
    np.testing.assert_allclose(second.expert_weight_share, [(1 + p) / 2, (1 - p) / 2, 0.0], rtol=1e-5, atol=1e-7)


def test_single_task_routes_without_choice():
    diagnostics = diagnose_model(forced_model(topk_experts=3, n_tasks=1), [(torch.rand(4, 3, 16, 16), torch.zeros(4))])
    for block in diagnostics.blocks:
        assert block.router_recall == 100.0 and block.expert_recall == 100.0
        assert block.true_rank.tolist() == [1, 1, 1, 1]
        assert math.isnan(block.mean_entropy_gap)
    assert "n/a" in diagnostics.table()


def test_traces_are_switched_off_afterwards_even_on_error():
    model = forced_model(topk_experts=1)
    model.train()
    diagnose_model(model, batches())
    assert all(layer.routing_trace is None for layer in model.layers)
    assert model.training
    with pytest.raises(DiagnosticsError, match="true tasks"):
        diagnose_model(model, [(torch.rand(2, 3, 16, 16), torch.tensor([0, 3]))])
    assert all(layer.routing_trace is None for layer in model.layers)


def test_learner_true_tasks_come_from_the_class_order():
    experiment = Experiment.build(tiny_config(method={**CARE, "brmoe": {**CARE["brmoe"], "topk_experts": 1}}))
    experiment.method.regrow(3, 3)
    force_routing(experiment.method.model)
    diagnostics = diagnose_routing(experiment)
    labels = experiment.test_loader(6).dataset.labels
    tasks = labels // 2  # three tasks of two classes, in class-order positions
    assert diagnostics.true_tasks.tolist() == tasks.tolist()
    assert diagnostics.router_recall[0] == pytest.approx(100.0 * np.isin(tasks, [0, 2]).mean())
    assert diagnostics.router_recall[1] == pytest.approx(100.0 * np.isin(tasks, [0, 1]).mean())
    assert diagnostics.expert_recall[1] == pytest.approx(100.0 * (tasks == 0).mean())


def test_methods_without_brmoe_are_refused():
    experiment = Experiment.build(tiny_config())
    learn_task(experiment, experiment.scenario.task(0))
    with pytest.raises(DiagnosticsError, match="simplecil"):
        diagnose_routing(experiment)


@pytest.fixture(scope="module")
def care_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("diagnose") / "run"
    run_experiment(tiny_config(method=CARE), run)
    return run


def test_cli_writes_table_csv_and_figure(care_run, tmp_path, capsys):
    assert main(["diagnose", str(care_run), "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "R@2" in printed and "E@3" in printed
    rows = list(csv.DictReader((tmp_path / "out" / "routing.csv").open()))
    assert [row["block"] for row in rows] == ["1", "2", "mean"]
    diagnostics = diagnose_routing(load_experiment(RunDirectory.open(care_run)))
    for row, recall, expert in zip(rows, diagnostics.router_recall, diagnostics.expert_recall):
        assert float(row["R@2"]) == pytest.approx(recall, abs=1e-4)
        assert float(row["E@3"]) == pytest.approx(expert, abs=1e-4)
        # The most confident perceptron's router is always among the M selected ones.
        assert float(row["R@1"]) <= float(row["R@2"]) + 1e-9
    usage = list(csv.DictReader((tmp_path / "out" / "expert_usage.csv").open()))
    assert len(usage) == 2 * 3
    for block in ("1", "2"):
        assert sum(float(r["expert_weight_share"]) for r in usage if r["block"] == block) == pytest.approx(1.0, abs=1e-5)
    for name in ("routing.md", "routing.png", "routing.svg"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "| mean |" in (tmp_path / "out" / "routing.md").read_text()
