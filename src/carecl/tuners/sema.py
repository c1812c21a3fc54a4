"""SEMA's self-expanding mixture of adapters (Wang et al., CVPR 2025): in every block a list of bottleneck
adapters parallel to the MLP (fed the post-attention residual), mixed per image by a softmax over one
router column per adapter on the mean token; in the expandable blocks every adapter also has a
representation descriptor (RD), a linear autoencoder of the mean token whose recent reconstruction losses
(a window of `buffer_size`) make a z-score for new inputs. A block whose adapters all see a batch at mean
z-score above `threshold` asks for a new adapter (`SEMAInjector.detecting`).

The authors' adapter ignores its scale and dropout (an un-scaled up(ReLU(down(x)))): scale 1, no dropout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from carecl.config import ConfigError, require
from carecl.tuners.adapter import AdapterConfig, BottleneckAdapter
from carecl.tuners.base import Injector, ParallelBranch


@dataclass
class SEMAConfig:
    bottleneck: int = 16
    rd_dim: int = 128
    buffer_size: int = 500
    threshold: float = 2.0
    # Blocks that may expand (and carry RDs), inclusive; the others keep their first adapter.
    # null: the ViT's last three blocks (the authors' 9-11 of ViT-B's 12).
    first_expandable: int | None = None
    last_expandable: int | None = None

    def validate(self) -> None:
        require(self.bottleneck > 0, "bottleneck", f"must be positive, got {self.bottleneck}")
        require(self.rd_dim > 0, "rd_dim", f"must be positive, got {self.rd_dim}")
        require(self.buffer_size > 2, "buffer_size", f"must be above 2, got {self.buffer_size}")
        require(self.first_expandable is None or self.first_expandable >= 0, "first_expandable",
                f"must be >= 0, got {self.first_expandable}")
        if self.first_expandable is not None and self.last_expandable is not None:
            require(self.first_expandable <= self.last_expandable, "last_expandable",
                    f"must be >= first_expandable ({self.first_expandable}), got {self.last_expandable}")

    def expandable_range(self, depth: int, where: str = "method.sema") -> range:
        """The expandable blocks of a `depth`-block ViT; a block it lacks is a ConfigError naming `where`."""
        last = depth - 1 if self.last_expandable is None else self.last_expandable
        first = max(0, last - 2) if self.first_expandable is None else self.first_expandable
        for key, block in (("first_expandable", first), ("last_expandable", last)):
            if not 0 <= block < depth:
                raise ConfigError(f"{where}.{key} {block} is not a block of the ViT (it has {depth}: 0-{depth - 1})")
        if first > last:
            raise ConfigError(f"{where}.first_expandable {first} is after last_expandable {last}")
        return range(first, last + 1)


class LossWindow(nn.Module):
    """The last `size` reconstruction losses an adapter's RD produced in training (the authors' Records): while
    filling, values beyond the free slots are dropped; once full, a sliding window."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("values", torch.zeros(size))
        self.register_buffer("length", torch.zeros((), dtype=torch.long))
        self.register_buffer("updating", torch.ones((), dtype=torch.bool))

    def add(self, losses: Tensor) -> None:
        if not bool(self.updating):
            return
        losses, size, length = losses.detach().to(self.values), len(self.values), int(self.length)
        if length < size:
            free = size - length
            self.values[length:length + min(free, len(losses))] = losses[:free]
            self.length.fill_(min(size, length + len(losses)))
        else:
            self.values.copy_(torch.cat([self.values, losses])[len(losses):])

    def z_scores(self, losses: Tensor) -> Tensor:
        length = int(self.length)
        if length <= 2:
            return torch.zeros_like(losses)
        window = self.values[:length]
        return ((losses - window.mean()) / window.var().sqrt()).abs()


