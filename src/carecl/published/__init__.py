"""Published accuracies (data files in this folder) and their lookup: `carecl compare` sets runs next to them.

Each row: method (carecl's name), dataset (carecl's canonical name), init_cls / increment, backbone (timm name),
seed, Ā and A_last in %, and the source (paper and table).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import yaml


@dataclass(frozen=True)
class PublishedRow:
    method: str
    paper_name: str
    dataset: str
    init_cls: int
    increment: int
    backbone: str
    # One seed, or the seeds a published mean is over.
    seed: int | list[int]
    average_accuracy: float
    a_last: float
    source: str

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.seed) if isinstance(self.seed, list) else (self.seed,)

    @property
    def split(self) -> str:
        return f"B{0 if self.init_cls == self.increment else self.init_cls} Inc{self.increment}"


def published_rows() -> list[PublishedRow]:
    """Every row of every data file in carecl/published/."""
    rows = []
    for entry in sorted(resources.files("carecl.published").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            rows.extend(PublishedRow(**row) for row in yaml.safe_load(entry.read_text(encoding="utf-8")) or [])
    return rows
