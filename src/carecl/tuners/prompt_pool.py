"""A prompt pool with key-query matching (L2P, Wang et al., CVPR 2022; DualPrompt's E-prompts): `size` slots,
each a learnable key (C,) and a prompt of any shape (prompt tokens, or prefix keys and values per layer).

A query (the frozen ViT's CLS feature of the image, see `frozen_query`) picks the `top_k` slots whose keys
have the highest cosine similarity. With `batchwise`, the slots picked most often across the batch are used
for every image of the batch (the authors' PyTorch code: a majority vote, ties to the lower slot). The pull
term Σ_b Σ_k cos(query_b, key_sel) / B is what L2P's surrogate loss maximises (loss -= weight · pull).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class PoolSelection:
    """The chosen slots (B, top_k), every key's cosine with the query (B, size) and the pull term."""

    indices: Tensor
    similarity: Tensor
    pull: Tensor


class PromptPool(nn.Module):
    """`prompts` (size, *prompt_shape) and `keys` (size, key_dim), both U(-1, 1) as the authors initialise them."""

    def __init__(self, size: int, prompt_shape: tuple[int, ...], key_dim: int, top_k: int, batchwise: bool) -> None:
        super().__init__()
        if not 0 < top_k <= size:
            raise ValueError(f"top_k must be in [1, pool size {size}], got {top_k}")
        self.top_k, self.batchwise = top_k, batchwise
        self.prompts = nn.Parameter(torch.empty(size, *prompt_shape).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(size, key_dim).uniform_(-1, 1))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def select(self, query: Tensor, forced: Tensor | None = None) -> PoolSelection:
        """Slots for each image: `forced` (B, top_k) when given (a task's own slots), else the best-matching keys."""
        similarity = F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T
        if forced is not None:
            indices = forced
        else:
            indices = similarity.topk(self.top_k, dim=1).indices
            if self.batchwise:
                indices = majority_slots(indices, self.top_k).expand(len(query), -1)
        pull = similarity.gather(1, indices).sum() / len(query)
        return PoolSelection(indices, similarity, pull)

    def gather(self, indices: Tensor) -> Tensor:
        """(B, top_k, *prompt_shape): the chosen slots' prompts."""
        return self.prompts[indices]


def majority_slots(indices: Tensor, top_k: int) -> Tensor:
    """(1, top_k): the slots chosen most often over the batch, ties broken towards the lower slot."""
    slots, counts = torch.unique(indices, return_counts=True, sorted=True)
    if len(slots) < top_k:  # the authors pad with the smallest chosen slot (count 0)
        slots = torch.cat([slots, slots[:1].expand(top_k - len(slots))])
        counts = torch.cat([counts, counts.new_zeros(top_k - len(counts))])
    order = torch.sort(counts, descending=True, stable=True).indices[:top_k]
    return slots[order][None]


@torch.no_grad()
def frozen_query(vit_forward: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """The query of the prompt methods: the frozen ViT's own pooled CLS feature, one forward per batch."""
    return vit_forward(images)
