"""A bank of parallel-adapter sets, one set per task (EASE's expandable subspaces).

Each set is a full AdaptFormer adapter stack (`BottleneckAdapter` per block, as `adapter.py`). A forward
runs either one set on the whole batch (`using(t)`: training task t, or its prototypes), or several sets
at once (`features_of_sets`): the batch is repeated once per set, laid out set-major, and in every block
the sets' adapters run as one batched matrix product instead of a Python loop over tasks.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from carecl.tuners.adapter import AdapterConfig, BottleneckAdapter
from carecl.tuners.base import Injector, ParallelBranch


class AdapterBankInjector(Injector):
    """`sets[t][L]`: task t's adapter in block L. With no set selected the branch adds nothing."""

    def __init__(self, vit: VisionTransformer, config: AdapterConfig) -> None:
        super().__init__(vit)
        config.validate()
        self.config = config
        self.sets = nn.ModuleList()
        # int: that set for the whole batch; range: those sets, batch repeated set-major; None: no adapter.
        self.selected: int | range | None = None
        ParallelBranch(self, self._branch)

    def add_set(self) -> nn.ModuleList:
        reference = next(self.vit.parameters())
        adapters = nn.ModuleList(BottleneckAdapter(self.vit.embed_dim, self.config) for _ in self.vit.blocks)
        self.sets.append(adapters.to(reference.device, reference.dtype))
        return self.sets[-1]

    @contextlib.contextmanager
    def using(self, selection: int | range | None) -> Iterator[None]:
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
        return self._batched_branch(block, block_input, [self.sets[t][block] for t in self.selected])

    def _batched_branch(self, block: int, x: Tensor, adapters: list[BottleneckAdapter]) -> Tensor:
        """Every set's adapter on its own slice of a set-major batch, as batched matrix products."""
        n_sets, width = len(adapters), x.shape[-1]
        rows = x.reshape(n_sets, -1, width)
        if self.config.layer_norm:
            weight = torch.stack([a.norm.weight for a in adapters])[:, None]
            bias = torch.stack([a.norm.bias for a in adapters])[:, None]
            rows = F.layer_norm(rows, (width,), eps=adapters[0].norm.eps) * weight + bias
        down_w = torch.stack([a.down.weight for a in adapters]).transpose(1, 2)
        down_b = torch.stack([a.down.bias for a in adapters])[:, None]
        up_w = torch.stack([a.up.weight for a in adapters]).transpose(1, 2)
        up_b = torch.stack([a.up.bias for a in adapters])[:, None]
        hidden = F.dropout(F.relu(torch.baddbmm(down_b, rows, down_w)), adapters[0].dropout.p, self.training)
        out = torch.baddbmm(up_b, hidden, up_w)
        if self.config.scale is None:
            out = out * torch.stack([a.scale for a in adapters])[:, None]
        else:
            out = out * self.config.scale
        return out.reshape(x.shape)

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
