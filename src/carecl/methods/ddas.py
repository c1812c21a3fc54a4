"""DDAS, MoE-Adapters4CL's Distribution Discriminative Auto-Selector: one autoencoder per task on frozen image
features; a test batch goes to the router of the task whose autoencoder reconstructs it best, or to the
unmodified CLIP when even that reconstruction error is above a threshold (or when the reference
autoencoder, trained on generic images such as TinyImageNet, wins).

    u = sigmoid(flatten(F(x)))            F: AlexNet's conv5 before its ReLU (the authors'), or CLIP's frozen image embedding
    AE(u) = sigmoid(W2 ReLU(W1 u + b1) + b2),   code size 100
    l_i = MSE(AE_i(u), u);  r = argmin_i l_i;  the frozen CLIP if l_r > threshold or r is the reference

The authors compare their whole bank of 12 autoencoders, the untrained ones included; carecl compares
the reference and the tasks learned so far. `decision: batch` takes one route per test batch (theirs:
each of their test batches holds one dataset); `sample` routes every image on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carecl.config import require
from carecl.methods.base import ParameterGroup, Phase, TaskContext
from carecl.scenario import Task

DDAS_PHASE = "ddas autoencoder"
# Reference autoencoder's index in the bank when there is one.
REFERENCE = 0


@dataclass
class DDASConfig:
    # alexnet: torchvision AlexNet's conv5 pre-activation (43,264 values at 224 px), the authors' features;
    # clip_image: the frozen CLIP image embedding (no extra weights; small, for tests and quick runs).
    features: Literal["alexnet", "clip_image"] = "alexnet"
    # torchvision's ImageNet AlexNet (alexnet-owt-7be5be79.pth); null: torchvision's download.
    alexnet_weights: str | None = None
    code_size: int = 100
    # Per task: optimiser steps (Adam, weight decay 1e-4), lr x 0.1 every 10 epochs (full-shot: 300 steps at 0.01).
    steps: int = 300
    lr: float = 0.01
    weight_decay: float = 1e-4
    # Reconstruction error above which the frozen CLIP answers (full-shot 0.0655; few-shot 0.06).
    threshold: float = 0.0655
    decision: Literal["batch", "sample"] = "batch"
    # Image folder (class sub-folders, e.g. TinyImageNet's train/) for the reference autoencoder; null: none.
    reference_root: str | None = None
    reference_steps: int = 1000

    def validate(self) -> None:
        require(self.code_size > 0, "code_size", f"must be positive, got {self.code_size}")
        require(self.steps > 0, "steps", f"must be positive, got {self.steps}")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(self.threshold > 0, "threshold", f"must be positive, got {self.threshold}")
        require(self.reference_steps > 0, "reference_steps", f"must be positive, got {self.reference_steps}")


class AutoEncoder(nn.Module):
    def __init__(self, width: int, code_size: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(width, code_size)
        self.decoder = nn.Linear(code_size, width)

    def forward(self, inputs: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(F.relu(self.encoder(inputs))))


class AlexNetConv5(nn.Module):
    """torchvision AlexNet's feature stack up to conv5, before its ReLU and max-pool (frozen)."""

    def __init__(self, weights: str | None) -> None:
        super().__init__()
        from torchvision.models import AlexNet_Weights, alexnet

        if weights is None:
            model = alexnet(weights=AlexNet_Weights.IMAGENET1K_V1)
        else:
            from carecl.backbones import read_state_dict, resolve_weights_path

            model = alexnet(weights=None)
            model.load_state_dict(read_state_dict(resolve_weights_path(weights)))
        self.layers = model.features[:-2].requires_grad_(False).eval()

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


class ClipImageFeatures(nn.Module):
    """The frozen CLIP's image embedding, computed with the image tower's injected branch stood aside."""

    def __init__(self, clip: nn.Module, image_injector: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self._injector = (image_injector,)  # not a submodule: the method owns it

    def forward(self, images: Tensor) -> Tensor:
        with self._injector[0].bypassed():
            return self.clip.encode_image(images)


def build_features(config: DDASConfig, clip: nn.Module, image_injector: nn.Module) -> nn.Module:
    return AlexNetConv5(config.alexnet_weights) if config.features == "alexnet" else ClipImageFeatures(clip, image_injector)


class DistributionSelector(nn.Module):
    """The autoencoder bank (`reference` first when configured, then one per task) and its routing rule."""

    def __init__(self, config: DDASConfig, features: nn.Module, image_size: int) -> None:
        super().__init__()
        self.config = config
        self.features = features
        with torch.no_grad():
            self.width = features(torch.zeros(1, 3, image_size, image_size)).numel()
        self.autoencoders = nn.ModuleList()
        self.has_reference = config.reference_root is not None
        if self.has_reference:
            self.autoencoders.append(AutoEncoder(self.width, config.code_size))

    @property
    def n_tasks(self) -> int:
        return len(self.autoencoders) - int(self.has_reference)

    def begin_task(self, task: Task) -> None:
        while self.n_tasks <= task.index:
            self.autoencoders.append(AutoEncoder(self.width, self.config.code_size))

    # ---- training the current task's autoencoder (a phase of the task) -----------------
    def phases(self) -> list[Phase]:
        config = self.config
        return [Phase(DDAS_PHASE, 1, config.lr, config.lr, 1, steps=config.steps, optimizer="adam",
                      schedule="tenfold_decay_every_10_epochs")]

    def parameter_groups(self) -> list[ParameterGroup]:
        return [ParameterGroup(list(self.autoencoders[-1].parameters()), weight_decay=self.config.weight_decay,
                               name="autoencoder")]

    def begin_phase(self, context: TaskContext, transform, batch_size: int, seed: int) -> None:
        """Before the first task's autoencoder: the reference one (`reference_root`), with the data's training transform."""
        if self.has_reference and context.task.index == 0:
            from carecl.methods.ddas_reference import train_reference_autoencoder

            train_reference_autoencoder(self, context, transform, batch_size, seed)

    @torch.no_grad()
    def inputs(self, images: Tensor) -> Tensor:
        return torch.sigmoid(self.features(images).flatten(1).float())

    def training_loss(self, images: Tensor, autoencoder: AutoEncoder | None = None) -> Tensor:
        inputs = self.inputs(images)
        return F.mse_loss((autoencoder or self.autoencoders[-1])(inputs), inputs)

    # ---- routing -----------------------------------------------------------------------
    @torch.no_grad()
    def errors(self, images: Tensor) -> Tensor:
        """(autoencoders, batch) mean squared reconstruction error of every image under every autoencoder."""
        inputs = self.inputs(images)
        return torch.stack([(autoencoder(inputs) - inputs).square().mean(dim=1) for autoencoder in self.autoencoders])

    @torch.no_grad()
    def route(self, images: Tensor) -> int | None:
        """The batch's task index (its router), or None for the frozen CLIP (`decision: batch`)."""
        errors = self.errors(images).mean(dim=1, keepdim=True)
        return self._decide(errors)[0]

    @torch.no_grad()
    def routes(self, images: Tensor) -> list[int | None]:
        """Each image's route (`decision: sample`)."""
        return self._decide(self.errors(images))

    def _decide(self, errors: Tensor) -> list[int | None]:
        if not len(self.autoencoders):
            return [None] * errors.shape[1]
        best, index = errors.min(dim=0)
        routes = []
        for error, chosen in zip(best.tolist(), index.tolist()):
            reference = self.has_reference and chosen == REFERENCE
            routes.append(None if error > self.config.threshold or reference else chosen - int(self.has_reference))
        return routes
