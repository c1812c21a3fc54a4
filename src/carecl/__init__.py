"""carecl: class-incremental learning on frozen Vision Transformers (CaRE and its baselines).

`carecl.ContinualLearner` is loaded when first used, so `import carecl` stays light (no torch).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ContinualLearner"]


def __getattr__(name: str) -> Any:
    if name == "ContinualLearner":
        from carecl.learner import ContinualLearner

        return ContinualLearner
    raise AttributeError(f"module 'carecl' has no attribute {name!r}")
