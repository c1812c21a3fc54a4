"""TinyImageNet-200 (the MoE-Adapters4CL CIL benchmark, and DDAS's reference images), read from the official
archive's folder `<data.root>/tiny-imagenet-200/` (or `data.root` itself when it is that folder):

    wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG + val/val_annotations.txt

The 200 classes are numbered by sorted wnid (as continuum's TinyImageNet200, whose ids the authors' class
order refers to); the validation images are the test split. Names: the first synonym in words.txt
(data.class_names_file replaces them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carecl.config import DataConfig
from carecl.data.base import DATASETS, BenchmarkData, DatasetError, ImageSplit
from carecl.data.imagefolder import list_images

FOLDER = "tiny-imagenet-200"


def tinyimagenet_folder(root: str | None) -> Path:
    if not root:
        raise DatasetError(f"data.root must be set for dataset 'tinyimagenet' (the folder holding {FOLDER}/)")
    base = Path(root).expanduser()
    folder = base if (base / "wnids.txt").is_file() else base / FOLDER
    for required in ("wnids.txt", "train", "val/val_annotations.txt"):
        if not (folder / required).exists():
            raise DatasetError(f"TinyImageNet: {folder / required} not found (expected the {FOLDER} archive's layout)")
    return folder


def synonyms(folder: Path) -> dict[str, str]:
    words = folder / "words.txt"
    if not words.is_file():
        return {}
    entries = (line.split("\t", 1) for line in words.read_text(encoding="utf-8").splitlines() if "\t" in line)
    return {wnid: names.split(",")[0].strip() for wnid, names in entries}


@DATASETS.register("tinyimagenet", "tiny_imagenet", "tinyimagenet200")
def build_tinyimagenet(cfg: DataConfig, image_size: int) -> BenchmarkData:
    folder = tinyimagenet_folder(cfg.root)
    wnids = sorted(line.strip() for line in (folder / "wnids.txt").read_text().splitlines() if line.strip())
    index = {wnid: i for i, wnid in enumerate(wnids)}
    train_paths, train_targets = [], []
    for wnid in wnids:
        images = list_images(str(folder / "train" / wnid))
        if not images:
            raise DatasetError(f"TinyImageNet: no training images under {folder / 'train' / wnid}")
        train_paths.extend(images)
        train_targets.extend([index[wnid]] * len(images))
    test_paths, test_targets = [], []
    for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[1] in index:
            test_paths.append(str(folder / "val" / "images" / fields[0]))
            test_targets.append(index[fields[1]])
    names = synonyms(folder)
    return BenchmarkData("tinyimagenet", [names.get(wnid, wnid) for wnid in wnids],
                         ImageSplit(train_paths, np.asarray(train_targets)), ImageSplit(test_paths, np.asarray(test_targets)))
