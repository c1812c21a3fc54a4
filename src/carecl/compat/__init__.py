"""Compatibility with the CaRE release (github LMMMEng/CaRE): its checkpoints in, carecl runs out.

    from carecl.compat import load_reference
    learner = load_reference("checkpoint.pth", "exps/care_inr.json")

Attributes load lazily so that `carecl --help` does not import torch and timm.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ReferenceCheckpointError": "carecl.compat.reference_layout",
    "load_reference": "carecl.compat.reference",
    "import_reference": "carecl.compat.reference",
    "export_reference": "carecl.compat.reference",
    "write_reference_checkpoint": "carecl.compat.reference",
    "read_reference_checkpoint": "carecl.compat.reference",
}

__all__ = [
    "ReferenceCheckpointError", "export_reference", "import_reference", "load_reference",
    "read_reference_checkpoint", "write_reference_checkpoint",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'carecl.compat' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
