"""Parallel bottleneck adapters (AdaptFormer): z' = z_a + mlp(norm2(z_a)) + s · up(ReLU(down(LN?(z_a)))).

Initialised as AdaptFormer and PILOT's APER do ("lora" init): kaiming-uniform down projection,
zero up projection and biases, so a fresh adapter adds exactly nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.config import require
from carecl.tuners.base import Injector, ParallelBranch


@dataclass
class AdapterConfig:
    bottleneck: int = 64
    # Fixed output scale s (AdaptFormer / APER: 0.1); null = a learnable per-channel scale starting at 1.
    scale: float | None = 0.1
    # LayerNorm before the down projection (APER: none).
    layer_norm: bool = False
    dropout: float = 0.1

    def validate(self) -> None:
        require(self.bottleneck > 0, "bottleneck", f"must be positive, got {self.bottleneck}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")


# The flat method keys an `adapter:` section replaced (MethodConfig.moved_keys).
FLAT_ADAPTER_KEYS = {"adapter_bottleneck": "adapter.bottleneck", "adapter_scale": "adapter.scale",
                     "adapter_dropout": "adapter.dropout"}


class BottleneckAdapter(nn.Module):
    def __init__(self, dim: int, config: AdapterConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if config.layer_norm else nn.Identity()
        self.down = nn.Linear(dim, config.bottleneck)
        self.up = nn.Linear(config.bottleneck, dim)
        self.dropout = nn.Dropout(config.dropout)
        self.fixed_scale = config.scale
        self.scale = nn.Parameter(torch.ones(dim)) if config.scale is None else None
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, x: Tensor) -> Tensor:
        out = self.up(self.dropout(F.relu(self.down(self.norm(x)))))
        return out * (self.scale if self.scale is not None else self.fixed_scale)


class ParallelAdapterInjector(Injector):
    """One adapter per block (`adapters[L]`), parallel to the block's MLP (a timm ViT or a CLIP tower)."""

    wraps_clip_towers = True

    def __init__(self, vit: nn.Module, config: AdapterConfig) -> None:
        super().__init__(vit)
        config.validate()
        reference = next(vit.parameters())
        self.adapters = nn.ModuleList(BottleneckAdapter(self.layout.width, config) for _ in self.blocks).to(
            reference.device, reference.dtype)
        ParallelBranch(self, self._branch)

    def _branch(self, index: int, block_input: Tensor) -> Tensor:
        return self.adapters[index](block_input)