class DescribedAdapter(nn.Module):
    """A functional adapter, its router column and (in expandable blocks) its RD and loss window."""

    def __init__(self, width: int, config: SEMAConfig, described: bool) -> None:
        super().__init__()
        self.functional = BottleneckAdapter(width, AdapterConfig(config.bottleneck, scale=1.0, dropout=0.0))
        self.gate = nn.Linear(width, 1)
        self.rd = nn.Sequential(nn.Linear(width, config.rd_dim), nn.Linear(config.rd_dim, width)) if described else None
        if described:
            for layer in self.rd:
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
                nn.init.zeros_(layer.bias)
        self.window = LossWindow(config.buffer_size)
        self.register_buffer("newly_added", torch.ones((), dtype=torch.bool))

    def rd_losses(self, mean_token: Tensor) -> Tensor:
        """(batch,) mean squared reconstruction error of each image's mean token."""
        return (self.rd(mean_token) - mean_token).square().mean(dim=1)


class SEMALayer(nn.Module):
    def __init__(self, width: int, config: SEMAConfig, expandable: bool) -> None:
        super().__init__()
        self.width, self.config, self.expandable = width, config, expandable
        self.adapters = nn.ModuleList([DescribedAdapter(width, config, expandable)])
        self.register_buffer("added_for_task", torch.zeros((), dtype=torch.bool))

    def add_adapter(self) -> DescribedAdapter:
        reference = self.adapters[0].gate.weight
        adapter = DescribedAdapter(self.width, self.config, self.expandable).to(reference.device, reference.dtype)
        self.adapters.append(adapter)
        return adapter


class SEMAInjector(Injector):
    """A `SEMALayer` parallel to every block of a timm ViT. While `detecting`, the first block (in depth order)
    whose adapters all find a batch out of distribution is recorded in `expansion` (the rest of that forward
    is not checked); `rd_loss` sums the newly added adapters' RD losses of the last forward."""

    def __init__(self, vit: nn.Module, config: SEMAConfig) -> None:
        super().__init__(vit)
        config.validate()
        self.config = config
        reference = next(vit.parameters())
        expandable = config.expandable_range(len(self.blocks))
        self.layers = nn.ModuleList(SEMALayer(self.layout.width, config, index in expandable)
                                    for index in range(len(self.blocks))).to(reference.device, reference.dtype)
        self.detecting = False
        self.expansion: int | None = None
        self.rd_loss = torch.zeros(())
        ParallelBranch(self, self._branch)

    def begin_forward(self) -> None:
        self.expansion, self.rd_loss = None, torch.zeros(())

    def _branch(self, index: int, hidden: Tensor) -> Tensor:
        layer = self.layers[index]
        if not layer.expandable:
            return layer.adapters[-1].functional(hidden)
        mean_token = hidden.mean(dim=1)
        losses = torch.stack([adapter.rd_losses(mean_token) for adapter in layer.adapters])  # (adapters, batch)
        z_scores = torch.stack([a.window.z_scores(loss.detach()) for a, loss in zip(layer.adapters, losses)])
        if self.training:
            for adapter, loss in zip(layer.adapters, losses):
                adapter.window.add(loss)
        if self.detecting and self.expansion is None and not bool(layer.added_for_task):
            if bool(z_scores.mean(dim=1).min() > self.config.threshold):
                self.expansion = index
        if bool(layer.adapters[-1].newly_added):
            self.rd_loss = self.rd_loss.to(losses) + losses[-1].mean()
        weights = torch.cat([adapter.gate(mean_token) for adapter in layer.adapters], dim=1).softmax(dim=1)
        outputs = torch.stack([adapter.functional(hidden) for adapter in layer.adapters], dim=1)  # (B, A, N, D)
        return (outputs * weights[:, :, None, None]).sum(dim=1)

    def settle(self) -> None:
        """End of a training round or task: nothing is newly added, and every loss window stops updating."""
        for layer in self.layers:
            for adapter in layer.adapters:
                adapter.newly_added.fill_(False)
                adapter.window.updating.fill_(False)
