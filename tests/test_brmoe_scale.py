"""BR-MoE at 300 tasks: per-forward work and memory do not grow with tokens x experts.

No timings: counts are exact and machine independent. Every aten op run by a forward is
recorded; the op count must not depend on the number of tasks (no per-task loops), no
freshly allocated tensor may exceed the router-gather block (B·M, E, C) (a dense
experts x tokens tensor would be N·r/(M·C) times larger), the matmul FLOPs added by 297
extra tasks must be those of CLS-only routing, and at most B·M·K experts run on all tokens.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from carecl.tuners.brmoe import BRMoEConfig, BRMoEViT

DIM, DEPTH, IMAGE, PATCH = 32, 2, 32, 4
TOKENS = (IMAGE // PATCH) ** 2 + 1
BATCH, CLASSES = 4, 2
CONFIG = BRMoEConfig()  # the published sizes: shared 64, experts 16, K=3, M=2


pytestmark = pytest.mark.usefixtures("single_thread")


class OpRecorder(TorchDispatchMode):
    """Counts aten ops and the largest tensor any of them freshly allocates (views excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.n_ops = 0
        self.largest = (0, None, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.n_ops += 1
        inputs = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and _storage(tensor) not in inputs and tensor.numel() > self.largest[0]:
                self.largest = (tensor.numel(), tuple(tensor.shape), str(func))
        return out


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def build(n_tasks: int) -> BRMoEViT:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=IMAGE,
                            patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=2)
    model = BRMoEViT(vit, CONFIG)
    for _ in range(n_tasks):
        model.add_task(CLASSES)
    with torch.no_grad():  # non-zero adapter scales, so routing sees distinct expert outputs
        for layer in model.layers:
            for expert in [layer.shared, *layer.experts]:
                expert.scale.normal_()
    model.invalidate_caches()
    return model


def images() -> torch.Tensor:
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))


def record(model: BRMoEViT, task: int | None = None, train: bool = False) -> tuple[OpRecorder, int]:
    model.train(train)
    x = images()
    with torch.set_grad_enabled(train):
        model(x, task=task)  # warm-up: builds the frozen caches
    builds = [layer.bank_builds for layer in model.layers]
    recorder, flops = OpRecorder(), FlopCounterMode(display=False)
    with torch.set_grad_enabled(train), flops, recorder:
        output = model(x, task=task)
        if train:
            (output.features.sum() + sum(l.sum() for l in output.perceptron_logits)).backward()
    assert [layer.bank_builds for layer in model.layers] == builds, "frozen caches rebuilt on a forward"
    return recorder, flops.get_total_flops()


@pytest.fixture(scope="module")
def models() -> dict[int, BRMoEViT]:
    return {n: build(n) for n in (3, 300)}


def test_task_free_forward_is_flat_in_the_number_of_tasks(models):
    small, small_flops = record(models[3])
    large, large_flops = record(models[300])
    assert large.n_ops == small.n_ops, "per-task Python loops in the forward"

    n_experts = 300
    router_block = BATCH * CONFIG.topk_routers * n_experts * DIM
    dense_block = BATCH * n_experts * TOKENS * CONFIG.expert_dim
    assert router_block * 10 < dense_block  # the bound below can catch an experts x tokens tensor
    assert large.largest[0] <= router_block, large.largest

    per_expert_cls_flops = 4 * DIM * CONFIG.expert_dim + 2 * DIM * CLASSES + 2 * CONFIG.topk_routers * DIM
    cls_only = DEPTH * BATCH * (n_experts - 3) * per_expert_cls_flops
    assert large_flops - small_flops <= 1.2 * cls_only, (large_flops, small_flops, cls_only)

    for layer in models[300].layers:
        assert 0 < layer.last_token_expert_runs <= BATCH * CONFIG.topk_routers * CONFIG.topk_experts


def test_training_step_is_flat_in_the_number_of_tasks(models):
    small, _ = record(models[3], task=2, train=True)
    large, _ = record(models[300], task=299, train=True)
    assert large.n_ops == small.n_ops
    assert large.largest[0] <= BATCH * CONFIG.topk_routers * 300 * DIM, large.largest


def test_task_free_forward_allocates_nothing_of_width_c_per_task(models):
    """Routing reads r-wide tables: no freshly allocated tensor holds a C-wide row per task and sample."""
    large, _ = record(models[300])
    n_experts, rank = 300, CONFIG.expert_dim
    slots = CONFIG.topk_routers * CONFIG.topk_experts
    routing = BATCH * CONFIG.topk_routers * n_experts * rank  # the selected routers' r-wide tables
    dispatch = BATCH * TOKENS * (CONFIG.adapter_dim + slots * rank)  # shared + selected experts on all tokens
    assert large.largest[0] <= max(routing, dispatch), large.largest


def test_folded_tables_hold_no_copy_of_the_routers():
    """The cached tables keep r/C of the router weights, not a second copy (420 M parameters at 300 ViT-B tasks)."""
    config = BRMoEConfig(adapter_dim=8, expert_dim=2)
    model = BRMoEViT(build(0).vit, config)
    for _ in range(300):
        model.add_task(CLASSES)
    with torch.no_grad():
        model(images())
    for layer in model.layers:
        router_bytes = sum(p.numel() * p.element_size() for p in layer.routers.parameters())
        expert_bytes = sum(p.numel() * p.element_size() for p in layer.experts.parameters())
        # Router tables: (r + 1) / (C + 1) of the routers; folded experts: about the experts' own size.
        assert layer.frozen_table_bytes() < router_bytes * (config.expert_dim + 1) / (DIM + 1) * 1.3 + expert_bytes * 1.3


def test_growing_a_task_does_not_revisit_earlier_tasks():
    """add_task, and the forward after it, do the same work after 3 tasks as after 300.

    add_task allocates nothing larger than the new router (the mean of earlier experts comes from
    running sums, not a stack of them); the next forward appends to the tables instead of rebuilding.
    """
    small, large = build(3), build(300)
    growth, forwards = [], []
    for model in (small, large):
        model.add_task(CLASSES)  # after invalidate_caches the expert sums are rebuilt once, here
        with torch.no_grad():
            model(images())
        builds = [layer.bank_builds for layer in model.layers]
        growth.append(OpRecorder())
        with growth[-1]:
            model.add_task(CLASSES)
        forwards.append(OpRecorder())
        with forwards[-1], torch.no_grad():
            model(images())
        assert [layer.bank_builds for layer in model.layers] == builds, "tables rebuilt instead of extended"
    assert growth[0].n_ops == growth[1].n_ops
    assert growth[1].largest[0] <= max((large.n_tasks) * DIM, CONFIG.expert_dim * DIM), growth[1].largest
    # Equal but for the amortised reallocations of the growing tables (a few ops per table, either size).
    assert abs(forwards[0].n_ops - forwards[1].n_ops) <= 100, (forwards[0].n_ops, forwards[1].n_ops)
