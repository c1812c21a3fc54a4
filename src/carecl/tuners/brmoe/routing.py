"""The two routing levels: router selection by perceptron entropy, then top-K expert weights."""

from __future__ import annotations

import torch
from torch import Tensor


def negative_entropy(logits: Tensor) -> Tensor:
    """Σ p log(p + 1e-10) over the last dimension (the release's entropy, negated)."""
    probabilities = logits.softmax(dim=-1, dtype=_at_least_float32(logits))
    return torch.xlogy(probabilities, probabilities + 1e-10).sum(dim=-1)


def select_routers(negative_entropies: Tensor, n_routers: int, forced_router: int | None) -> Tensor:
    """Level 1: per sample, the routers whose perceptrons are most confident. (B, M') router ids.

    Columns of `negative_entropies` (B, n) are the candidate routers 0..n-1. Task-known forwards
    force their own router and pick the remaining M-1 among the candidates. Too few: all.
    """
    n_free = n_routers if forced_router is None else n_routers - 1
    n_free = min(n_free, negative_entropies.shape[1])
    chosen = negative_entropies.topk(n_free, dim=1).indices
    if forced_router is None:
        return chosen
    forced = torch.full((chosen.shape[0], 1), forced_router, dtype=torch.long, device=chosen.device)
    return torch.cat([forced, chosen], dim=1)


def packed_router_index(routers: Tensor, n_experts: int) -> Tensor:
    """(S, n_experts) rows of the packed router tables for routers (S,): row 0 (padding) if j > ρ."""
    experts = torch.arange(n_experts, device=routers.device)[None, :]
    first = 1 + routers[:, None] * (routers[:, None] + 1) // 2
    return torch.where(experts <= routers[:, None], first + experts, 0)


def packed_router_scores(hidden: Tensor, products: Tensor, offsets: Tensor, routers: Tensor, n_experts: int) -> Tensor:
    """R_ρ(c_ρ) = h_ρ·Q_ρ + o_ρ for each slot's router ρ (S,) from its expert's CLS hidden h_ρ (S, r).

    Only the selected routers' r-wide tables are gathered, (S, n_experts, r): no (tasks, tasks, C)
    tensor is ever built. Padding entries (experts newer than the router) score -inf.
    """
    index = packed_router_index(routers, n_experts)
    return torch.bmm(products[index], hidden[:, :, None]).squeeze(-1) + offsets[index]


def expert_mixture(scores: Tensor, topk_experts: int) -> tuple[Tensor, Tensor]:
    """Level 2: per selected router, softmax over its top-K scores. Returns (expert ids, weights).

    Release: it fills the non-top-K scores with -100 (not -inf) and softmaxes over all experts,
    so those experts get weight ~e^-100 relative to the kept ones; they are skipped here, which
    is exact to float precision unless a router's top scores themselves fall near -100. It skips
    the masking when K >= #experts: the same as keeping every real score. Padded (-inf) scores
    that reach the top-K get weight 0 (their slot runs a valid expert at weight 0).
    """
    k = min(topk_experts, scores.shape[-1])
    values, experts = scores.topk(k, dim=-1)
    return experts, values.softmax(dim=-1, dtype=_at_least_float32(values)).to(values.dtype)


def _at_least_float32(tensor: Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)
