"""Losses shared by several methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def orthogonality_loss(features: Tensor, stored_means: Tensor, temperature: float) -> Tensor:
    """CE of each row of [stored class means; batch features] against itself over their dot products / T
    (MOS's and HiDe-Prompt's contrastive regulariser; the features are not normalised, as in their code)."""
    rows = torch.cat([stored_means.to(features.dtype), features]) if len(stored_means) else features
    similarity = rows @ rows.T / temperature
    return F.cross_entropy(similarity, torch.arange(len(rows), device=rows.device))
