"""Folders for docs/learning-later.md's worked example, made from the real-data assets (no download):

    python benchmarks/realdata/practitioner.py [--cache DIR]

    <cache>/practitioner/week1/{train,test}/<5 clothing classes>/   what the shop photographed first
    <cache>/practitioner/week2/{train,test}/<3 more classes>/       what arrived a week later
    <cache>/practitioner/mixed/                                     4 test images of each of the 8 classes, unlabelled

Images are symbolic links to the Fashion-MNIST PNGs that assets.py wrote.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import assets  # noqa: E402

WEEK1 = ["fashion_0_tshirt_top", "fashion_1_trouser", "fashion_2_pullover", "fashion_3_dress", "fashion_4_coat"]
WEEK2 = ["fashion_5_sandal", "fashion_7_sneaker", "fashion_8_bag"]
MIXED_PER_CLASS = 4


def link_classes(source: Path, target: Path, classes: list[str]) -> None:
    for split in ("train", "test"):
        for name in classes:
            folder = target / split / name.split("_", 2)[-1]
            folder.mkdir(parents=True)
            for image in sorted((source / split / name).iterdir()):
                (folder / image.name).symlink_to(image)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=assets.default_cache())
    args = parser.parse_args()
    _, images = assets.build(args.cache)
    root = args.cache / "practitioner"
    if root.exists():
        shutil.rmtree(root)
    link_classes(images, root / "week1", WEEK1)
    link_classes(images, root / "week2", WEEK2)
    mixed = root / "mixed"
    mixed.mkdir()
    for name in WEEK1 + WEEK2:
        for image in sorted((images / "test" / name).iterdir())[-MIXED_PER_CLASS:]:
            (mixed / f"{name.split('_', 2)[-1]}_{image.name}").symlink_to(image)
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
