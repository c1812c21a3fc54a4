"""What the reference comparison scripts share: compiling part of an authors' class from their file, differences,
and carecl's training steps on fixed batches. Nothing here is imported by carecl or its tests."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import torch

from torch import nn

from carecl.engine.optim import build_optimizer, build_scheduler


def bare_class(path: Path, class_name: str, names: tuple[str, ...], namespace: dict, bases: str = "") -> type:
    """`class_name` with only the methods `names` (decorators kept), compiled from the authors' file into `namespace`
    (their modules import whole research trees; only the methods compared are taken, and nothing else runs)."""
    lines = path.read_text().splitlines()
    node = next(n for n in ast.parse("\n".join(lines)).body if isinstance(n, ast.ClassDef) and n.name == class_name)
    methods = [textwrap.dedent("\n".join(lines[min([m.lineno, *(d.lineno for d in m.decorator_list)]) - 1: m.end_lineno]))
               for m in node.body if isinstance(m, ast.FunctionDef) and m.name in names]
    body = "\n\n".join(textwrap.indent(m, "    ") for m in methods)
    exec(compile(f"class {class_name}({bases}):\n{body}\n", str(path), "exec"), namespace)
    return namespace[class_name]


def max_diff(a, b) -> float:
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


def train_ours(method, experiment, task, batches) -> list[float]:
    """carecl's training of `task`'s first phase on fixed batches, as the engine steps it; the losses."""
    phase = method.training_phases(task)[0]
    optimizer = build_optimizer(experiment.config.train, method.parameter_groups(phase), phase.lr)
    scheduler = build_scheduler(optimizer, phase)
    method.train()
    losses = []
    for _ in range(phase.epochs):
        for images, targets in batches:
            loss = method.training_loss(images, targets, task).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            method.after_optimizer_step(task)
            losses.append(loss.item())
        scheduler.step()
    return losses


class ClassData:
    """The PILOT-style data_manager.get_dataset for one class: (idx, image, label) items."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def get_dataset(self, classes, source, mode, ret_data=False):
        keep = torch.isin(self.labels, torch.as_tensor(classes))
        items = [(i, image, int(label)) for i, (image, label) in enumerate(zip(self.images[keep], self.labels[keep]))]
        return None, None, items


def task_data(task, generator, per_class: int, image_size: int, batch: int):
    """`per_class` random images of each of the task's classes with a little class signal, and shuffled batches."""
    labels = torch.arange(task.low, task.high).repeat_interleave(per_class)
    images = torch.rand(len(labels), 3, image_size, image_size, generator=generator)
    images += labels[:, None, None, None] * 0.05
    order = torch.randperm(len(labels), generator=generator)
    return images, labels, [(images[order[i:i + batch]], labels[order[i:i + batch]]) for i in range(0, len(labels), batch)]


def adapter_diff(ours: nn.ModuleList, theirs) -> float:
    """Largest difference between carecl's BottleneckAdapters and PILOT-style Adapters (down_proj / up_proj)."""
    return max(max(max_diff(o.down.weight, t.down_proj.weight), max_diff(o.down.bias, t.down_proj.bias),
                   max_diff(o.up.weight, t.up_proj.weight), max_diff(o.up.bias, t.up_proj.bias)) for o, t in zip(ours, theirs))


def load_pilot_vit(vit: nn.Module, timm_state: dict, width: int, extra: dict | None = None) -> nn.Module:
    """Load a timm ViT's weights into a PILOT-style ViT (q/k/v as three projections, `mlp.` dropped; the timm head
    left out), plus `extra` entries; only its adapters may stay unloaded."""
    state = {}
    for key, value in timm_state.items():
        if "qkv" in key:
            for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
                state[key.replace("qkv", name)] = value[index * width:(index + 1) * width]
        elif not key.startswith("head"):
            state[key.replace("mlp.", "")] = value
    state.update(extra or {})
    missing, unexpected = vit.load_state_dict(state, strict=False)
    assert not unexpected and all("adapter" in k for k in missing), (missing, unexpected)
    return vit
