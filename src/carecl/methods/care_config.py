"""CaRE's options (kept apart from the learner so configs load without building models)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from carecl.alignment import AlignmentConfig
from carecl.tuners.brmoe.config import BRMoEConfig
from carecl.config import METHOD_CONFIGS, MethodConfig


@METHOD_CONFIGS.register("care")
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

    def brmoe(self) -> BRMoEConfig:
        return BRMoEConfig(**{f.name: getattr(self, f.name) for f in fields(BRMoEConfig)})
