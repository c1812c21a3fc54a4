"""BR-MoE: the sparse layer equals the dense equations, growth/freezing/anchoring/state rules."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import brmoe_oracle as oracle
from brmoe_oracle import dense_forward
from carecl.tuners.brmoe import BRMoEConfig, BRMoEViT
from carecl.config import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def make_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)


def make_model(task_sizes: list[int], seed: int = 0, **options) -> BRMoEViT:
    model = BRMoEViT(make_vit(seed), BRMoEConfig(adapter_dim=8, expert_dim=4, **options))
    for size in task_sizes:
        model.add_task(size)
    return model


@torch.no_grad()
def randomise(model: BRMoEViT, seed: int = 1) -> BRMoEViT:
    """Fresh adapters output 0 (zero scale): give every BR-MoE parameter a random non-zero value."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.layers.parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.7)
    model.invalidate_caches()
    return model


def images(batch: int = 3, seed: int = 2, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_matches_dense(model: BRMoEViT, x: torch.Tensor, task: int | None, tolerance: float = 1e-5) -> None:
    with torch.no_grad():
        sparse = model(x, task=task)
        features, logits = dense_forward(model, x, task=task)
    assert relative_error(sparse.features, features) < tolerance, f"task={task}"
    if task is None:
        assert sparse.perceptron_logits is None
    else:
        assert len(sparse.perceptron_logits) == len(logits)
        for mine, reference in zip(sparse.perceptron_logits, logits):
            assert mine.shape == (x.shape[0], model.task_sizes[task])
            assert relative_error(mine, reference) < tolerance, f"task={task}"


CASES = {
    "1 task": ([3], {}),
    "2 tasks": ([3, 3], {}),
    "5 tasks": ([2] * 5, {}),
    "40 tasks": ([2] * 40, {}),
    "unequal first task": ([5, 2, 2, 2, 3], {}),
    "K >= #experts": ([2] * 4, {"topk_experts": 6}),
    "M >= #tasks": ([2] * 4, {"topk_routers": 5}),
    "K = M = 1": ([2] * 5, {"topk_experts": 1, "topk_routers": 1}),
    "M = 3, K = 2": ([2] * 6, {"topk_experts": 2, "topk_routers": 3}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sparse_forward_equals_dense_reference(case):
    # float64: routing is discontinuous, so float32 rounding near a tie could flip a choice.
    sizes, options = CASES[case]
    model = randomise(make_model(sizes, **options).double()).eval()
    x = images()
    assert_matches_dense(model, x, task=None)
    for task in range(len(sizes)):
        assert_matches_dense(model, x, task=task)


def test_randomised_models_route_samples_differently():
    """The comparisons above exercise router selection: samples pick different router pairs."""
    model = randomise(make_model([2] * 8).double()).eval()
    captured = []
    model.vit.blocks[0].norm2.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        model(images(batch=6))
        layer = model.layers[0]
        cls = captured[0][:, 0]
        cls_outputs = [oracle.adapter(layer.experts[i], cls) for i in range(8)]
        entropies = torch.stack([oracle.entropy(oracle.perceptron(layer.perceptrons[i], c))
                                 for i, c in enumerate(cls_outputs)], dim=1)
    chosen = {tuple(sorted(row.argsort()[:2].tolist())) for row in entropies}
    assert len(chosen) > 1
    assert layer.last_token_expert_runs == 6 * 2 * 3


def test_float32_matches_dense_reference():
    model = randomise(make_model([2] * 6)).eval()
    x = images(dtype=torch.float32)
    assert_matches_dense(model, x, task=None, tolerance=1e-4)
    assert_matches_dense(model, x, task=3, tolerance=1e-4)


def test_moving_dtype_rebuilds_the_frozen_cache():
    model = randomise(make_model([2] * 4)).eval()
    with torch.no_grad():
        model(images(dtype=torch.float32))
    model.double()
    assert_matches_dense(model, images(), task=None)


def test_no_grad_forward_follows_updates_of_the_trainable_parts():
    """No-grad forwards read the newest task's parts from a cached slot: it must track optimiser steps."""
    model = randomise(make_model([2, 2, 2]).double()).eval()
    x = images()
    with torch.no_grad():
        model(x)  # caches the newest slot and the shared fold
        for module in (model.layers[0].experts[-1], model.layers[1].routers[-1],
                       model.layers[0].perceptrons[-1], model.layers[1].shared):
            for p in module.parameters():
                p.add_(torch.randn_like(p))  # what an optimiser step does: in place
    for task in (None, 2):
        assert_matches_dense(model, x, task=task)
        with torch.no_grad():
            cached = model(x, task=task).features
        live = model(x, task=task).features  # grad enabled: the newest parts run live
        assert relative_error(live.detach(), cached) < 1e-10


def test_training_after_an_inference_mode_forward():
    model = randomise(make_model([2, 2])).eval()
    with torch.inference_mode():
        model(images(dtype=torch.float32))
    model.train()
    output = model(images(dtype=torch.float32), task=1)
    (output.features.sum() + sum(l.sum() for l in output.perceptron_logits)).backward()
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_gradients_equal_dense_reference_and_reach_only_trainable_parts():
    model = randomise(make_model([2, 3, 2, 2]).double()).eval()  # eval: no dropout, no anchoring
    x = images()

    def loss_and_grads(forward):
        model.zero_grad(set_to_none=True)
        features, logits = forward()
        loss = features.pow(2).sum() + sum(l.pow(2).sum() for l in logits)
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    def sparse():
        output = model(x, task=3)
        return output.features, output.perceptron_logits

    mine = loss_and_grads(sparse)
    reference = loss_and_grads(lambda: dense_forward(model, x, task=3))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(mine) == trainable
    for name, grad in reference.items():
        assert relative_error(mine[name], grad) < 1e-6, name
    assert all(mine[f"layers.{i}.routers.3.weight"].abs().sum() > 0 for i in range(2))


def test_new_expert_is_the_mean_of_all_but_the_most_recent():
    model = randomise(make_model([2, 2, 2]))
    model.add_task(2)  # expert 3 created with m = 3 experts existing
    for layer in model.layers:
        old = [dict(layer.experts[i].named_parameters()) for i in range(3)]
        for name, parameter in layer.experts[3].named_parameters():
            expected = (old[0][name] + old[1][name]) / 2
            torch.testing.assert_close(parameter, expected)
            assert not torch.allclose(parameter, (old[0][name] + old[1][name] + old[2][name]) / 3)


def test_second_expert_is_default_initialised_third_copies_the_first():
    model = make_model([2])
    randomise(model)
    model.add_task(2)  # m = 1: default init
    model.add_task(2)  # m = 2: mean over expert 0 only
    for layer in model.layers:
        second = layer.experts[1]
        assert torch.count_nonzero(second.scale) == 0
        assert torch.count_nonzero(second.down_proj.bias) == 0 and torch.count_nonzero(second.up_proj.bias) == 0
        assert torch.equal(second.norm.weight, torch.ones_like(second.norm.weight))
        assert second.down_proj.weight.abs().sum() > 0
        first = dict(layer.experts[0].named_parameters())
        for name, parameter in layer.experts[2].named_parameters():
            torch.testing.assert_close(parameter, first[name], msg=name)


def test_router_and_perceptron_shapes_and_init():
    model = make_model([5, 2, 2])
    layer = model.layers[1]
    assert [tuple(r.weight.shape) for r in layer.routers] == [(1, 32), (2, 32), (3, 32)]
    assert all(torch.count_nonzero(r.bias) == 0 for r in layer.routers)
    assert layer.routers[2].weight.std() < 0.05
    assert [p[1].out_features for p in layer.perceptrons] == [5, 2, 2]
    # Release init: perceptron LayerNorm gain trunc-normal(0.02) (not PyTorch's ones), bias zero.
    gains = torch.cat([p[0].weight for p in layer.perceptrons])
    assert gains.abs().max() < 0.2 and 0.01 < gains.std() < 0.03
    assert all(torch.count_nonzero(p[0].bias) == 0 for p in layer.perceptrons)
    assert model.n_tasks == 3 and model.task_sizes == [5, 2, 2] and model.embed_dim == 32


def test_only_current_task_parts_and_shared_adapters_are_trainable():
    model = make_model([2, 2, 2])
    assert not any(p.requires_grad for p in model.vit.parameters())
    for layer in model.layers:
        assert all(p.requires_grad for p in layer.shared.parameters())
        for parts in (layer.experts, layer.routers, layer.perceptrons):
            assert not any(p.requires_grad for p in parts[0].parameters())
            assert not any(p.requires_grad for p in parts[1].parameters())
            assert all(p.requires_grad for p in parts[2].parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(model.trainable_parameters()) == len(trainable)


def _shared_state(model: BRMoEViT) -> list[torch.Tensor]:
    return [p.detach().clone() for layer in model.layers for p in layer.shared.parameters()]


def test_training_forward_pulls_shared_adapters_towards_the_anchor_once_per_block():
    momentum = 0.6
    model = randomise(make_model([2, 2], anchor_momentum=momentum))
    model.set_anchor()
    anchor = _shared_state(model)
    with torch.no_grad():
        for layer in model.layers:
            for p in layer.shared.parameters():
                p.add_(torch.randn_like(p))
    before = _shared_state(model)

    model.eval()
    with torch.no_grad():
        model(images(dtype=torch.float32), task=1)
    assert all(torch.equal(a, b) for a, b in zip(_shared_state(model), before)), "eval must not blend"

    model.train()
    model(images(dtype=torch.float32), task=1)
    for after, a, b in zip(_shared_state(model), anchor, before):
        torch.testing.assert_close(after, momentum * a + (1 - momentum) * b)

    model.clear_anchor()
    unchanged = _shared_state(model)
    model(images(dtype=torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(_shared_state(model), unchanged))


def test_state_dict_round_trip_gives_identical_outputs():
    sizes = [3, 2, 2, 2]
    source = randomise(make_model(sizes)).eval()
    x = images(dtype=torch.float32)
    with torch.no_grad():
        expected = [source(x, task=t).features for t in (None, 0, 2, 3)]
    target = make_model(sizes, seed=5).eval()
    with torch.no_grad():
        target(x)  # builds the frozen cache from the old weights: loading must invalidate it
    parent = nn.ModuleDict({"model": target})  # loading through a parent module, as learners do
    parent.load_state_dict({f"model.{k}": v for k, v in source.state_dict().items()})
    with torch.no_grad():
        actual = [target(x, task=t).features for t in (None, 0, 2, 3)]
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


def test_state_dict_addresses_per_task_pieces_by_index():
    state = make_model([3, 2, 2]).state_dict()
    assert state["layers.1.routers.2.weight"].shape == (3, 32)
    assert state["layers.0.experts.1.down_proj.weight"].shape == (4, 32)
    assert state["layers.0.perceptrons.0.1.weight"].shape == (3, 32)
    assert state["layers.0.perceptrons.2.0.weight"].shape == (32,)
    assert state["layers.1.shared.scale"].shape == (32,)
    assert not any("anchor" in key for key in state)


def test_backbone_stays_an_unmodified_timm_vit():
    vit = make_vit()
    pristine = copy.deepcopy(vit)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    model = BRMoEViT(vit, BRMoEConfig(adapter_dim=8, expert_dim=4))
    model.add_task(2)
    model.add_task(2)
    randomise(model).train()
    model.set_anchor()
    model(images(dtype=torch.float32), task=1).features.sum().backward()
    after = vit.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    x = images(dtype=torch.float32)
    with torch.no_grad():
        # Outside BRMoEViT.forward the hooks are inert; unload removes them.
        assert torch.equal(vit.eval().forward_features(x), pristine.eval().forward_features(x))
        plain = model.unload()
        assert plain is vit and not plain.blocks[0]._forward_hooks
        assert torch.equal(plain.forward_features(x), pristine.forward_features(x))


def test_deep_copy_is_an_independent_model():
    model = randomise(make_model([2, 2, 2])).eval()
    x = images(dtype=torch.float32)
    with torch.no_grad():
        expected = model(x).features
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x).features, expected)
        for p in twin.layers.parameters():
            p.mul_(2)
        twin.invalidate_caches()
        assert not torch.allclose(twin(x).features, expected)
        assert torch.equal(model(x).features, expected)


def test_clear_errors():
    model = make_model([])
    with pytest.raises(RuntimeError, match="add_task"):
        model(images(dtype=torch.float32))
    model.add_task(2)
    with pytest.raises(ValueError, match="task"):
        model(images(dtype=torch.float32), task=1)
    with pytest.raises(ValueError, match="n_classes"):
        model.add_task(0)
    with pytest.raises(ConfigError, match="topk_experts"):
        BRMoEViT(make_vit(), BRMoEConfig(topk_experts=0))
    with pytest.raises(TypeError, match="VisionTransformer"):
        BRMoEViT(nn.Linear(2, 2), BRMoEConfig())


def test_routing_trace_records_the_decisions_of_each_block():
    model = randomise(make_model([3, 2, 2, 2], topk_routers=2, topk_experts=2)).double().eval()
    x = images()
    for layer in model.layers:
        layer.routing_trace = []
    with torch.no_grad():
        model(x)
    vit, layer = model.vit, model.layers[0]
    z = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    z_a = z + vit.blocks[0].attn(vit.blocks[0].norm1(z))
    cls = [oracle.adapter(expert, z_a)[:, 0] for expert in layer.experts]
    expected = torch.stack([oracle.entropy(oracle.perceptron(layer.perceptrons[i], cls[i])) for i in range(4)], 1)
    record = layer.routing_trace[0]
    assert all(len(other.routing_trace) == 1 for other in model.layers)
    torch.testing.assert_close(-record.confidence, expected)
    assert record.routers.tolist() == expected.argsort(dim=1)[:, :2].tolist()
    assert record.experts.shape == (3, 2, 2) and record.weights.sum(-1).allclose(torch.ones(3, 2, dtype=torch.float64))
    # A router created at task i scores experts 0..i only (padding slots carry weight 0).
    used = record.weights > 0
    assert (record.experts[used] <= record.routers[..., None].expand_as(used)[used]).all()
