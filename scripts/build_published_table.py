"""Write src/carecl/published/care_tables.yaml from the CaRE paper's Tables 1-3 as transcribed in
../shared/spec/results.md (Ā / A_last per method and split; ViT-B/16 IN-21K, seed 1993).

    python scripts/build_published_table.py [--results ../shared/spec/results.md]

Column titles such as "ImageNet-R 50 tasks (B0 Inc4)" give the dataset and split; row names are mapped to
carecl's method names where carecl has the method (others keep the paper's name and match no run).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATASETS = [("OmniBenchmark-1K", "omnibenchmark1k"), ("OmniBenchmark-V1", "omnibenchmark"), ("ObjectNet", "objectnet"),
            ("ImageNet-R", "imagenet-r"), ("ImageNet-A", "imagenet-a"), ("CIFAR-100", "cifar100"), ("VTAB", "vtab")]
METHODS = {"L2P": "l2p", "DualPrompt": "dualprompt", "CODA-Prompt": "coda_prompt", "EASE": "ease", "SSIAT": "ssiat",
           "APER-Adapter": "aper_adapter", "SEMA": "sema", "MoAL": "moal", "SLCA": "slca", "FeCAM": "fecam",
           "MOS": "mos", "CaRE": "care"}
TABLES = {"1.1": ("CaRE paper, Table 1", "OmniBenchmark-1K"), "1.2": ("CaRE paper, Table 2", None),
          "1.3": ("CaRE paper, Table 3", None)}


def column_split(title: str, default_dataset: str | None) -> tuple[str, int, int] | None:
    match = re.search(r"B(\d+) Inc(\d+)", title)
    if not match:
        return None
    dataset = next((name for label, name in DATASETS if label in title), None)
    if dataset is None and default_dataset is not None:
        dataset = dict(DATASETS)[default_dataset]
    base, increment = int(match.group(1)), int(match.group(2))
    return dataset, base or increment, increment


def cells(line: str) -> list[str]:
    return [cell.strip().strip("*") for cell in line.strip().strip("|").split("|")]


def parse(results: Path) -> list[dict]:
    rows, section, columns = [], None, []
    for line in results.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"### (1\.[123]) ", line)
        if heading:
            section, columns = heading.group(1), []
            continue
        if section not in TABLES or not line.startswith("|"):
            continue
        parts = cells(line)
        if parts[0] == "Method":
            columns = [column_split(title, TABLES[section][1]) for title in parts[1:]]
            continue
        if not columns or set(parts[0]) <= set("-: "):
            continue
        method = parts[0].strip("*")
        for split, value in zip(columns, parts[1:]):
            numbers = re.findall(r"\d+\.\d+", value)
            if split is None or len(numbers) != 2 or value.startswith("*"):
                continue
            dataset, init_cls, increment = split
            rows.append({"method": METHODS.get(method, method), "paper_name": method, "dataset": dataset,
                         "init_cls": init_cls, "increment": increment, "backbone": "vit_base_patch16_224.augreg_in21k",
                         "seed": 1993, "average_accuracy": float(numbers[0]), "a_last": float(numbers[1]),
                         "source": TABLES[section][0]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT.parent / "shared" / "spec" / "results.md")
    parser.add_argument("--output", type=Path, default=ROOT / "src" / "carecl" / "published" / "care_tables.yaml")
    args = parser.parse_args()
    rows = parse(args.results)
    header = ("# Published Ā / A_last of CaRE and its baselines (CaRE paper, Tables 1-3; ViT-B/16 IN-21K, seed 1993), as\n"
              "# transcribed in the project's spec. Written by scripts/build_published_table.py; `carecl compare` reads it.\n")
    args.output.write_text(header + yaml.safe_dump(rows, sort_keys=False, allow_unicode=True), encoding="utf-8")
    print(f"{len(rows)} rows -> {args.output}")


if __name__ == "__main__":
    main()
