"""The dense BR-MoE formulation, batched: every expert on every token, as the release computes it.

Per block, all E expert outputs o_i = E_i(z_a) are formed as one (E, B, N, C) tensor (two matmuls:
all experts' bottlenecks at once, then one batched up-projection), routing reads their CLS rows,
every router scores all experts (padded (E, E, C) router weights), the non-top-K scores are set to
-100 and softmaxed over all experts (the release's masking), and the mixture is one contraction
over the expert axis. No per-sample Python loops: this is the fair dense baseline for the sparse
layer, whose cost does not grow with tokens x experts. The parameters are stacked once when the
`DenseBRMoE` is built (not timed), from a BRMoEViT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from carecl.tuners.brmoe import BRMoEViT
from carecl.tuners.brmoe.adapter import LAYER_NORM_EPS

MASKED_SCORE = -100.0  # the release's fill value for experts outside a router's top-K


@dataclass
class DenseLayer:
    shared: tuple[Tensor, Tensor, Tensor, Tensor]  # down (r, C), down_bias, up (r, C), up_bias: LN affine / scale folded
    down: Tensor  # (E·r, C)
    down_bias: Tensor  # (E·r,)
    up: Tensor  # (E, r, C)
    up_bias: Tensor  # (E, C)
    perceptron_norm: tuple[Tensor, Tensor]  # (E, C) LayerNorm weight and bias of each perceptron
    perceptron_groups: list[tuple[int, int, Tensor, Tensor]]  # (start, stop, weight (k, n, C), bias (k, n))
    router_weight: Tensor  # (E, E, C), zero rows for experts newer than the router
    router_bias: Tensor  # (E, E), -inf for those experts


def _fold(adapter) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    folded = adapter.fold()
    return folded.down, folded.down_bias, folded.up, folded.up_bias


@torch.no_grad()
def dense_layer(layer) -> DenseLayer:
    experts = [_fold(expert) for expert in layer.experts]
    n, dim = len(experts), layer.dim
    rank = experts[0][0].shape[0]
    router_weight = experts[0][0].new_zeros(n, n, dim)
    router_bias = experts[0][0].new_full((n, n), float("-inf"))
    for index, router in enumerate(layer.routers):
        router_weight[index, : index + 1] = router.weight
        router_bias[index, : index + 1] = router.bias
    groups, start = [], 0
    sizes = [p[1].out_features for p in layer.perceptrons]
    for index in range(1, n + 1):
        if index == n or sizes[index] != sizes[start]:
            chunk = layer.perceptrons[start:index]
            groups.append((start, index, torch.stack([p[1].weight for p in chunk]), torch.stack([p[1].bias for p in chunk])))
            start = index
    return DenseLayer(
        shared=_fold(layer.shared),
        down=torch.stack([e[0] for e in experts]).reshape(n * rank, dim),
        down_bias=torch.stack([e[1] for e in experts]).reshape(n * rank),
        up=torch.stack([e[2] for e in experts]),
        up_bias=torch.stack([e[3] for e in experts]),
        perceptron_norm=(torch.stack([p[0].weight for p in layer.perceptrons]),
                         torch.stack([p[0].bias for p in layer.perceptrons])),
        perceptron_groups=groups,
        router_weight=router_weight,
        router_bias=router_bias,
    )


def _entropy(logits: Tensor) -> Tensor:
    p = logits.softmax(-1)
    return -(p * torch.log(p + 1e-10)).sum(-1)


def dense_brmoe(params: DenseLayer, z_a: Tensor, topk_experts: int, topk_routers: int) -> Tensor:
    """Task-free BRMoE(z_a) (B, N, C), all experts on all tokens."""
    batch, tokens, dim = z_a.shape
    n, rank = params.up.shape[:2]
    x = F.layer_norm(z_a, (dim,), eps=LAYER_NORM_EPS)
    shared_down, shared_down_bias, shared_up, shared_up_bias = params.shared
    shared = F.relu(x @ shared_down.T + shared_down_bias) @ shared_up + shared_up_bias
    hidden = F.relu(F.linear(x.reshape(batch * tokens, dim), params.down, params.down_bias))
    hidden = hidden.view(batch * tokens, n, rank).transpose(0, 1)  # (E, B·N, r)
    outputs = torch.baddbmm(params.up_bias[:, None, :], hidden, params.up).view(n, batch, tokens, dim)
    if n == 1:
        return shared + outputs[0]
    cls = outputs[:, :, 0]  # (E, B, C)
    normed = F.layer_norm(cls, (dim,), eps=LAYER_NORM_EPS) * params.perceptron_norm[0][:, None] + params.perceptron_norm[1][:, None]
    entropy = torch.cat([_entropy(torch.baddbmm(b[:, None, :], normed[s:e], w.transpose(1, 2)))
                         for s, e, w, b in params.perceptron_groups])  # (E, B)
    routers = entropy.t().topk(min(topk_routers, n), dim=1, largest=False).indices  # (B, M)
    scores = torch.einsum("tbc,tec->bte", cls, params.router_weight) + params.router_bias  # (B, E routers, E experts)
    scores = torch.gather(scores, 1, routers[..., None].expand(-1, -1, n))  # (B, M, E)
    if topk_experts < n:
        kept = scores.topk(topk_experts, dim=-1).indices
        scores = torch.full_like(scores, MASKED_SCORE).scatter(-1, kept, scores.gather(-1, kept))
    weights = scores.softmax(-1).sum(1)  # (B, E): a sum over the selected routers, as the release
    return shared + torch.einsum("be,ebnc->bnc", weights, outputs)


class DenseBRMoE:
    """Task-free forward of a BRMoEViT's parameters with the dense formulation (eval mode)."""

    def __init__(self, model: BRMoEViT) -> None:
        self.vit = model.vit
        self.config = model.config
        self.layers = [dense_layer(layer) for layer in model.layers]

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for block, params in zip(vit.blocks, self.layers):
            z_a = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
            mlp = block.drop_path2(block.ls2(block.mlp(block.norm2(z_a))))
            x = z_a + mlp + dense_brmoe(params, z_a, self.config.topk_experts, self.config.topk_routers)
        return vit.norm(x)[:, 0]
