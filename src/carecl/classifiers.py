"""Cosine classifier with one weight block per task (CaRE, NoRGa, SLCA-style heads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineClassifier(nn.Module):
    """logit_k = cos(f, w_k); unscaled, no bias. Blocks are appended task by task."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.heads = nn.ParameterList()

    @property
    def n_classes(self) -> int:
        return sum(head.shape[0] for head in self.heads)

    def add_block(self, n_classes: int) -> None:
        weight = torch.empty(n_classes, self.in_features)
        nn.init.trunc_normal_(weight, std=0.02)
        if len(self.heads):
            weight = weight.to(self.heads[0].device)
        self.heads.append(nn.Parameter(weight))

    def weight(self) -> torch.Tensor:
        return torch.cat(list(self.heads), dim=0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(features, dim=-1), F.normalize(self.weight(), dim=-1))
