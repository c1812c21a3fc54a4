"""`domains`: a multi-domain stream of a user's image folders (`data.domains`), each folder one task with its own
classes, in the order listed: the layout of multi-domain task-incremental learning (MTIL) on one's own data.

    data:
      dataset: domains
      domains:
        - {name: aircraft, root: ~/data/aircraft}                   # DIR/train/<class>/, DIR/test/<class>/
        - {name: pets, root: ~/data/pets, test_fraction: 0.2}      # or DIR/<class>/ split per class
          templates: ["a photo of a {}, a type of pet."]

Class ids run member by member (the first member's classes 0..n-1, then the next's), so each task's classes
are one member's; names are folder names (data.class_names_file renames them).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from carecl.config import DataConfig
from carecl.data.base import DATASETS, BenchmarkData, DatasetError, ImageSplit


def concatenate_members(name: str, members: list[BenchmarkData], member_names: list[str],
                        templates: list[list[str] | None]) -> BenchmarkData:
    """One benchmark whose class ids run member by member; each member becomes one task."""
    splits, offset = {"train": ([], []), "test": ([], [])}, 0
    for member in members:
        for split, (samples, targets) in splits.items():
            part = getattr(member, split)
            samples.extend(list(part.samples))
            targets.append(part.targets + offset)
        offset += member.n_classes
    train, test = (ImageSplit(samples, np.concatenate(targets)) for samples, targets in splits.values())
    class_names = [class_name for member in members for class_name in member.class_names]
    return BenchmarkData(name, class_names, train, test, task_sizes=[m.n_classes for m in members],
                         task_names=list(member_names), task_templates=list(templates))


@DATASETS.register("domains", "multi_domain")
def build_domains(cfg: DataConfig, image_size: int) -> BenchmarkData:
    if not cfg.domains:
        raise DatasetError("data.domains must list the members of dataset 'domains' (each {name, root})")
    members = []
    for index, domain in enumerate(cfg.domains):
        member_config = replace(cfg, dataset="imagefolder", root=domain.root, test_fraction=domain.test_fraction)
        try:
            members.append(DATASETS.get("imagefolder")(member_config, image_size))
        except DatasetError as error:
            raise DatasetError(f"data.domains[{index}] ({domain.name}): {error}") from None
    return concatenate_members("domains", members, [d.name for d in cfg.domains], [d.templates for d in cfg.domains])
