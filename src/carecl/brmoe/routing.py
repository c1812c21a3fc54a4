"""The two routing levels: router selection by perceptron entropy, then top-K expert weights."""

from __future__ import annotations

import torch
from torch import Tensor

# Largest gathered router block (slots x width x channels) materialised at once.
GATHER_BUDGET_ELEMENTS = 1 << 24


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


class _PackedRouterScores(torch.autograd.Function):
    """scores[s, j] = rows[index[s, j]] · inputs[s] + bias[index[s, j]], rows frozen.

    The gathered (slots, width, C) block is rebuilt in backward rather than kept alive between
    forward and backward: at 300 tasks it would hold ~30 MB per block per step (ViT-B, batch 32).
    """

    @staticmethod
    def forward(ctx, inputs: Tensor, rows: Tensor, bias: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(rows, index)
        ctx.input_dtype = inputs.dtype
        chunks = _chunks(index, rows.shape[-1])
        scores = [torch.bmm(rows[index[c]].to(inputs.dtype), inputs[c, :, None]).squeeze(-1) for c in chunks]
        return (scores[0] if len(scores) == 1 else torch.cat(scores)) + bias[index]

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, index = ctx.saved_tensors
        grad_inputs = None
        if ctx.needs_input_grad[0]:
            chunks = _chunks(index, rows.shape[-1])
            parts = [torch.bmm(grad[c, None, :].to(rows.dtype), rows[index[c]]).squeeze(1) for c in chunks]
            grad_inputs = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(ctx.input_dtype)
        return grad_inputs, None, None, None


def _chunks(index: Tensor, dim: int) -> list[slice]:
    slots, width = index.shape
    step = max(1, GATHER_BUDGET_ELEMENTS // max(1, width * dim))
    return [slice(start, start + step) for start in range(0, slots, step)]


def packed_router_scores(inputs: Tensor, rows: Tensor, bias: Tensor, index: Tensor) -> Tensor:
    """Scores (S, width) of each slot's router on `inputs` (S, C); `index` (S, width) picks rows.

    Only the selected routers are evaluated, straight from the packed table: no dense
    (tasks, tasks, C) router tensor is ever built. Padding rows score -inf.
    """
    return _PackedRouterScores.apply(inputs, rows, bias, index)


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
