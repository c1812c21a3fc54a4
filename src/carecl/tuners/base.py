"""What every injector shares: it wraps an unmodified timm ViT, keeps the handles of what it changed,
and `remove()` gives the ViT back exactly as it was (PEFT's config + layer + injector shape).

Block-parallel injectors (adapters, MoE adapters) also wrap either tower of an open_clip CLIP: its
ResidualAttentionBlocks compute the same pre-LN block (`ln_2` is fed the post-attention residual, as
timm's `norm2`), batch-first; `TowerLayout` names the blocks and that norm for each kind of tower.

Two ways in, both undone by `remove()`:
- hooks on the ViT's own modules (adapters, SSF, VPT, BR-MoE), kept as RemovableHandles;
- a module of the ViT replaced by a wrapper that holds the original and calls its weights
  (attention with prefix keys/values), put back on removal.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from carecl.config import ConfigError


class UnsupportedBackbone(ConfigError, TypeError):
    """The configured backbone has a layout an injector cannot wrap (the user picks another backbone.name)."""


@dataclass(frozen=True)
class TowerLayout:
    """Where a tower's blocks are and which of each block's norms is fed the MLP sub-block's input."""

    blocks: tuple[nn.Module, ...]
    mlp_norm: str
    width: int


class Injector(nn.Module):
    """Base of the injectors: the frozen ViT (`vit`) plus the injected parts, all submodules, so `.to()`
    moves them together; a method lists the ViT in `backbone_modules()` so it is never saved.
    Subclasses with `wraps_clip_towers = True` also take an open_clip image or text tower as `vit`."""

    wraps_clip_towers = False

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.layout = tower_layout(vit, type(self).__name__, self.wraps_clip_towers)
        self.vit = vit.requires_grad_(False)
        self._handles: list[RemovableHandle] = []
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []
        # False: the hooks stand aside and the ViT computes its frozen output (APER's first branch).
        self.active = True

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """Run the plain, frozen ViT inside the block, with the injection kept in place."""
        previous, self.active = self.active, False
        try:
            yield
        finally:
            self.active = previous

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.layout.blocks)

    def add_hook(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def replace_module(self, parent: nn.Module, name: str, wrapper: nn.Module) -> None:
        """Put `wrapper` where `parent.<name>` was; `remove()` puts the original back."""
        self._replaced.append((parent, name, getattr(parent, name)))
        setattr(parent, name, wrapper)

    @property
    def injected(self) -> bool:
        return bool(self._handles or self._replaced)

    def remove(self) -> VisionTransformer:
        """Undo every hook and replacement; the ViT computes exactly what it did before injection."""
        for handle in reversed(self._handles):
            handle.remove()
        for parent, name, original in reversed(self._replaced):
            setattr(parent, name, original)
        self._handles, self._replaced = [], []
        return self.vit


def tower_layout(model: nn.Module, who: str, clip_towers: bool = False) -> TowerLayout:
    """The layout of a timm ViT, or (with `clip_towers`) of an open_clip image or text tower; anything else
    is refused with a message naming `who`."""
    transformer = getattr(model, "transformer", None)
    if clip_towers and transformer is not None and hasattr(transformer, "resblocks"):
        check_clip_tower(model, who)
        return TowerLayout(tuple(transformer.resblocks), "ln_2", transformer.width)
    check_supported(model, who)
    return TowerLayout(tuple(model.blocks), "norm2", model.embed_dim)


def check_clip_tower(tower: nn.Module, who: str) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    transformer = tower.transformer
    for index, block in enumerate(transformer.resblocks):
        if type(block) is not ResidualAttentionBlock:
            raise UnsupportedBackbone(f"backbone: {who} supports open_clip's ResidualAttentionBlock, resblocks[{index}] "
                                      f"is {type(block).__name__}")
    if not transformer.batch_first:
        raise UnsupportedBackbone(f"backbone: {who}: the open_clip tower runs sequence-first; build it with batch_first=True")
    if transformer.grad_checkpointing:
        raise UnsupportedBackbone(f"backbone: {who}: grad checkpointing re-runs blocks outside their hooks; disable it")


def check_supported(vit: nn.Module, who: str) -> None:
    if not isinstance(vit, VisionTransformer):
        raise UnsupportedBackbone(f"backbone.name: {who} needs a timm VisionTransformer, got {type(vit).__name__}")
    for index, block in enumerate(vit.blocks):
        # The hooks rely on Block's layout: norm2's input is z_a, the block returns z_a + mlp part.
        if type(block) is not Block:
            raise UnsupportedBackbone(f"backbone.name: {who} supports timm's standard Block, vit.blocks[{index}] is "
                                      f"{type(block).__name__}: choose a ViT built of standard blocks")
    if vit.grad_checkpointing:
        raise UnsupportedBackbone(f"backbone: {who}: timm grad checkpointing re-runs blocks outside their hooks; disable it")


class ParallelBranch:
    """A block-parallel branch: z' = z_a + mlp(norm2(z_a)) + branch(z_a), with z_a the MLP sub-block's input.

    A pre-hook on `norm2` (`ln_2` in a CLIP tower) captures z_a; a forward hook on the block adds `branch(index, z_a)` to its
    output (None adds nothing). Both handles go to the injector. The hooks are objects, not closures,
    so a deep copy of the injector (a bound-method `branch`) gets hooks that call the copy.
    """

    def __init__(self, injector: Injector, branch: Callable[[int, Tensor], Tensor | None]) -> None:
        self.injector = injector
        self.branch = branch
        self.inputs: dict[int, Tensor] = {}
        for index, block in enumerate(injector.blocks):
            norm = getattr(block, injector.layout.mlp_norm)
            injector.add_hook(norm.register_forward_pre_hook(_CaptureInput(self, index)))
            injector.add_hook(block.register_forward_hook(_AddBranch(self, index)))


class _CaptureInput:
    def __init__(self, parallel: ParallelBranch, index: int) -> None:
        self.parallel, self.index = parallel, index

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.parallel.inputs[self.index] = args[0]


class _AddBranch:
    def __init__(self, parallel: ParallelBranch, index: int) -> None:
        self.parallel, self.index = parallel, index

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        block_input = self.parallel.inputs.pop(self.index, None)
        if block_input is None or not self.parallel.injector.active:
            return None
        added = self.parallel.branch(self.index, block_input)
        return None if added is None else output + added
