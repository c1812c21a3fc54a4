"""Write `mtil_protocol.json` (the MTIL members' class names and prompt templates, as the authors prompt them) from a
checkout of JiazuoYu/MoE-Adapters4CL, for carecl's `mtil` dataset.

    python scripts/extract_mtil_protocol.py --reference /path/to/MoE-Adapters4CL --output DATA_ROOT/mtil_protocol.json

The names and templates are the authors' (their `mtil/src/datasets/collections.py` and `cifar10.py`); carecl
ships none of them. The script reads those files without running them (Python's ast): per dataset class,
the literal `self.classnames = [...]` list when there is one (Caltech101, EuroSAT, Flowers) and the
`self.templates = [lambda c: f"..."]` list turned into "{}" templates; CIFAR-100 takes the module's
`cifar10_template`. Members whose names come from the torchvision dataset keep carecl's reading of them.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
from pathlib import Path

# The authors' dataset class -> carecl's member name.
MEMBERS = {"Aircraft": "aircraft", "Caltech101": "caltech101", "CIFAR100": "cifar100", "DTD": "dtd",
           "EuroSAT": "eurosat", "Flowers": "flowers", "Food": "food", "MNIST": "mnist", "OxfordPet": "pets",
           "StanfordCars": "cars", "SUN397": "sun397"}


def read(reference: Path, relative: str) -> str:
    path = reference / relative
    if path.is_file():
        return path.read_text()
    return subprocess.run(["git", "-C", str(reference), "show", f"HEAD:{relative}"], check=True, capture_output=True,
                          text=True).stdout


def template_of(node: ast.AST) -> str:
    """`lambda c: f"a photo of a {c}."` -> "a photo of a {}." """
    if not (isinstance(node, ast.Lambda) and isinstance(node.body, ast.JoinedStr)):
        raise ValueError(f"not an f-string lambda: {ast.dump(node)[:80]}")
    parts = []
    for value in node.body.values:
        parts.append("{}" if isinstance(value, ast.FormattedValue) else value.value)
    return "".join(parts)


def self_assignments(cls: ast.ClassDef) -> dict[str, ast.AST]:
    found = {}
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                if not isinstance(found.get(target.attr), ast.List):  # a literal list wins over a computed one
                    found[target.attr] = node.value
    return found


def extract(reference: Path) -> dict[str, dict[str, list[str]]]:
    collections = ast.parse(read(reference, "mtil/src/datasets/collections.py"))
    cifar = ast.parse(read(reference, "mtil/src/datasets/cifar10.py"))
    cifar_templates = next(node.value for node in cifar.body if isinstance(node, ast.Assign)
                           and getattr(node.targets[0], "id", None) == "cifar10_template")
    protocol = {}
    for cls in (node for node in collections.body if isinstance(node, ast.ClassDef) and node.name in MEMBERS):
        assigned = self_assignments(cls)
        entry = {}
        names = assigned.get("classnames")
        if isinstance(names, ast.List) and all(isinstance(e, ast.Constant) for e in names.elts):
            entry["classnames"] = [e.value for e in names.elts]
        templates = assigned.get("templates")
        if isinstance(templates, ast.List):
            entry["templates"] = [template_of(e) for e in templates.elts]
        protocol[MEMBERS[cls.name]] = entry
    protocol.setdefault("cifar100", {})["templates"] = [template_of(e) for e in cifar_templates.elts]
    missing = sorted(set(MEMBERS.values()) - set(protocol))
    if missing:
        raise SystemExit(f"not found in their collections.py: {missing}")
    return protocol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout (or bare mirror) of JiazuoYu/MoE-Adapters4CL")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    protocol = extract(args.reference)
    args.output.write_text(json.dumps(protocol, indent=1) + "\n")
    for name, entry in protocol.items():
        print(f"{name}: {len(entry.get('classnames', []))} names, {len(entry.get('templates', []))} templates")


if __name__ == "__main__":
    main()
