"""BR-MoE injected into an unmodified timm VisionTransformer (PEFT style, through hooks).

Per block, a pre-hook on `norm2` captures z_a = z + attn(norm1(z)) (norm2's input) and a
forward hook on the block adds BRMoE(z_a) to the block's output, giving
z' = z_a + mlp(norm2(z_a)) + BRMoE(z_a). The ViT's code, modules and state_dict stay as timm
made them; outside `BRMoEViT.forward` the hooks do nothing, so the ViT still runs plain.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from carecl.tuners.base import Injector, ParallelBranch, UnsupportedBackbone
from carecl.tuners.brmoe.config import BRMoEConfig
from carecl.tuners.brmoe.layer import BRMoELayer


@dataclass
class BRMoEOutput:
    # (B, C) CLS token after the ViT's final norm (fc_norm / head unused).
    features: Tensor
    # Task-known forwards only: per block, H_task(c_task) logits (B, n_task) for the auxiliary loss.
    perceptron_logits: list[Tensor] | None


@dataclass
class _ForwardState:
    task: int | None
    perceptron_logits: list[Tensor] = field(default_factory=list)


class BRMoEViT(Injector):
    """A frozen timm ViT with a BR-MoE layer per block (`layers[L]`), grown one task at a time.

    Per-task pieces are addressable by index: `layers.L.experts.i.*`, `layers.L.routers.i.*`,
    `layers.L.perceptrons.i.{0,1}.*`, `layers.L.shared.*`. A fresh model grown with the same
    `add_task` calls loads a saved state_dict exactly. Frozen parts are cached in stacked form;
    call `invalidate_caches()` after editing older tasks' parameters in place.
    """

    def __init__(self, vit: VisionTransformer, config: BRMoEConfig) -> None:
        super().__init__(vit)
        config.validate()
        if getattr(vit, "cls_token", None) is None:
            raise UnsupportedBackbone("backbone: CaRE's BR-MoE routes on the CLS token: the ViT must have one "
                                      "(backbone.model_kwargs.class_token: true)")
        self.config = config
        self.embed_dim: int = vit.embed_dim
        self.task_sizes: list[int] = []
        reference = next(vit.parameters())
        self.layers = nn.ModuleList(BRMoELayer(self.embed_dim, config) for _ in vit.blocks).to(
            reference.device, reference.dtype)
        self._state: _ForwardState | None = None
        ParallelBranch(self, self._branch)

    def _branch(self, index: int, block_input: Tensor) -> Tensor | None:
        """BRMoE(z_a) inside `forward`; nothing outside it, where the ViT runs plain."""
        state = self._state
        if state is None:
            return None
        moe, logits = self.layers[index](block_input, task=state.task)
        if logits is not None:
            state.perceptron_logits.append(logits)
        return moe

    @property
    def n_tasks(self) -> int:
        return len(self.task_sizes)

    def add_task(self, n_classes: int) -> None:
        """Every block: a new expert (mean-init rule), router R_t and perceptron H_t; older parts frozen."""
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes <= 0:
            raise ValueError(f"add_task: n_classes must be a positive integer, got {n_classes!r}")
        for layer in self.layers:
            layer.add_task(n_classes)
        self.task_sizes.append(n_classes)

    def forward(self, images: Tensor, task: int | None = None) -> BRMoEOutput:
        self._check_task(task)
        task = None if task is None else int(task)
        if self._state is not None:
            raise RuntimeError("BRMoEViT.forward is not re-entrant")
        self._state = _ForwardState(task)
        try:
            tokens = self.vit.forward_features(images)
            logits = self._state.perceptron_logits
        finally:
            self._state = None
        return BRMoEOutput(features=tokens[:, 0], perceptron_logits=None if task is None else logits)

    def _check_task(self, task: int | None) -> None:
        if self.n_tasks == 0:
            raise RuntimeError("BRMoEViT has no task yet: call add_task(n_classes) before forward")
        if task is not None and not (isinstance(task, numbers.Integral) and 0 <= task < self.n_tasks):
            raise ValueError(f"task must be None or an int in [0, {self.n_tasks}), got {task!r}")
        if self.vit.grad_checkpointing and torch.is_grad_enabled():
            raise RuntimeError("BRMoEViT does not support timm grad checkpointing (hooks would re-run outside forward)")

    # ---- anchoring and training ---------------------------------------------------------------
    def set_anchor(self) -> None:
        """Snapshot the shared adapters; training forwards then pull them towards it (µ)."""
        for layer in self.layers:
            layer.set_anchor()

    def clear_anchor(self) -> None:
        for layer in self.layers:
            layer.clear_anchor()

    def anchor_state(self) -> dict[str, Tensor]:
        """Every block's anchor, `layers.L.<shared parameter>` ({} when none is set): saved mid-phase."""
        return {f"layers.{index}.{name}": tensor for index, layer in enumerate(self.layers)
                for name, tensor in layer.anchor_state().items()}

    def load_anchor_state(self, state: dict[str, Tensor]) -> None:
        for index, layer in enumerate(self.layers):
            prefix = f"layers.{index}."
            layer.load_anchor_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Shared adapters and the current task's expert, router and perceptron of every block."""
        return [p for layer in self.layers for p in layer.trainable_parameters()]

    def invalidate_caches(self) -> None:
        """Call after editing frozen expert/router/perceptron parameters in place."""
        for layer in self.layers:
            layer.invalidate()

    def unload(self) -> VisionTransformer:
        """Remove the hooks and return the plain ViT."""
        return self.remove()
