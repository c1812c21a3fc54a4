"""TUNA: the universal adapters are EMR-merging's unified vector of the task-specific sets, the entropy rule picks
the most confident task's adapters, finished tasks' adapters never change while the working set keeps learning
(except, as in the authors' code, the up projections their orthogonality penalty reaches), the penalty is the
authors' formula, and a run resumes mid-task to identical numbers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from carecl.engine import Experiment, learn_task, run_experiment
from carecl.methods.tuna import TUNA, emr_unified, prediction_entropy

from helpers import DEMO_BACKBONE, GLYPHS, check_interrupted_run_resumes_identically, tiny_config

TUNA_OPTIONS = {"name": "tuna", "adapter": {"bottleneck": 4}, "alignment": {"epochs": 1, "samples_per_class": 4}}


def authors_emr(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Their emr_merge's unified vector, step by step: flag from the mean, running max of agreeing magnitudes."""
    flag = (torch.stack(vectors).mean(0) > 0) * 2 - 1
    largest = torch.zeros_like(vectors[0])
    for vector in vectors:
        magnitude = torch.abs(((vector * flag) > 0) * vector)
        largest = torch.where(magnitude > largest, magnitude, largest)
    return largest * flag


def test_emr_unified_vector_on_a_constructed_case_and_at_random():
    stacked = torch.tensor([[1.0, -2.0, 0.5, 0.0], [3.0, 1.0, -1.0, 0.0]])
    # Signs of the means: +, -, -, - (zero counts as negative); magnitudes from the agreeing tasks only.
    torch.testing.assert_close(emr_unified(stacked), torch.tensor([3.0, -2.0, -1.0, 0.0]))
    vectors = list(torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(emr_unified(torch.stack(vectors)), authors_emr(vectors).float())


def test_entropy_selection_picks_the_most_confident_task_and_adds_the_universal_softmax():
    experiment = Experiment.build(tiny_config(method=TUNA_OPTIONS))
    method: TUNA = experiment.method
    method._n_learned_tasks = 3
    confident, flat = torch.tensor([9.0, 0.0, 0.0, 0.0, 0.0, 0.0]), torch.zeros(6)
    # Image 0: task 2's adapters are confident; image 1: task 0's.
    logits = torch.stack([torch.stack([flat, flat, confident.roll(4)]), torch.stack([confident, flat, flat])])
    method.task_logits = lambda images: logits
    scores = method.predict(torch.zeros(2, 3, 16, 16))
    # latest: the universal logits are the last task's own.
    expected = torch.stack([confident.roll(4).softmax(0) + confident.roll(4).softmax(0),
                            confident.softmax(0) + flat.softmax(0)])
    torch.testing.assert_close(scores, expected)
    assert scores.argmax(1).tolist() == [4, 0]
    entropy = prediction_entropy(logits)
    assert entropy.argmin(1).tolist() == [2, 0]
    p = flat.softmax(0)
    torch.testing.assert_close(entropy[0, 0], -(p * torch.log(p + 1e-10)).sum())


def learn_three_tasks(**options):
    experiment = Experiment.build(tiny_config(method={**TUNA_OPTIONS, **options}, train={"epochs": 2, "lr": 0.5}))
    method: TUNA = experiment.method
    tasks = experiment.scenario.tasks()
    learn_task(experiment, tasks[0])
    first = {name: p.clone() for name, p in method.bank.sets[0].named_parameters()}
    for ours, working in zip(first.values(), method.working.adapters.parameters()):
        torch.testing.assert_close(ours, working.detach(), msg="a task's set is the working adapters at its end")
    for task in tasks[1:]:
        learn_task(experiment, task)
    assert any(not torch.equal(a, b) for a, b in zip(first.values(), method.working.adapters.parameters())), \
        "the working adapters keep learning"
    moved = {name for name, p in method.bank.sets[0].named_parameters() if not torch.equal(first[name], p)}
    return method, moved


def test_finished_task_adapters_never_change_without_the_penalty_and_the_universal_set_is_their_merge():
    for options in ({"orthogonality_weight": 0.0}, {"penalty_trains_finished_sets": False}):
        method, moved = learn_three_tasks(**options)
        assert not moved, f"task 0's adapters never change after task 0 ({options})"
    sets = [list(s.parameters()) for s in method.bank.sets]
    for position, merged in enumerate(method.merged.sets[0].parameters()):
        torch.testing.assert_close(merged, authors_emr([s[position] for s in sets]).to(merged.dtype))


def test_the_penalty_moves_only_the_finished_sets_up_projections_as_in_the_authors_code():
    method, moved = learn_three_tasks(orthogonality_weight=1.0)
    assert moved and all(name.endswith("up.weight") for name in moved), moved
    assert all(not p.requires_grad for p in method.bank.parameters()), "between tasks every stored set is frozen"


def test_merged_universal_adapters_run_the_merge(monkeypatch):
    experiment = Experiment.build(tiny_config(method={**TUNA_OPTIONS, "universal_adapter": "merged"},
                                              train={"epochs": 1, "lr": 0.5}))
    method: TUNA = experiment.method
    for task in experiment.scenario.tasks()[:2]:
        learn_task(experiment, task)
    images = torch.rand(4, 3, 16, 16)
    with method.working.bypassed(), method.merged.using(0):
        expected = method.options.scale * method.classifier(method.backbone(images))[:, :4]
    torch.testing.assert_close(method.universal_logits(images, method.task_logits(images)), expected)
    method.options.universal_adapter = "latest"
    torch.testing.assert_close(method.universal_logits(images, method.task_logits(images)),
                               method.task_logits(images)[:, -1])


def test_orthogonality_penalty_is_the_authors_mean_of_normalised_products():
    experiment = Experiment.build(tiny_config(method=TUNA_OPTIONS))
    method: TUNA = experiment.method
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        method.bank.add_set()
    with torch.no_grad():
        for adapter in [*method.working.adapters, *(a for s in method.bank.sets for a in s)]:
            adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=generator))
    depth, expected = len(method.working.adapters), 0.0
    for i in range(2):
        for block in range(depth):
            current = F.normalize(method.working.adapters[block].up.weight, p=2, dim=1)
            previous = F.normalize(method.bank.sets[i][block].up.weight, p=2, dim=1)
            expected += torch.abs(torch.mean(current @ previous.T)) / depth
    torch.testing.assert_close(method.orthogonality(2), expected)
    # The loss adds reg * e^-(t+1) times it from the second task on.
    task = experiment.scenario.task(2)
    method.classifier.add_block(2), method.classifier.add_block(2), method.classifier.add_block(2)
    images, targets = torch.rand(4, 3, 16, 16), torch.tensor([4, 5, 5, 4])
    method.eval()
    out = method.training_loss(images, targets, task)
    cosface = F.cross_entropy(20.0 * method.classifier(method.backbone(images))[:, 4:6], targets - 4)
    torch.testing.assert_close(out.loss, cosface + 0.001 * math.exp(-3) * method.orthogonality(2))


def test_three_tasks_through_the_loop(tmp_path):
    config = tiny_config(method={**TUNA_OPTIONS, "alignment": {"epochs": 2, "samples_per_class": 8}},
                         train={"epochs": 2, "lr": 0.05}, backbone=DEMO_BACKBONE, data=GLYPHS)
    summary = run_experiment(config, tmp_path / "run")
    assert len(summary.top1_curve) == 3
    assert summary.a_last > 40.0  # 6 generated classes: chance is 16.7


def test_interrupted_mid_task_resumes_to_identical_results(tmp_path, monkeypatch):
    config = tiny_config(method=TUNA_OPTIONS, train={"epochs": 2, "batch_size": 8, "checkpoint_every_epochs": 1})
    check_interrupted_run_resumes_identically(config, "task1/adapter/epoch1/batch0", tmp_path, monkeypatch)
