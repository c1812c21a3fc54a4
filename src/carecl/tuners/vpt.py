"""Visual prompt tuning (Jia et al., ECCV 2022): learned prompt tokens after the CLS token.

Shallow: prompts enter before block 0 and travel through every block. Deep: each block gets its
own prompts in place of the previous block's prompt outputs. Either way the prompt tokens are
dropped after the last block, so the final norm and CLS pooling see the ViT's usual tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from carecl.config import require
from carecl.tuners.base import Injector


@dataclass
class VPTConfig:
    n_prompts: int = 5
    deep: bool = False
    dropout: float = 0.0
    # uniform: ±sqrt(6 / (3·patch² + C)) as VPT's paper; zeros: as LAMDA-PILOT's VPT (APER).
    init: Literal["uniform", "zeros"] = "uniform"

    def validate(self) -> None:
        require(self.n_prompts >= 0, "n_prompts", f"must be >= 0, got {self.n_prompts}")


class VPTInjector(Injector):
    """`prompts` (blocks or 1, n_prompts, C), initialised as `VPTConfig.init` says."""

    def __init__(self, vit: VisionTransformer, config: VPTConfig) -> None:
        super().__init__(vit)
        config.validate()
        self.n_prompts = config.n_prompts
        self.deep = config.deep
        depth = len(vit.blocks) if config.deep else 1
        patch = vit.patch_embed.patch_size[0]
        bound = math.sqrt(6.0 / float(3 * patch * patch + vit.embed_dim))
        reference = next(vit.parameters())
        prompts = torch.zeros(depth, config.n_prompts, vit.embed_dim, device=reference.device, dtype=reference.dtype)
        if config.init == "uniform":
            prompts.uniform_(-bound, bound)
        self.prompts = nn.Parameter(prompts)
        self.dropout = nn.Dropout(config.dropout)
        self.n_prefix = vit.num_prefix_tokens  # CLS (+ registers): prompts go right after them
        blocks = self.blocks
        for index, block in enumerate(blocks):
            if index == 0 or config.deep:
                self.add_hook(block.register_forward_pre_hook(_InsertPrompts(self, index)))
        self.add_hook(blocks[-1].register_forward_hook(self._drop_prompts))

    def insert(self, index: int, x: Tensor) -> Tensor | None:
        """Block `index`'s input with its prompts after the CLS token (deep: in place of the previous ones)."""
        if self.n_prompts == 0 or not self.active:
            return None
        prompts = self.dropout(self.prompts[index if self.deep else 0]).expand(x.shape[0], -1, -1)
        prefix, rest = x[:, : self.n_prefix], x[:, self.n_prefix:]
        if index > 0:  # deep: this block's prompts replace what the previous block made of its own
            rest = rest[:, self.n_prompts:]
        return torch.cat([prefix, prompts.to(x.dtype), rest], dim=1)

    def _drop_prompts(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if self.n_prompts == 0 or not self.active:
            return None
        return torch.cat([output[:, : self.n_prefix], output[:, self.n_prefix + self.n_prompts:]], dim=1)


class _InsertPrompts:
    def __init__(self, injector: VPTInjector, index: int) -> None:
        self.injector, self.index = injector, index

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        x = self.injector.insert(self.index, args[0])
        return None if x is None else (x, *args[1:])
