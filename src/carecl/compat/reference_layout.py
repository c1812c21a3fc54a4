"""The CaRE release's checkpoint layout (spec §8) and how its keys correspond to carecl's.

The release saves `torch.save(network.state_dict())` of its CaRENet:

- the ViT under `backbone.`, with timm's fused `attn.qkv` split into `attn.{q,k,v}_proj` and the
  MLP's `mlp.fc1` / `mlp.fc2` moved up to `fc1` / `fc2`; an unused timm `head` (dataset classes);
- per block L, under `backbone.adapter.adapter_layer{L}.`: `shared_adapter.*`, experts
  `adapter.{i}.*` (adapters name their LayerNorm `adapter_layer_norm_before`), routers
  `router.{i}.*` and class perceptrons `latent_head.{i}.{0,1}.*`;
- the cosine classifier's blocks as `fc.heads.{i}.0.weight`.

carecl's side ("learner state") is the CaRE learner's tensors: `backbone.*` with timm's names,
`model.layers.*` (BR-MoE) and `classifier.heads.*`. Everything here is pure key and tensor
bookkeeping: no model is built.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from carecl.errors import CareclError


class ReferenceCheckpointError(CareclError, ValueError):
    """A release checkpoint cannot be read or does not fit the configured CaRE model."""


# Copies of the shared adapter that the release keeps while training (anchor snapshots).
IGNORED_PARTS = frozenset({"ema_adapter", "_shared_adapter"})
# The release's ViT keeps timm's classification head (one row per dataset class); CaRE never uses it.
UNUSED_HEAD_KEYS = ("backbone.head.weight", "backbone.head.bias")
HEAD_KEY = re.compile(r"fc\.heads\.(\d+)\.0\.weight")
MOE_PREFIX = "backbone.adapter.adapter_layer{}."
# carecl's adapter names its LayerNorm `norm`; the release (AdaptFormer) `adapter_layer_norm_before`.
_ADAPTER_RENAMES = {"norm": "adapter_layer_norm_before"}


def _adapter_part(rest: str) -> str:
    head, dot, tail = rest.partition(".")
    return _ADAPTER_RENAMES.get(head, head) + dot + tail


# carecl key pattern -> release key(s); several keys mean the carecl tensor is their concatenation (dim 0).
_RULES: list[tuple[re.Pattern, Callable[[re.Match], tuple[str, ...]]]] = [
    (re.compile(r"backbone\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)"),
     lambda m: tuple(f"backbone.blocks.{m[1]}.attn.{part}_proj.{m[2]}" for part in "qkv")),
    (re.compile(r"backbone\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(.+)"),
     lambda m: (f"backbone.blocks.{m[1]}.{m[2]}.{m[3]}",)),
    (re.compile(r"backbone\.(.+)"), lambda m: (f"backbone.{m[1]}",)),
    (re.compile(r"model\.layers\.(\d+)\.shared\.(.+)"),
     lambda m: (MOE_PREFIX.format(m[1]) + "shared_adapter." + _adapter_part(m[2]),)),
    (re.compile(r"model\.layers\.(\d+)\.experts\.(\d+)\.(.+)"),
     lambda m: (MOE_PREFIX.format(m[1]) + f"adapter.{m[2]}." + _adapter_part(m[3]),)),
    (re.compile(r"model\.layers\.(\d+)\.routers\.(\d+)\.(.+)"),
     lambda m: (MOE_PREFIX.format(m[1]) + f"router.{m[2]}.{m[3]}",)),
    (re.compile(r"model\.layers\.(\d+)\.perceptrons\.(\d+)\.(.+)"),
     lambda m: (MOE_PREFIX.format(m[1]) + f"latent_head.{m[2]}.{m[3]}",)),
    (re.compile(r"classifier\.heads\.(\d+)"), lambda m: (f"fc.heads.{m[1]}.0.weight",)),
]


@dataclass(frozen=True)
class KeyLink:
    """One carecl tensor and the release key(s) holding it (q, k, v: concatenated along dim 0)."""

    carecl: str
    release: tuple[str, ...]


def link_keys(carecl_keys: Iterable[str]) -> list[KeyLink]:
    links = []
    for key in carecl_keys:
        for pattern, release in _RULES:
            match = pattern.fullmatch(key)
            if match:
                links.append(KeyLink(key, release(match)))
                break
        else:
            raise ValueError(f"no release name for carecl learner key {key!r} (reference_layout._RULES)")
    return links


def release_shapes(links: list[KeyLink], carecl_state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """The shape every release key must have for `carecl_state`'s model."""
    shapes = {}
    for link in links:
        shape = tuple(carecl_state[link.carecl].shape)
        parts = len(link.release)
        for key in link.release:
            shapes[key] = (shape[0] // parts, *shape[1:])
    return shapes


def to_release(carecl_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """carecl learner state -> release state dict (fresh contiguous CPU tensors: no shared storage)."""
    state = {}
    for link in link_keys(carecl_state):
        value = carecl_state[link.carecl].detach().cpu()
        for key, part in zip(link.release, value.chunk(len(link.release), dim=0)):
            state[key] = part.clone().contiguous()
    return state


def from_release(release_state: Mapping[str, Tensor], links: list[KeyLink],
                 template: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Release tensors -> carecl learner state (dtype of `template`); keys must have been checked."""
    tensors = {}
    for link in links:
        parts = [release_state[key] for key in link.release]
        value = parts[0] if len(parts) == 1 else torch.cat(parts)  # no copy where none is needed: loading copies
        tensors[link.carecl] = value.to(template[link.carecl].dtype)
    return tensors


# ---------------------------------------------------------------- reading a layout


def is_ignored(key: str) -> bool:
    return any(part in IGNORED_PARTS for part in key.split("."))


def classifier_task_sizes(state: Mapping[str, Tensor], source: str) -> list[int]:
    """Class count of each task, from `fc.heads.{i}.0.weight` (i = 0..T-1, rows = classes)."""
    heads = {int(m[1]): state[key] for key in state if (m := HEAD_KEY.fullmatch(key))}
    if not heads:
        raise ReferenceCheckpointError(f"{source}: no fc.heads.<i>.0.weight entries; not a CaRE release checkpoint")
    absent = sorted(set(range(max(heads) + 1)) - set(heads))
    if absent:
        raise ReferenceCheckpointError(
            f"{source}: classifier heads {sorted(heads)} are not numbered 0..{max(heads)} "
            f"(fc.heads.{absent[0]}.0.weight{' and others' if len(absent) > 1 else ''} missing: {absent})")
    flat = [i for i, head in heads.items() if head.dim() != 2]
    if flat:
        raise ReferenceCheckpointError(f"{source}: fc.heads.{flat[0]}.0.weight must be 2-D (classes, width), "
                                       f"got shape {tuple(heads[flat[0]].shape)}")
    return [heads[i].shape[0] for i in range(len(heads))]


def dataset_class_count(state: Mapping[str, Tensor]) -> int | None:
    """Rows of the release's unused timm head: the dataset's class count (None when absent)."""
    head = state.get(UNUSED_HEAD_KEYS[0])
    return head.shape[0] if head is not None and head.dim() == 2 else None


def describe(state: Mapping[str, Tensor]) -> dict[str, int | None]:
    """Blocks, width and adapter bottlenecks a release state dict implies (None: cannot tell)."""
    blocks = {int(m[1]) for key in state if (m := re.match(r"backbone\.blocks\.(\d+)\.", key))}
    shared = state.get(MOE_PREFIX.format(0) + "shared_adapter.down_proj.weight")
    expert = state.get(MOE_PREFIX.format(0) + "adapter.0.down_proj.weight")
    norm = state.get("backbone.norm.weight")
    return {
        "blocks": max(blocks) + 1 if blocks else None,
        "width": norm.shape[0] if norm is not None and norm.dim() == 1 else None,
        "adapter_dim": shared.shape[0] if shared is not None and shared.dim() == 2 else None,
        "expert_dim": expert.shape[0] if expert is not None and expert.dim() == 2 else None,
    }


# ---------------------------------------------------------------- checking a layout


def check_fits(state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], source: str,
               hints: list[str] = ()) -> None:
    """Every expected key present with its shape, nothing else (ignored / unused-head keys aside).

    Raises one error listing every missing, unexpected and mis-shaped key, grouped by the pattern
    they share across blocks.
    """
    present = {key for key in state if not is_ignored(key) and key not in UNUSED_HEAD_KEYS}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    misshaped = sorted(key for key in present & set(expected) if tuple(state[key].shape) != tuple(expected[key]))
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source} does not fit the configured CaRE model:"]
    for title, keys, describe_key in (
        ("missing", missing, lambda key: ""),
        ("unexpected", unexpected, lambda key: ""),
        ("mis-shaped", misshaped,
         lambda key: f": checkpoint {tuple(state[key].shape)} vs expected {tuple(expected[key])}"),
    ):
        if keys:
            lines.append(f"  {title} ({len(keys)} keys):")
            lines += [f"    {line}" for line in group_keys(keys, describe_key)]
    lines += [f"  hint: {hint}" for hint in hints]
    raise ReferenceCheckpointError("\n".join(lines))


_BLOCK_INDEX = re.compile(r"(?<=blocks\.)\d+|(?<=adapter_layer)\d+")


def group_keys(keys: list[str], detail: Callable[[str], str] = lambda key: "") -> list[str]:
    """Keys that differ only in their block index (and detail) as one line: `...blocks.*.x [blocks 0-11]`."""
    groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for key in keys:
        match = _BLOCK_INDEX.search(key)
        pattern = key if match is None else key[: match.start()] + "*" + key[match.end():]
        block = -1 if match is None else int(match.group())
        groups.setdefault((pattern, detail(key)), []).append((block, key))
    lines = []
    for (pattern, suffix), members in groups.items():
        if len(members) == 1:
            lines.append(members[0][1] + suffix)
        else:
            lines.append(f"{pattern}{suffix} [blocks {_ranges(sorted(b for b, _ in members))}]")
    return lines


def _ranges(numbers: list[int]) -> str:
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
