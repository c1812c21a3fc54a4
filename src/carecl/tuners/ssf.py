"""SSF (Lian et al., NeurIPS 2022): scale and shift the output of the ViT's linear and norm layers,
y = γ ⊙ f(x) + β, with γ = 1 and β = 0 at the start, so a fresh injection changes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from carecl.config import require
from carecl.tuners.base import Injector

# The layers SSF follows in every block (attention qkv/proj, MLP fc1/fc2, both norms) and around them.
BLOCK_TARGETS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
MODEL_TARGETS = ("patch_embed.proj", "norm")


@dataclass
class SSFConfig:
    block_targets: list[str] = field(default_factory=lambda: list(BLOCK_TARGETS))
    model_targets: list[str] = field(default_factory=lambda: list(MODEL_TARGETS))
    # γ ~ N(1, std), β ~ N(0, std) at the start; 0 = exactly the identity (SSF's paper and PILOT use 0.02).
    init_std: float = 0.0

    def validate(self) -> None:
        require(self.init_std >= 0, "init_std", f"must be >= 0, got {self.init_std}")


class ScaleShift(nn.Module):
    def __init__(self, channels: int, channel_dim: int, init_std: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        if init_std > 0:
            nn.init.normal_(self.scale, mean=1.0, std=init_std)
            nn.init.normal_(self.shift, std=init_std)
        self.channel_dim = channel_dim

    def forward(self, x: Tensor) -> Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return x * self.scale.view(shape) + self.shift.view(shape)


class SSFInjector(Injector):
    """A ScaleShift after each target module: `factors["blocks.3.attn.qkv"]` etc. (dots become underscores)."""

    def __init__(self, vit: VisionTransformer, config: SSFConfig) -> None:
        super().__init__(vit)
        self.factors = nn.ModuleDict()
        targets = [name for name in config.model_targets] + [
            f"blocks.{index}.{target}" for index in range(len(vit.blocks)) for target in config.block_targets]
        modules = dict(vit.named_modules())
        reference = next(vit.parameters())
        for name in targets:
            if name not in modules:
                raise ValueError(f"SSF target {name!r} is not a module of this ViT")
            module = modules[name]
            channels, channel_dim = output_channels(module)
            factor = ScaleShift(channels, channel_dim, config.init_std).to(reference.device, reference.dtype)
            self.factors[name.replace(".", "_")] = factor
            self.add_hook(module.register_forward_hook(_ApplyAfter(self, factor)))


class _ApplyAfter:
    """Forward hook: the module's output through `factor` (an object, so deep copies stay independent)."""

    def __init__(self, injector: Injector, factor: ScaleShift) -> None:
        self.injector, self.factor = injector, factor

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        return self.factor(output) if self.injector.active else None


def output_channels(module: nn.Module) -> tuple[int, int]:
    """(channels, channel dimension) of a module's output: Linear/LayerNorm last, Conv2d dim 1."""
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1], -1
    if isinstance(module, nn.Conv2d):
        return module.out_channels, 1
    raise TypeError(f"SSF cannot follow a {type(module).__name__}")
