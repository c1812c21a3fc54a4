"""Attention-level prefixes (prefix tuning, Li & Liang 2021; L2P / DualPrompt / HiDe-Prompt / NoRGa):
extra keys and values per block, attended to by every token, with an optional hook on the raw
attention scores for gated variants (NoRGa's non-linear residual gate).

Each block's timm `Attention` is wrapped by a `PrefixAttention` that holds the original and uses its
own weights; with no prefix and no score hook for a block it simply calls the original. Prefixes
are set per forward (they usually depend on the input: a prompt pool's selection):

    with injector.prefixes({3: Prefix(keys, values)}):      # keys/values (B, P, C), after projection
        features = vit.forward_features(images)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import Tensor, nn

from carecl.tuners.base import Injector

# fn(block, scores (B, H, N, P + N) before softmax, n_prefix) -> scores: e.g. a gate on the prefix columns.
ScoreHook = Callable[[int, Tensor, int], Tensor]


@dataclass
class Prefix:
    """Keys and values prepended in one block: (B, P, C) each, in the attention's projected space."""

    keys: Tensor
    values: Tensor

    def __post_init__(self) -> None:
        if self.keys.shape != self.values.shape or self.keys.dim() != 3:
            raise ValueError(f"prefix keys and values must both be (B, P, C), got {tuple(self.keys.shape)} "
                             f"and {tuple(self.values.shape)}")


class PrefixAttention(nn.Module):
    """A timm Attention computed over [prefix keys; token keys] and [prefix values; token values]."""

    def __init__(self, attention: Attention, owner: "PrefixInjector", index: int) -> None:
        super().__init__()
        self.attention = attention
        self.index = index
        object.__setattr__(self, "_owner", owner)  # a back-reference, not a submodule (no cycle in modules())

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        prefix = self._owner.active_prefix(self.index)
        hook = self._owner.score_hook
        if (prefix is None and hook is None) or not self._owner.active:
            return self.attention(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise NotImplementedError("prefix attention with an attention mask is not supported")
        return attend_with_prefix(self.attention, x, prefix, None if hook is None else
                                  lambda scores, n: hook(self.index, scores, n))


def attend_with_prefix(attention: Attention, x: Tensor, prefix: Prefix | None,
                       score_hook: Callable[[Tensor, int], Tensor] | None = None) -> Tensor:
    """timm Attention.forward, written out, with `prefix` keys/values prepended and scores hookable."""
    batch, n_tokens, _ = x.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    gate = attention.gate(x).sigmoid() if getattr(attention, "gate", None) is not None else None
    qkv = attention.qkv(x).reshape(batch, n_tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attention.q_norm(q), attention.k_norm(k)
    n_prefix = 0
    if prefix is not None:
        n_prefix = prefix.keys.shape[1]
        k = torch.cat([_heads(prefix.keys, heads, head_dim).to(k.dtype), k], dim=2)
        v = torch.cat([_heads(prefix.values, heads, head_dim).to(v.dtype), v], dim=2)
    scores = (q * attention.scale) @ k.transpose(-2, -1)
    if score_hook is not None:
        scores = score_hook(scores, n_prefix)
    weights = attention.attn_drop(scores.softmax(dim=-1))
    out = (weights @ v).transpose(1, 2).reshape(batch, n_tokens, heads * head_dim)
    out = attention.norm(out)
    if gate is not None:
        out = out * gate
    return attention.proj_drop(attention.proj(out))


def _heads(tokens: Tensor, heads: int, head_dim: int) -> Tensor:
    batch, length, _ = tokens.shape
    return tokens.reshape(batch, length, heads, head_dim).transpose(1, 2)


class PrefixInjector(Injector):
    """Wraps `blocks[L].attn` of the chosen blocks (default: all); no trainable parts of its own (the prompt
    pool that makes the prefixes belongs to the method)."""

    def __init__(self, vit: VisionTransformer, blocks: list[int] | None = None) -> None:
        super().__init__(vit)
        self.block_indices = list(range(len(vit.blocks))) if blocks is None else list(blocks)
        for index in self.block_indices:
            block = vit.blocks[index]
            self.replace_module(block, "attn", PrefixAttention(block.attn, self, index))
        self._active: dict[int, Prefix] | None = None
        self.score_hook: ScoreHook | None = None

    def active_prefix(self, index: int) -> Prefix | None:
        return None if self._active is None else self._active.get(index)

    @contextlib.contextmanager
    def prefixes(self, per_block: dict[int, Prefix]) -> Iterator[None]:
        """Prefixes for the forwards inside the block (never re-entrant)."""
        unknown = sorted(set(per_block) - set(self.block_indices))
        if unknown:
            raise ValueError(f"blocks {unknown} carry no prefix attention (injected: {self.block_indices})")
        if self._active is not None:
            raise RuntimeError("PrefixInjector.prefixes is not re-entrant")
        self._active = per_block
        try:
            yield
        finally:
            self._active = None
