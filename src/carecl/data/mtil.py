"""`mtil`: the multi-domain task-incremental benchmark of ZSCL and MoE-Adapters4CL, eleven datasets learned one after
the other, each in its own label space, read by torchvision's dataset classes from their standard archives
under `data.root` (never downloaded; torchvision's layouts, e.g. `<root>/fgvc-aircraft-2013b`,
`<root>/caltech101/101_ObjectCategories`, `<root>/stanford_cars`, `<root>/SUN397`, `<root>/eurosat/2750`).

As the authors' `mtil/src/datasets/collections.py`: Aircraft trains on `train` (not trainval), Pets on
`trainval`; Caltech101, EuroSAT and SUN397 have no test split and are cut 80 / 20 by
`torch.utils.data.random_split` with a generator seeded 42 (the same permutation here); the other members
use their official splits. Class names are torchvision's with underscores turned into spaces (their
`process_labels`), unless `<root>/mtil_protocol.json` gives the authors' hand-written names and prompt
templates (`scripts/extract_mtil_protocol.py` writes it from their repository); without it every member
prompts "a photo of a {}.".

`data.dataset_order` orders the members: order I (default) is MTIL_ORDER_I, order II is ZSCL's
[cars, food, mnist, pets, flowers, sun397, aircraft, caltech101, dtd, eurosat, cifar100].
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from carecl.config import DataConfig
from carecl.data.base import DATASETS, BenchmarkData, DatasetError, ImageSplit
from carecl.data.domains import concatenate_members

log = logging.getLogger("carecl")

MTIL_ORDER_I = ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "pets", "cars",
                "sun397"]
MTIL_ORDER_II = [MTIL_ORDER_I[i] for i in (9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2)]
PROTOCOL_FILE = "mtil_protocol.json"
DEFAULT_TEMPLATE = "a photo of a {}."
# The authors' split of the members without a test set: random_split(80 / 20, generator seeded 42).
SPLIT_SEED, TRAIN_FRACTION = 42, 0.8


class DatasetItem:
    """One image of a torchvision dataset, loaded on demand (a sample of an ImageSplit's list)."""

    __slots__ = ("dataset", "index")

    def __init__(self, dataset: Any, index: int) -> None:
        self.dataset, self.index = dataset, index

    def load(self):
        image = self.dataset[self.index][0]
        return image.convert("RGB")


@dataclass(frozen=True)
class Member:
    """How to open one member: its torchvision class and keywords per split, and where its labels live."""

    opener: Callable[..., Any]
    train: dict[str, Any] | None  # keywords of the training split; None: one split cut 80 / 20
    test: dict[str, Any] | None
    labels: Callable[[Any], list[int]]
    classes: Callable[[Any], list[str]]


def _datasets():
    import torchvision.datasets as datasets

    return datasets


def _attribute(name: str) -> Callable[[Any], list]:
    return lambda dataset: list(getattr(dataset, name))


def _cars_labels(dataset) -> list[int]:
    return [label for _, label in dataset._samples]


def _flowers_classes(dataset) -> list[str]:
    return [f"flower {index}" for index in range(102)]  # torchvision names none; the protocol file does


def _digit_names(dataset) -> list[str]:
    return [name.replace("_", " ") for name in dataset.classes]


MEMBERS: dict[str, Member] = {
    "aircraft": Member(lambda **k: _datasets().FGVCAircraft(**k), {"split": "train"}, {"split": "test"},
                       _attribute("_labels"), _attribute("classes")),
    "caltech101": Member(lambda **k: _datasets().Caltech101(**k), None, None, _attribute("y"), _attribute("categories")),
    "cifar100": Member(lambda **k: _datasets().CIFAR100(**k), {"train": True}, {"train": False},
                       _attribute("targets"), _attribute("classes")),
    "dtd": Member(lambda **k: _datasets().DTD(**k), {"split": "train"}, {"split": "test"}, _attribute("_labels"),
                  _attribute("classes")),
    "eurosat": Member(lambda **k: _datasets().EuroSAT(**k), None, None, _attribute("targets"), _attribute("classes")),
    "flowers": Member(lambda **k: _datasets().Flowers102(**k), {"split": "train"}, {"split": "test"},
                      _attribute("_labels"), _flowers_classes),
    "food": Member(lambda **k: _datasets().Food101(**k), {"split": "train"}, {"split": "test"}, _attribute("_labels"),
                   _attribute("classes")),
    "mnist": Member(lambda **k: _datasets().MNIST(**k), {"train": True}, {"train": False},
                    lambda d: d.targets.tolist(), _digit_names),
    "pets": Member(lambda **k: _datasets().OxfordIIITPet(**k), {"split": "trainval"}, {"split": "test"},
                   _attribute("_labels"), _attribute("classes")),
    "cars": Member(lambda **k: _datasets().StanfordCars(**k), {"split": "train"}, {"split": "test"}, _cars_labels,
                   _attribute("classes")),
    "sun397": Member(lambda **k: _datasets().SUN397(**k), None, None, _attribute("_labels"), _attribute("classes")),
}


def open_member(name: str, root: Path, **keywords):
    try:
        return MEMBERS[name].opener(root=str(root), download=False, **keywords)
    except (RuntimeError, FileNotFoundError, OSError) as error:
        raise DatasetError(f"mtil member {name!r}: cannot read it under {root} ({error}); stage torchvision's "
                           "archive there (nothing is downloaded)") from None


def split_of(dataset, labels: list[int], indices) -> ImageSplit:
    return ImageSplit([DatasetItem(dataset, int(i)) for i in indices], np.asarray([labels[int(i)] for i in indices]))


def read_member(name: str, root: Path) -> tuple[ImageSplit, ImageSplit, list[str]]:
    member = MEMBERS[name]
    if member.train is None:
        whole = open_member(name, root)
        labels = member.labels(whole)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        cut = int(TRAIN_FRACTION * len(labels))
        return split_of(whole, labels, order[:cut]), split_of(whole, labels, order[cut:]), member.classes(whole)
    train, test = open_member(name, root, **member.train), open_member(name, root, **member.test)
    train_labels, test_labels = member.labels(train), member.labels(test)
    return (split_of(train, train_labels, range(len(train_labels))), split_of(test, test_labels, range(len(test_labels))),
            member.classes(train))


def display_name(name: str, member: str) -> str:
    """The authors' `process_labels`: underscores become spaces (EuroSAT's CamelCase is split too)."""
    name = name.replace("_", " ")
    return re.sub(r"(\w)([A-Z])", r"\1 \2", name) if member == "eurosat" else name


def read_protocol(root: Path) -> dict[str, dict[str, list[str]]]:
    path = root / PROTOCOL_FILE
    if not path.is_file():
        log.warning("mtil: %s not found: torchvision's class names and the template %r are used (the published "
                    "numbers need the authors' names and templates: scripts/extract_mtil_protocol.py)", path,
                    DEFAULT_TEMPLATE)
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetError(f"mtil: {path} is not valid JSON: {error}") from None


@DATASETS.register("mtil")
def build_mtil(cfg: DataConfig, image_size: int) -> BenchmarkData:
    if not cfg.root:
        raise DatasetError("data.root must be set for dataset 'mtil' (the folder holding the eleven archives)")
    root = Path(cfg.root).expanduser()
    order = list(cfg.dataset_order or MTIL_ORDER_I)
    unknown = sorted(set(order) - set(MEMBERS))
    if unknown:
        raise DatasetError(f"data.dataset_order: unknown mtil members {unknown}; known: {', '.join(MEMBERS)}")
    protocol = read_protocol(root)
    members, templates = [], []
    for name in order:
        train, test, classes = read_member(name, root)
        own = protocol.get(name, {})
        names = own.get("classnames") or [display_name(c, name) for c in classes]
        if len(names) != len(classes):
            raise DatasetError(f"mtil: {root / PROTOCOL_FILE} gives {len(names)} class names for {name}'s {len(classes)}")
        members.append(BenchmarkData(name, list(names), train, test))
        templates.append(own.get("templates") or [DEFAULT_TEMPLATE])
    return concatenate_members("mtil", members, order, templates)
