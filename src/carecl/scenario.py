"""Class order and task splits, compatible with LAMDA-PILOT (pure NumPy, no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from carecl.errors import CareclError


class ScenarioError(CareclError, ValueError):
    """The class order or task split cannot be built from the given settings."""


def class_order(n_classes: int, seed: int, shuffle: bool = True, explicit: Sequence[int] | None = None) -> np.ndarray:
    """The order in which original class ids are learned.

    With `shuffle`, exactly PILOT's `np.random.seed(seed); np.random.permutation(n)`, computed on
    a private legacy RandomState so the global NumPy RNG is left untouched.
    """
    if explicit is not None:
        order = np.asarray(explicit, dtype=np.int64)
        if sorted(order.tolist()) != list(range(n_classes)):
            raise ScenarioError(
                f"data.class_order must be a permutation of 0..{n_classes - 1}, "
                f"got {len(order)} entries"
            )
        return order
    if not shuffle:
        return np.arange(n_classes, dtype=np.int64)
    # RandomState(seed) draws the same stream as np.random.seed(seed) on the legacy global RNG.
    return np.random.RandomState(seed).permutation(n_classes).astype(np.int64)


def addition_task_sizes(n_classes: int, increment: int | None) -> list[int]:
    """Tasks of classes learned later: all `n_classes` at once, or `increment` at a time (a remainder last)."""
    step = n_classes if increment is None else increment
    return [min(step, n_classes - low) for low in range(0, n_classes, step)]


def label_map_for(order: np.ndarray) -> np.ndarray:
    """label_map[original_id] = position of that class in `order` (PILOT's `order.index(y)`)."""
    label_map = np.empty_like(order)
    label_map[order] = np.arange(len(order))
    return label_map


def task_sizes(n_classes: int, init_cls: int, increment: int) -> list[int]:
    """`init_cls` classes, then tasks of `increment` while they fit; a remainder is a last task."""
    if increment <= 0:
        raise ScenarioError(f"data.increment must be positive, got {increment}")
    if not 0 < init_cls <= n_classes:
        raise ScenarioError(f"data.init_cls={init_cls} must be in 1..{n_classes} (the dataset's class count)")
    sizes = [init_cls]
    remaining = n_classes - init_cls
    while remaining > 0:
        sizes.append(min(increment, remaining))
        remaining -= increment
    return sizes


@dataclass(frozen=True)
class Task:
    index: int
    low: int  # first class (position in the class order) of this task
    high: int  # one past its last class

    @property
    def size(self) -> int:
        return self.high - self.low


@dataclass(frozen=True)
class Scenario:
    """A class-incremental protocol: class order plus consecutive tasks over it."""

    order: np.ndarray
    sizes: tuple[int, ...]
    # Class names by original class id (text classifiers read them); empty: unknown.
    class_names: tuple[str, ...] = ()
    # A multi-domain stream's members, one per task: names and prompt templates (None: the method's).
    task_names: tuple[str, ...] = ()
    task_templates: tuple[tuple[str, ...] | None, ...] = ()

    @classmethod
    def build(
        cls,
        n_classes: int,
        init_cls: int,
        increment: int,
        seed: int,
        shuffle: bool = True,
        explicit_order: Sequence[int] | None = None,
        class_names: Sequence[str] = (),
        member_sizes: Sequence[int] | None = None,
        task_names: Sequence[str] = (),
        task_templates: Sequence[Sequence[str] | None] = (),
        appended_sizes: Sequence[int] = (),
    ) -> "Scenario":
        """Tasks of `init_cls` then `increment` classes in the (seeded) class order; a multi-domain stream
        (`member_sizes`) instead learns its members in turn, each one task, classes in id order.

        `appended_sizes`: tasks of classes learned after the stream (carecl learn): the last sum(appended_sizes)
        of the `n_classes` class ids, in id order, after the stream's own tasks, which are those of the first ids.
        """
        if appended_sizes:
            n_stream = n_classes - sum(appended_sizes)
            if n_stream <= 0 or min(appended_sizes) <= 0:
                raise ScenarioError(f"the {sum(appended_sizes)} classes learned later leave none of {n_classes} "
                                    "to the stream")
            base = cls.build(n_stream, init_cls, increment, seed, shuffle, explicit_order, class_names, member_sizes,
                             task_names, task_templates)
            later = np.arange(n_stream, n_classes, dtype=np.int64)
            return cls(order=np.concatenate([base.order, later]), sizes=base.sizes + tuple(appended_sizes),
                       class_names=tuple(class_names), task_names=base.task_names + tuple(
                           f"T{base.n_tasks + i + 1}" for i in range(len(appended_sizes))) if base.task_names else (),
                       task_templates=base.task_templates + (None,) * len(appended_sizes) if base.task_templates else ())
        if member_sizes is not None:
            if sum(member_sizes) != n_classes:
                raise ScenarioError(f"the members' {sum(member_sizes)} classes do not add up to {n_classes}")
            return cls(order=np.arange(n_classes, dtype=np.int64), sizes=tuple(member_sizes),
                       class_names=tuple(class_names), task_names=tuple(task_names),
                       task_templates=tuple(tuple(t) if t is not None else None for t in task_templates))
        order = class_order(n_classes, seed, shuffle, explicit_order)
        return cls(order=order, sizes=tuple(task_sizes(n_classes, init_cls, increment)), class_names=tuple(class_names))

    def task_name(self, index: int) -> str:
        return self.task_names[index] if self.task_names else f"T{index + 1}"

    def templates(self, index: int) -> tuple[str, ...] | None:
        """Task `index`'s own prompt templates (a multi-domain member's), or None."""
        return self.task_templates[index] if self.task_templates else None

    def names(self, low: int, high: int) -> list[str]:
        """Names of the classes at positions [low, high) of the class order (`class <id>` where unknown)."""
        ids = self.order[low:high].tolist()
        if not self.class_names:
            return [f"class {class_id}" for class_id in ids]
        return [self.class_names[class_id] for class_id in ids]

    @property
    def n_tasks(self) -> int:
        return len(self.sizes)

    @property
    def n_classes(self) -> int:
        return int(sum(self.sizes))

    @property
    def label_map(self) -> np.ndarray:
        return label_map_for(self.order)

    @property
    def boundaries(self) -> np.ndarray:
        """K_0 = 0, K_1, ..., K_T: task t holds classes [K_t, K_{t+1})."""
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def task(self, index: int) -> Task:
        bounds = self.boundaries
        return Task(index=index, low=int(bounds[index]), high=int(bounds[index + 1]))

    def tasks(self) -> list[Task]:
        return [self.task(i) for i in range(self.n_tasks)]

    def task_of_class(self) -> np.ndarray:
        """Task index of every class position 0..n_classes-1."""
        return np.repeat(np.arange(self.n_tasks), self.sizes)
