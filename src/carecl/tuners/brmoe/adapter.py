"""Token-wise bottleneck adapter (AdaptFormer style), its folded form, and the other small parts.

`A(x) = s ⊙ (W_up · ReLU(W_down · LN(x) + b_down) + b_up)`. The scale multiplies the up
projection's output including its bias, as AdaptFormer (which the release's parameter names
`scale`, `down_proj`, `up_proj` come from) does; a fresh adapter outputs 0 either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAYER_NORM_EPS = 1e-5


class Adapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.down_proj = nn.Linear(dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim)
        self.scale = nn.Parameter(torch.zeros(dim))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        for linear in (self.down_proj, self.up_proj):
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
            nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.scale)

    def parameter_tensors(self) -> tuple[nn.Parameter, ...]:
        """All parameters, in a fixed order (cheaper than named_parameters for hundreds of experts)."""
        return (self.norm.weight, self.norm.bias, self.down_proj.weight, self.down_proj.bias,
                self.up_proj.weight, self.up_proj.bias, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        """Dense application to every token (the sparse layer uses `fold` instead)."""
        hidden = self.dropout(F.relu(self.down_proj(self.norm(x))))
        return self.scale * self.up_proj(hidden)

    def fold(self) -> "FoldedAdapter":
        """The same map on a normalised input x̂: LN affine folded into W_down, s into W_up."""
        gamma, beta = self.norm.weight, self.norm.bias
        down = self.down_proj.weight
        return FoldedAdapter(
            down=down * gamma,
            down_bias=down @ beta + self.down_proj.bias,
            up=(self.up_proj.weight * self.scale[:, None]).t(),
            up_bias=self.up_proj.bias * self.scale,
        )


@dataclass
class FoldedAdapter:
    """A(x) = relu(x̂ · downᵀ + down_bias) · up + up_bias, with x̂ = LN(x) without affine.

    Shapes for one adapter: down (r, C), down_bias (r,), up (r, C), up_bias (C,); a stack of
    adapters adds a leading expert dimension to each.
    """

    down: Tensor
    down_bias: Tensor
    up: Tensor
    up_bias: Tensor

    @staticmethod
    def stack(adapters: list["FoldedAdapter"]) -> "FoldedAdapter":
        return FoldedAdapter(*(torch.stack(parts) for parts in zip(*(a.astuple() for a in adapters))))

    def astuple(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.down, self.down_bias, self.up, self.up_bias

    def map(self, fn) -> "FoldedAdapter":
        return FoldedAdapter(*(fn(part) for part in self.astuple()))


def normalise(x: Tensor) -> Tensor:
    """LayerNorm without affine: the part shared by every adapter reading x."""
    return F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)


def parameter_sums(experts: Sequence[Adapter]) -> list[Tensor]:
    """Σ over `experts` of each parameter (the order of `parameter_tensors`), in float64."""
    with torch.no_grad():
        sums = [p.detach().to(torch.float64, copy=True) for p in experts[0].parameter_tensors()]
        for expert in experts[1:]:
            add_parameters(sums, expert)
    return sums


def add_parameters(sums: list[Tensor], expert: Adapter) -> None:
    with torch.no_grad():
        for total, parameter in zip(sums, expert.parameter_tensors()):
            total.add_(parameter.detach().to(torch.float64))


@torch.no_grad()
def initialise_from_mean(expert: Adapter, sums: Sequence[Tensor], count: int) -> None:
    """Every parameter of `expert` := element-wise mean of that parameter over `count` experts.

    `sums` are those experts' float64 parameter sums (`parameter_sums`), kept up to date as
    experts are added, so creating an expert costs O(1 expert) however many exist.
    """
    for parameter, total in zip(expert.parameter_tensors(), sums):
        parameter.copy_(total / count)


def make_router(dim: int, n_experts: int) -> nn.Linear:
    """R_i: C -> i+1 scores, trunc-normal(std 0.02) weights and zero bias (release init)."""
    router = nn.Linear(dim, n_experts)
    nn.init.trunc_normal_(router.weight, std=0.02)
    nn.init.zeros_(router.bias)
    return router


def make_perceptron(dim: int, n_classes: int) -> nn.Sequential:
    """H_i = LayerNorm(C) then Linear(C -> n_i); indices 0/1 mirror the release's `latent_head.i.0/1`."""
    perceptron = nn.Sequential(nn.LayerNorm(dim, eps=LAYER_NORM_EPS), nn.Linear(dim, n_classes))
    # Release quirk: the LayerNorm's *gain* is drawn trunc-normal(std 0.02), not 1 (bias 0); Linear keeps defaults.
    nn.init.trunc_normal_(perceptron[0].weight, std=0.02)
    nn.init.zeros_(perceptron[0].bias)
    return perceptron
