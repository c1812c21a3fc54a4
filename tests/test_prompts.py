"""The prompt engine and the classic prompt learners: pool selection and the key pull on a hand case, the batch
majority vote, prompt tokens placed as L2P places them, an empty prefix leaving the frozen ViT unchanged,
DualPrompt's per-task slots and its key/value reshape, CODA-Prompt's Gram-Schmidt components and frozen
earlier components, CODA's schedule, and each learner through the loop."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from carecl.engine import Experiment, learn_task, run_experiment
from carecl.engine.optim import build_scheduler
from carecl.methods.base import Phase
from carecl.methods.coda_prompt import gram_schmidt_rows
from carecl.methods.prompt_learner import reshape_quirk
from carecl.tuners.prefix import Prefix, PrefixInjector
from carecl.tuners.prompt_pool import PromptPool, majority_slots

from helpers import DEMO_BACKBONE, GLYPHS, TINY_VIT, check_interrupted_run_resumes_identically, tiny_config

L2P = {"name": "l2p", "pool_size": 4, "top_k": 2, "prompt_length": 2}
DUALPROMPT = {"name": "dualprompt", "g_layers": [0], "e_layers": [1], "pool_size": 4, "g_length": 2, "e_length": 3}
CODA = {"name": "coda_prompt", "pool_size": 6, "prompt_length": 4, "layers": [0, 1]}


def hand_pool(batchwise: bool) -> PromptPool:
    pool = PromptPool(4, (1, 2), key_dim=2, top_k=2, batchwise=batchwise)
    with torch.no_grad():  # keys at 0°, 90°, 180°, 45°
        pool.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]]))
    return pool


def test_the_pool_picks_the_keys_closest_to_each_query_and_sums_their_cosines():
    pool = hand_pool(batchwise=False)
    queries = torch.tensor([[2.0, 0.1], [0.1, 1.0]])  # near 0°, near 90°
    selection = pool.select(queries)
    assert [sorted(row) for row in selection.indices.tolist()] == [[0, 3], [1, 3]]
    cos = F.normalize(queries, dim=1) @ F.normalize(pool.keys, dim=1).T
    expected = (cos[0, 0] + cos[0, 3] + cos[1, 1] + cos[1, 3]) / 2
    torch.testing.assert_close(selection.pull, expected)
    forced = pool.select(queries, forced=torch.tensor([[2, 1], [2, 1]]))
    torch.testing.assert_close(forced.pull, (cos[:, 2] + cos[:, 1]).sum() / 2)


def test_batchwise_selection_is_a_majority_vote_with_ties_to_the_lower_slot():
    assert majority_slots(torch.tensor([[0, 3], [1, 3], [3, 2]]), 2).tolist() == [[3, 0]]
    assert majority_slots(torch.tensor([[2, 1], [1, 2]]), 2).tolist() == [[1, 2]]
    pool = hand_pool(batchwise=True)
    selection = pool.select(torch.tensor([[2.0, 0.1], [0.1, 1.0], [1.0, 0.9]]))
    assert selection.indices.tolist() == [[3, 0]] * 3  # slot 3 three times, then 0 and 1 tie: 0


def test_l2p_places_prompt_tokens_after_cls_with_the_cls_position_and_queries_the_frozen_vit():
    experiment = Experiment.build(tiny_config(method=L2P))
    method = experiment.method.eval()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    vit = method.backbone
    with torch.no_grad():
        plain = vit(images)
        torch.testing.assert_close(method.query(images), plain)
        prompts = torch.randn(3, 4, vit.embed_dim)
        with method.tokens.inserting(prompts):
            tokens = vit.forward_features(images)
        # By hand: [CLS + pos0, prompts + pos0, patches + pos] through the blocks and the final norm.
        x = vit.patch_embed(images)
        x = torch.cat([vit.cls_token.expand(3, -1, -1) + vit.pos_embed[:, :1], prompts + vit.pos_embed[:, :1],
                       x + vit.pos_embed[:, 1:]], dim=1)
        expected = vit.norm(vit.blocks(x))
    torch.testing.assert_close(tokens, expected)
    assert tokens.shape[1] == 1 + 4 + 16


def test_an_empty_prefix_leaves_the_frozen_vit_unchanged_and_a_prefix_changes_it():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT).eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        frozen = vit(images)
        injector = PrefixInjector(vit, [0, 1])
        empty = torch.zeros(2, 0, vit.embed_dim)
        with injector.prefixes({0: Prefix(empty, empty), 1: Prefix(empty, empty)}):
            torch.testing.assert_close(vit(images), frozen)
        some = torch.randn(2, 3, vit.embed_dim)
        with injector.prefixes({1: Prefix(some, some)}):
            assert not torch.allclose(vit(images), frozen, atol=1e-4)
        injector.remove()


def test_dualprompt_trains_the_task_slot_copies_the_previous_one_and_reshapes_keys_and_values():
    experiment = Experiment.build(tiny_config(method=DUALPROMPT, train={"epochs": 1, "optimizer": "adam", "lr": 0.01,
                                                                  "weight_decay": 0.0}))  # the authors' Adam: no decay
    method = experiment.method
    first, second = experiment.scenario.tasks()[:2]
    before = method.pool.prompts.detach().clone()
    learn_task(experiment, first)
    changed = (method.pool.prompts.detach() - before).flatten(1).abs().amax(1)
    assert changed[0] > 0 and torch.all(changed[1:] == 0), "task 0 trains slot 0 only"
    method.begin_task(second)
    torch.testing.assert_close(method.pool.prompts[1], method.pool.prompts[0])
    keys, values = torch.arange(4.0)[:, None] * 10, torch.arange(4.0)[:, None] * 10 + 1  # sample b: 10b, 10b + 1
    mixed_keys, mixed_values = reshape_quirk(keys, values)
    # Layout (2, B): [k0 k1 k2 k3 v0 v1 v2 v3]; image b takes entries 2b, 2b + 1.
    assert mixed_keys.flatten().tolist() == [0.0, 20.0, 1.0, 21.0]
    assert mixed_values.flatten().tolist() == [10.0, 30.0, 11.0, 31.0]


def test_gram_schmidt_subtracts_projections_on_every_earlier_row_and_normalises():
    torch.manual_seed(0)
    fresh = gram_schmidt_rows(torch.zeros(5, 2, 3), 0, 3).reshape(5, -1)  # the first task: orthonormal rows
    torch.testing.assert_close(fresh[:3] @ fresh[:3].T, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.all(fresh[3:] == 0)
    rows = torch.zeros(6, 2, 5)
    rows[:2] = torch.randn(2, 2, 5)  # an earlier task's trained components (not orthonormal)
    out = gram_schmidt_rows(rows, 2, 4, generator=torch.Generator().manual_seed(3)).reshape(6, -1)
    generator = torch.Generator().manual_seed(3)
    candidates = [torch.randn(10, generator=generator) for _ in range(2)]
    expected = rows.reshape(6, -1).clone()
    for k in (2, 3):  # the authors' loop, one projection at a time
        u = candidates[k - 2] - sum((expected[j] @ candidates[k - 2]) / (expected[j] @ expected[j]) * expected[j]
                                    for j in range(k))
        expected[k] = u
    expected[2:4] = expected[2:4] / expected[2:4].norm(dim=1, keepdim=True)
    expected[4:] = 0
    torch.testing.assert_close(out, expected)


def test_coda_trains_only_the_current_task_components_and_tests_with_all_learned_ones():
    experiment = Experiment.build(tiny_config(method=CODA, train={"epochs": 1, "optimizer": "adam", "lr": 0.01,
                                                            "weight_decay": 0.0}))
    method = experiment.method
    first, second = experiment.scenario.tasks()[:2]
    learn_task(experiment, first)
    method.begin_task(second)
    images, targets = torch.rand(4, 3, 16, 16), torch.tensor([2, 3, 2, 3])
    method.train()
    method.training_loss(images, targets, second).loss.backward()
    gradient = method.components.grad.abs().flatten(2).amax(2)  # (layers, pool)
    assert torch.all(gradient[:, :2] == 0), "task 0's components are frozen"
    assert torch.all(gradient[:, 2:4] > 0), "task 1's components train"
    assert torch.all(gradient[:, 4:] == 0), "later tasks' components are not used yet"
    method.eval()
    with torch.no_grad():  # at test after one learned task: components 0..1 only; zeroing the rest changes nothing
        scores = method.predict(images)
        method.components[:, 2:] = 0
        torch.testing.assert_close(method.predict(images), scores)


def test_coda_cosine_schedule_equals_its_formula():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=0.01)
    scheduler = build_scheduler(optimizer, Phase("p", 5, 0.01, 0.0, 5, schedule="coda_cosine"))
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.01 * math.cos(99 * math.pi * e / (200 * 4)) for e in range(5)])


@pytest.mark.parametrize("options", [L2P, DUALPROMPT, CODA], ids=["l2p", "dualprompt", "coda_prompt"])
def test_three_tasks_through_the_loop(options, tmp_path):
    config = tiny_config(method=options, train={"epochs": 2, "optimizer": "adam", "lr": 0.002},
                         backbone=DEMO_BACKBONE, data=GLYPHS)
    summary = run_experiment(config, tmp_path / "run")
    assert len(summary.top1_curve) == 3
    assert summary.top1_curve[0] > 50.0  # 2 classes per task: the first task is learned
    assert 0.0 <= summary.a_last <= 100.0


def test_interrupted_mid_task_resumes_to_identical_results(tmp_path, monkeypatch):
    config = tiny_config(method=DUALPROMPT, train={"epochs": 2, "batch_size": 8, "checkpoint_every_epochs": 1,
                                                   "optimizer": "adam", "lr": 0.01})
    check_interrupted_run_resumes_identically(config, "task1/prompts/epoch1/batch0", tmp_path, monkeypatch)
