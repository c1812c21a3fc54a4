"""BR-MoE: Bi-Level Routing Mixture-of-Experts adapters injected into a frozen timm ViT.

Attributes load lazily, so the torch-free options (`carecl.tuners.brmoe.config`) import without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Adapter": "adapter", "FoldedAdapter": "adapter", "BRMoEConfig": "config", "BRMoELayer": "layer",
    "RoutingRecord": "layer", "BRMoEOutput": "model", "BRMoEViT": "model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'carecl.tuners.brmoe' has no attribute {name!r}")
    return getattr(importlib.import_module(f"carecl.tuners.brmoe.{_EXPORTS[name]}"), name)
