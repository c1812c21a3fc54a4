"""A bank of parallel-adapter sets, one set per task (EASE's expandable subspaces).

Each set is a full AdaptFormer adapter stack (`BottleneckAdapter` per block, as `adapter.py`). A forward
runs either one set on the whole batch (`using(t)`: training task t, or its prototypes), several sets
at once (`features_of_sets`: the batch is repeated once per set, laid out set-major), or one set per image
(`features_per_image`: MOS's retrieval). Several sets run in every block as one batched matrix product
instead of a Python loop over tasks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Union

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from carecl.tuners.adapter import AdapterConfig, BottleneckAdapter
from carecl.tuners.base import Injector, ParallelBranch


@dataclass(frozen=True)
class PerImageSets:
    """Image i runs through set `sets[position[i]]`: the distinct sets once, and each image's place among them."""

    sets: list[int]
    position: Tensor

    @classmethod
    def of(cls, set_of_image: Tensor) -> "PerImageSets":
        distinct, position = torch.unique(set_of_image, return_inverse=True)
        return cls(distinct.tolist(), position)


Selection = Union[int, range, PerImageSets, None]


class AdapterBankInjector(Injector):
    """`sets[t][L]`: task t's adapter in block L. With no set selected the branch adds nothing."""

    def __init__(self, vit: VisionTransformer, config: AdapterConfig) -> None:
        super().__init__(vit)
        config.validate()
        self.config = config
        self.sets = nn.ModuleList()
        # int: that set for the whole batch; range: those sets, batch repeated set-major; PerImageSets: a set
        # per image; None: no adapter.
        self.selected: Selection = None
        ParallelBranch(self, self._branch)

    def add_set(self) -> nn.ModuleList:
        reference = next(self.vit.parameters())
        adapters = nn.ModuleList(BottleneckAdapter(self.vit.embed_dim, self.config) for _ in self.vit.blocks)
        self.sets.append(adapters.to(reference.device, reference.dtype))
        return self.sets[-1]

    @contextlib.contextmanager
    def using(self, selection: Selection) -> Iterator[None]:
        previous, self.selected = self.selected, selection
        try:
            yield
        finally:
            self.selected = previous

    def _branch(self, block: int, block_input: Tensor) -> Tensor | None:
        if self.selected is None:
            return None
        if isinstance(self.selected, int):
            return self.sets[self.selected][block](block_input)
        if isinstance(self.selected, PerImageSets):
            chosen = [self.sets[t][block] for t in self.selected.sets]
            weights = {name: tensor[self.selected.position] for name, tensor in _stacked(chosen).items()}
            return _run_groups(block_input, weights, chosen[0], self.training)
        adapters = [self.sets[t][block] for t in self.selected]
        rows = block_input.reshape(len(adapters), -1, block_input.shape[-1])
        return _run_groups(rows, _stacked(adapters), adapters[0], self.training).reshape(block_input.shape)

    def features_of_sets(self, images: Tensor, sets: range, images_per_pass: int = 512) -> Tensor:
        """(batch, len(sets), width): the ViT's features with each set, several sets per forward."""
        batch = images.shape[0]
        per_pass = max(1, images_per_pass // max(batch, 1))
        chunks = []
        for start in range(sets.start, sets.stop, per_pass):
            chunk = range(start, min(start + per_pass, sets.stop))
            with self.using(chunk):
                features = self.vit(images.repeat(len(chunk), *([1] * (images.dim() - 1))))
            chunks.append(features.reshape(len(chunk), batch, -1))
        return torch.cat(chunks).transpose(0, 1)

    def features_per_image(self, images: Tensor, set_of_image: Tensor) -> Tensor:
        """(batch, width): image i's feature through set `set_of_image[i]`, all in one forward."""
        with self.using(PerImageSets.of(set_of_image)):
            return self.vit(images)


def _stacked(adapters: list[BottleneckAdapter]) -> dict[str, Tensor]:
    """The adapters' weights stacked on a leading group axis, shaped for batched products."""
    weights = {
        "down_w": torch.stack([a.down.weight for a in adapters]).transpose(1, 2),
        "down_b": torch.stack([a.down.bias for a in adapters])[:, None],
        "up_w": torch.stack([a.up.weight for a in adapters]).transpose(1, 2),
        "up_b": torch.stack([a.up.bias for a in adapters])[:, None],
    }
    if isinstance(adapters[0].norm, nn.LayerNorm):
        weights["norm_w"] = torch.stack([a.norm.weight for a in adapters])[:, None]
        weights["norm_b"] = torch.stack([a.norm.bias for a in adapters])[:, None]
    if adapters[0].scale is not None:
        weights["scale"] = torch.stack([a.scale for a in adapters])[:, None]
    return weights


def _run_groups(rows: Tensor, weights: dict[str, Tensor], like: BottleneckAdapter, training: bool) -> Tensor:
    """(groups, n, width) rows, group g through the g-th stacked adapter; `like` gives the shared settings."""
    if "norm_w" in weights:
        rows = F.layer_norm(rows, rows.shape[-1:], eps=like.norm.eps) * weights["norm_w"] + weights["norm_b"]
    hidden = F.dropout(F.relu(torch.baddbmm(weights["down_b"], rows, weights["down_w"])), like.dropout.p, training)
    out = torch.baddbmm(weights["up_b"], hidden, weights["up_w"])
    return out * (weights["scale"] if "scale" in weights else like.fixed_scale)
