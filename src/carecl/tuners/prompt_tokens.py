"""Prompt tuning tokens chosen per image (L2P): inserted right after the CLS token before the first block and
kept to the end, so the final tokens are [CLS, prompts, patches]. Each prompt token gets the CLS token's
position embedding, as the authors' checkpoint loader gives it (their resized position table repeats the
CLS entry for every prompt slot).

    with injector.inserting(prompts):                      # (B, P, C)
        tokens = vit.forward_features(images)              # (B, 1 + P + patches, C), after the final norm
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from carecl.tuners.base import Injector


class PromptTokenInjector(Injector):
    """No parameters of its own: the prompts come from the method (a prompt pool's selection)."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__(vit)
        self.n_prefix = vit.num_prefix_tokens
        self._prompts: Tensor | None = None
        self.add_hook(self.blocks[0].register_forward_pre_hook(self._insert))

    @property
    def prompt_position(self) -> Tensor | None:
        """The CLS token's position embedding (None when the table holds patches only)."""
        if getattr(self.vit, "no_embed_class", False) or self.vit.pos_embed is None or self.vit.cls_token is None:
            return None
        return self.vit.pos_embed[:, :1]

    @contextlib.contextmanager
    def inserting(self, prompts: Tensor) -> Iterator[None]:
        if self._prompts is not None:
            raise RuntimeError("PromptTokenInjector.inserting is not re-entrant")
        self._prompts = prompts
        try:
            yield
        finally:
            self._prompts = None

    def _insert(self, module: nn.Module, args: tuple[Any, ...]) -> tuple | None:
        if self._prompts is None or not self.active:
            return None
        x = args[0]
        prompts = self._prompts.to(x.dtype)
        position = self.prompt_position
        if position is not None:
            prompts = prompts + position.to(x.dtype)
        return (torch.cat([x[:, : self.n_prefix], prompts, x[:, self.n_prefix:]], dim=1), *args[1:])
