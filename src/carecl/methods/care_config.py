"""CaRE's options: torch-free, kept apart from the learner (methods/care.py registers both)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from carecl.alignment_config import AlignmentConfig
from carecl.config import MethodConfig, require
from carecl.tuners.brmoe.config import BRMoEConfig


@dataclass
class CareConfig(BRMoEConfig, MethodConfig):
    """CaRE's options: the BR-MoE fields (adapter_dim ... anchor_momentum) plus the learner's."""

    name: str = "care"
    # τ: cosine logits are multiplied by it in every loss.
    scale: float = 20.0
    aux_cos_loss: bool = True
    self_dist_loss: bool = True
    iter_pred: bool = True
    # Iterative prediction is used while at most this many tasks are learned (the release: task index <= 60).
    iter_pred_max_tasks: int = 61
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)

    def validate(self) -> None:
        BRMoEConfig.validate(self)
        require(self.scale > 0, "scale", f"must be positive, got {self.scale}")
        require(self.iter_pred_max_tasks >= 0, "iter_pred_max_tasks", f"must be >= 0, got {self.iter_pred_max_tasks}")

    def brmoe(self) -> BRMoEConfig:
        return BRMoEConfig(**{f.name: getattr(self, f.name) for f in fields(BRMoEConfig)})
