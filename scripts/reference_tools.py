"""What the reference comparison scripts share: compiling part of an authors' class from their file, differences,
and carecl's training steps on fixed batches. Nothing here is imported by carecl or its tests."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import torch

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
