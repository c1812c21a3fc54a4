"""BR-MoE: Bi-Level Routing Mixture-of-Experts adapters injected into a frozen timm ViT."""

from carecl.tuners.brmoe.adapter import Adapter, FoldedAdapter
from carecl.tuners.brmoe.config import BRMoEConfig
from carecl.tuners.brmoe.layer import BRMoELayer, RoutingRecord
from carecl.tuners.brmoe.model import BRMoEOutput, BRMoEViT

__all__ = ["Adapter", "BRMoEConfig", "BRMoELayer", "BRMoEOutput", "BRMoEViT", "FoldedAdapter", "RoutingRecord"]
