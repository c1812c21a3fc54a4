"""MIN's mixture of beneficial noise (Mixture of Noise, NeurIPS 2025): after every block of the ViT,

    h' = h + mlp(h) + (Σ_i w_i (μ_i(h D) + σ_i(h D))) U,

with D (width x hidden) and U (hidden x width) fixed random projections, `mlp` a width x width linear map
(zero at the start), and one pair of hidden x hidden linear maps (μ_i, σ_i, zero at the start) per task,
mixed by weights w_i that the method sets. A fresh injection changes nothing.

Finished tasks' pairs are kept as one summed map each (only μ_i + σ_i is ever used once they stop
training), and all of them enter a forward as one mixed matrix, so a forward costs the same whatever the
number of tasks. The current task's pair stays two trainable maps, as the authors train it.

`TunedLayerNorms` computes the blocks' LayerNorms (and the final one) with trainable copies of their affine
weights, which MIN tunes with the noise on the first task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.config import require
from carecl.tuners.base import Injector


@dataclass
class NoiseConfig:
    # Width of the noise's projected space (the authors' `hidden_dim`, 192 in every config).
    hidden: int = 192

    def validate(self) -> None:
        require(self.hidden > 0, "hidden", f"must be positive, got {self.hidden}")


def zero_linear(width: int) -> nn.Linear:
    layer = nn.Linear(width, width)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def fixed_projection(rows: int, columns: int, generator: torch.Generator) -> Tensor:
    """Uniform(±1/√columns): torch's default Linear init applied, as the authors do, to a (rows, columns) tensor
    (its fan-in is read from the second dimension)."""
    bound = 1.0 / math.sqrt(columns)
    return torch.empty(rows, columns).uniform_(-bound, bound, generator=generator)


class NoiseLayer(nn.Module):
    """The noise after one block: `mlp`, the projections, the finished tasks' summed maps and the current pair."""

    def __init__(self, width: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.mlp = zero_linear(width)
        self.register_buffer("down", fixed_projection(width, hidden, generator))
        self.register_buffer("up", fixed_projection(hidden, width, generator))
        self.register_buffer("finished_weight", torch.zeros(0, hidden, hidden))
        self.register_buffer("finished_bias", torch.zeros(0, hidden))
        self.mean = nn.ModuleList()  # μ of the current task (one entry once a task has begun)
        self.scale = nn.ModuleList()  # σ of the current task

    @property
    def hidden(self) -> int:
        return self.down.shape[1]

    def add_task(self) -> None:
        """Sum the current pair into the finished maps, then start a zero pair for the next task."""
        if len(self.mean):
            mean, scale = self.mean[0], self.scale[0]
            weight = (mean.weight + scale.weight).detach()[None]
            bias = (mean.bias + scale.bias).detach()[None]
            self.finished_weight = torch.cat([self.finished_weight, weight])
            self.finished_bias = torch.cat([self.finished_bias, bias])
        reference = self.down
        self.mean = nn.ModuleList([zero_linear(self.hidden).to(reference.device, reference.dtype)])
        self.scale = nn.ModuleList([zero_linear(self.hidden).to(reference.device, reference.dtype)])

    def forward(self, hidden_states: Tensor, mixture: Tensor) -> Tensor:
        projected = hidden_states @ self.down.to(hidden_states.dtype)
        noise = torch.zeros_like(projected)
        finished = self.finished_weight.shape[0]
        if finished:
            weights = mixture[:finished].to(self.finished_weight)
            mixed = torch.einsum("t,tij->ij", weights, self.finished_weight)
            noise = noise + F.linear(projected, mixed.to(projected.dtype), (weights @ self.finished_bias).to(projected.dtype))
        if len(self.mean):
            current = mixture[finished].to(projected.dtype)
            noise = noise + (self.mean[0](projected) + self.scale[0](projected)) * current
        return hidden_states + self.mlp(hidden_states) + noise @ self.up.to(hidden_states.dtype)


class MixtureOfNoiseInjector(Injector):
    """A NoiseLayer after every block (`layers[L]`), mixed by `mixture` (one weight per task begun)."""

    def __init__(self, vit: nn.Module, config: NoiseConfig, generator: torch.Generator) -> None:
        super().__init__(vit)
        config.validate()
        reference = next(vit.parameters())
        width = self.layout.width
        self.layers = nn.ModuleList(NoiseLayer(width, config.hidden, generator) for _ in self.blocks).to(reference.device)
        self.register_buffer("mixture", torch.zeros(0, device=reference.device))
        for index, block in enumerate(self.blocks):
            self.add_hook(block.register_forward_hook(_AddNoise(self, index)))

    def add_task(self) -> None:
        """A zero pair per block for a new task, mixed with weight 0 until the method sets the weights."""
        for layer in self.layers:
            layer.add_task()
        self.mixture = torch.cat([self.mixture, self.mixture.new_zeros(1)])

    def current_pairs(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for pair in (layer.mean, layer.scale) for p in pair.parameters()]

    def projections(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.mlp.parameters()]


class _AddNoise:
    """A forward hook, as an object so a deep copy of the injector gets hooks that call the copy."""

    def __init__(self, injector: MixtureOfNoiseInjector, index: int) -> None:
        self.injector, self.index = injector, index

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not self.injector.active:
            return None
        return self.injector.layers[self.index](output, self.injector.mixture)


class LayerNormCopy(nn.Module):
    """A trainable copy of a LayerNorm's affine weights."""

    def __init__(self, original: nn.LayerNorm) -> None:
        super().__init__()
        self.weight = nn.Parameter(original.weight.detach().clone())
        self.bias = nn.Parameter(original.bias.detach().clone())


class TunedLayerNorms(Injector):
    """Every block's norm1 and norm2 and the ViT's final norms (`norm`, `fc_norm` when they are LayerNorms) computed
    with trainable copies of their affine weights (`norms`): a forward hook recomputes the norm's output with the
    copy, so the ViT's own modules are never touched and the copies start as exactly the original."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__(vit)
        self.norms = nn.ModuleDict()
        targets = [(getattr(block, name), f"blocks_{index}_{name}") for index, block in enumerate(self.blocks)
                   for name in ("norm1", "norm2")]
        targets += [(getattr(vit, name, None), name) for name in ("norm", "fc_norm")]
        for module, key in targets:
            if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                self.norms[key] = LayerNormCopy(module)
                self.add_hook(module.register_forward_hook(_Renormalise(self, key)))


class _Renormalise:
    def __init__(self, injector: TunedLayerNorms, key: str) -> None:
        self.injector, self.key = injector, key

    def __call__(self, module: nn.LayerNorm, args: tuple, output: Tensor) -> Tensor | None:
        if not self.injector.active:
            return None
        copy = self.injector.norms[self.key]
        return F.layer_norm(args[0], module.normalized_shape, copy.weight.to(output.dtype), copy.bias.to(output.dtype),
                            module.eps)
