"""`carecl compare`: runs (or seed groups) next to the published numbers of the same method on the same dataset,
with the difference, and a flag wherever the run's protocol (split, backbone weights, seed) is not the
published row's."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from carecl.config import ConfigError, load_config
from carecl.data.base import DatasetError, canonical_dataset
from carecl.formatting import format_number
from carecl.published import PublishedRow, published_rows
from carecl.report.groups import expand_groups, load_groups
from carecl.report.runs import ReportedRun, load_run
from carecl.runs.directory import CONFIG_FILE
from carecl.runs.group import MeanStd


@dataclass(frozen=True)
class Protocol:
    method: str
    dataset: str
    init_cls: int
    increment: int
    backbone: str
    seeds: tuple[int, ...]

    def differences(self, row: PublishedRow) -> list[str]:
        flags = []
        if (self.init_cls, self.increment) != (row.init_cls, row.increment):
            flags.append(f"split {split_name(self.init_cls, self.increment)} ≠ {row.split}")
        if self.backbone.removeprefix("timm/") != row.backbone:
            flags.append(f"backbone {self.backbone} ≠ {row.backbone}")
        if self.seeds != row.seeds:
            flags.append(f"seed {', '.join(map(str, self.seeds))} ≠ {', '.join(map(str, row.seeds))}")
        return flags


def split_name(init_cls: int, increment: int) -> str:
    return f"B{0 if init_cls == increment else init_cls} Inc{increment}"


def protocol_of(run_dir: Path, seeds: tuple[int, ...]) -> Protocol:
    config = load_config(run_dir / CONFIG_FILE)
    try:
        dataset = canonical_dataset(config.data)
    except DatasetError:  # an unknown dataset name simply matches no published row
        dataset = config.data.dataset
    first = config.data.init_cls if config.data.init_cls is not None else config.data.increment
    return Protocol(config.method.name, dataset, first, config.data.increment, config.backbone.name, seeds)


@dataclass(frozen=True)
class Comparison:
    label: str
    path: Path
    protocol: Protocol
    average: MeanStd
    a_last: MeanStd
    row: PublishedRow | None
    flags: tuple[str, ...]

    def cells(self) -> list[str]:
        row = self.row
        if row is None:
            return [self.label, self.average.format(), self.a_last.format(), "–", "–", "–", "–",
                    f"no published row for {self.protocol.method} on {self.protocol.dataset}"]
        return [self.label, self.average.format(), self.a_last.format(),
                f"{row.average_accuracy:.2f} / {row.a_last:.2f}", _delta(self.average, row.average_accuracy),
                _delta(self.a_last, row.a_last), f"{row.source} ({row.paper_name}, {row.dataset} {row.split})",
                "; ".join(self.flags) or "matches"]


def _delta(ours: MeanStd, published: float) -> str:
    return "–" if ours.n == 0 else f"{ours.mean - published:+.2f}"


def best_row(protocol: Protocol, rows: Sequence[PublishedRow]) -> PublishedRow | None:
    """The published row of the same method and dataset with the fewest protocol differences (the authors' own
    numbers before CaRE's table on a tie)."""
    candidates = [row for row in rows if row.method == protocol.method and row.dataset == protocol.dataset]
    return min(candidates, key=lambda row: (len(protocol.differences(row)), row.source.startswith("CaRE")), default=None)


def compare(paths: Sequence[str | Path], rows: Sequence[PublishedRow] | None = None) -> list[Comparison]:
    rows = published_rows() if rows is None else rows
    run_paths, groups = expand_groups(paths)
    in_groups = {member.resolve() for _, members in groups for member in members}
    runs = [load_run(path) for path in run_paths]
    items: list[tuple[str, Path, list[ReportedRun]]] = [(run.label + f" · seed {run.settings.seed}", run.path, [run])
                                                        for run in runs if run.path.resolve() not in in_groups]
    items += [(group.label, group.path, list(group.runs)) for group in load_groups(groups, runs)]
    comparisons = []
    for label, path, members in items:
        try:
            protocol = protocol_of(members[0].path, tuple(run.settings.seed for run in members))
        except ConfigError as error:
            raise ConfigError(f"{members[0].path / CONFIG_FILE}: {error}") from None
        row = best_row(protocol, rows)
        flags = tuple(protocol.differences(row)) if row is not None else ()
        comparisons.append(Comparison(label, path, protocol, MeanStd.of([r.average_accuracy for r in members]),
                                      MeanStd.of([r.a_last for r in members]), row, flags))
    return comparisons


HEADER = ["run", "Ā (%)", "A_last (%)", "published Ā / A_last", "Δ Ā", "Δ A_last", "published row", "protocol"]


def comparison_markdown(comparisons: Sequence[Comparison]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|---|---:|---:|---:|---:|---:|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in item.cells()) + " |" for item in comparisons]
    return "\n".join(lines)


def comparison_csv(comparisons: Sequence[Comparison]) -> str:
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["run", "run_dir", "average_accuracy", "average_std", "a_last", "a_last_std", "published_average",
                     "published_a_last", "source", "protocol_differences"])
    for item in comparisons:
        row = item.row
        writer.writerow([item.label, str(item.path), format_number(item.average.mean, ".4f"),
                         format_number(item.average.std, ".4f"), format_number(item.a_last.mean, ".4f"),
                         format_number(item.a_last.std, ".4f"), row.average_accuracy if row else "",
                         row.a_last if row else "", row.source if row else "", "; ".join(item.flags)])
    return stream.getvalue()
