"""What carecl knows about each benchmark's files: the folder it reads under `data.root`, where the archive comes
from, and the class and image counts it can check (`carecl data prepare / verify / download`)."""

from __future__ import annotations

from dataclasses import dataclass

from carecl.data.base import DatasetError


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    # The folder under data.root that carecl reads (`<root>/<folder>/{train,test}/<class>/`, or the CIFAR archive).
    folder: str
    source: str
    # Published counts (None: not stated in this project's sources; verify then records them in the manifest).
    classes: int | None = None
    train_images: int | None = None
    test_images: int | None = None
    # A Hugging Face dataset repository `carecl data download` can fetch.
    hub_repo: str | None = None
    # "folders": train/ and test/ trees of class folders; "cifar100": the python archive's pickles.
    layout: str = "folders"


PILOT_SOURCE = "LAMDA-PILOT's README (its Google Drive / OneDrive links to the prepared archive)"
CATALOG: dict[str, CatalogEntry] = {entry.name: entry for entry in (
    CatalogEntry("omnibenchmark1k", "omnibenchmark1k", "Hugging Face dataset LMMM2025/OmniBenchmark-1K (the CaRE release)",
                 1000, 168_718, 19_849, hub_repo="LMMM2025/OmniBenchmark-1K"),
    CatalogEntry("imagenet-r", "imagenet-r", PILOT_SOURCE, 200),
    CatalogEntry("imagenet-a", "imagenet-a", PILOT_SOURCE, 200),
    CatalogEntry("objectnet", "objectnet", PILOT_SOURCE, 200),
    CatalogEntry("omnibenchmark", "omnibenchmark", PILOT_SOURCE, 300),
    CatalogEntry("vtab", "vtab", PILOT_SOURCE, 50),
    CatalogEntry("cub", "cub", PILOT_SOURCE, 200),
    CatalogEntry("food101", "food101", "Food-101 (Bossard et al., 2014) in train/ and test/ class folders (MIN's benchmark; "
                 "its official split: 750 training and 250 test images per class)", 101, 75_750, 25_250),
    CatalogEntry("cifar100", "cifar-100-python", "the python version of CIFAR-100 (cifar-100-python.tar.gz)", 100,
                 50_000, 10_000, layout="cifar100"),
)}


def catalog_entry(name: str) -> CatalogEntry:
    if name not in CATALOG:
        raise DatasetError(f"carecl data: unknown dataset {name!r}; known: {', '.join(CATALOG)}")
    return CATALOG[name]
