"""BR-MoE: Bi-Level Routing Mixture-of-Experts adapters injected into a frozen timm ViT."""

from carecl.brmoe.adapter import Adapter, FoldedAdapter
from carecl.brmoe.config import BRMoEConfig
from carecl.brmoe.layer import BRMoELayer, RoutingRecord
from carecl.brmoe.model import BRMoEOutput, BRMoEViT

__all__ = ["Adapter", "BRMoEConfig", "BRMoELayer", "BRMoEOutput", "BRMoEViT", "FoldedAdapter", "RoutingRecord"]
