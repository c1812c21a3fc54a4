"""Features of a frozen network, computed once per distinct input image.

Methods on frozen features (SimpleCIL, linear probes, the prototype baselines) see the same test
images after every task and the same training images at statistics time: the backbone's output
for them never changes, so it is remembered, keyed by a digest of the input's pixels (which also
makes it independent of batch order and of which loader the image came from).
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import Tensor


def pixel_digest(image: Tensor) -> bytes:
    """A 128-bit digest of one input tensor's values, shape and dtype."""
    data = image.detach().contiguous().cpu()
    digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16)
    digest.update(repr((tuple(data.shape), str(data.dtype))).encode())
    return digest.digest()


class FeatureCache:
    """`cache(images)` = `compute(images)`, computing only the rows not seen before (in one batch)."""

    def __init__(self, compute: Callable[[Tensor], Tensor]) -> None:
        self.compute = compute
        self.store: dict[bytes, Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.store)

    def clear(self) -> None:
        self.store.clear()

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        keys = [pixel_digest(image) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self.store]
        if missing:
            computed = self.compute(images[missing]).detach()
            for index, features in zip(missing, computed):
                self.store.setdefault(keys[index], features.clone())
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return torch.stack([self.store[key] for key in keys]).to(images.device)
