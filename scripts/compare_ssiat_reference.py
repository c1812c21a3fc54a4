"""Compare carecl's SSIAT pieces with the authors' code (HAIV-Lab/SSIAT) on random inputs.

    git clone https://github.com/HAIV-Lab/SSIAT /tmp/ssiat_ref
    python scripts/compare_ssiat_reference.py --reference /tmp/ssiat_ref

Their whole learner cannot run here (it calls .cuda() and its training loader line names an undefined
`n8`), so the two steps that define the method are compared on the same inputs:
1. the semantic shift of old class means (their `BaseLearner.displacement`, numpy, σ = 4.0), against
   `carecl.methods.ssiat.semantic_shift`;
2. the CosFace loss (their `AngularPenaltySMLoss('cosface', s, m)`) against `SSIAT.training_loss`'s
   CE(s·(cos − m·onehot)).
Results go to benchmarks/results/ssiat_reference.json. Nothing here is imported by carecl or its tests.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from carecl.methods.ssiat import semantic_shift  # noqa: E402


def their_displacement(reference: Path):
    """`displacement` taken from their models/base.py (the module imports their whole tree)."""
    source = (reference / "models" / "base.py").read_text()
    learner = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef))
    method = next(node for node in learner.body if isinstance(node, ast.FunctionDef) and node.name == "displacement")
    namespace = {"np": np}
    exec(compile("class Learner:\n    " + ast.get_source_segment(source, method), str(reference / "models/base.py"), "exec"),
         namespace)
    return namespace["Learner"]().displacement


def compare(reference: Path) -> dict:
    sys.path.insert(0, str(reference))
    from utils.loss import AngularPenaltySMLoss  # the authors' module

    generator = torch.Generator().manual_seed(0)
    results = {}
    displacement = their_displacement(reference)
    for width, spread in ((16, 1.0), (384, 0.2)):  # their σ = 4 with features of two scales
        before = spread * torch.randn(50, width, generator=generator)
        after = before + 0.3 * spread * torch.randn(50, width, generator=generator)
        means = spread * torch.randn(6, width, generator=generator)
        theirs = displacement(before.numpy(), after.numpy(), means.numpy(), 4.0)
        ours = semantic_shift(before, after, means, 4.0).numpy()
        results[f"shift_width_{width}_max_abs_diff"] = float(np.abs(ours - theirs).max())
        results[f"shift_width_{width}_max_abs"] = float(np.abs(theirs).max())
    for margin in (0.0, 0.3):
        cosines = torch.rand(8, 5, generator=generator) * 2 - 1
        labels = torch.randint(0, 5, (8,), generator=generator)
        theirs = AngularPenaltySMLoss(loss_type="cosface", s=20.0, m=margin)(cosines, labels)
        ours = F.cross_entropy(20.0 * (cosines - margin * F.one_hot(labels, 5)), labels)
        results[f"cosface_margin_{margin}_abs_diff"] = abs(theirs.item() - ours.item())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of HAIV-Lab/SSIAT")
    args = parser.parse_args()
    results = compare(args.reference.resolve())
    path = ROOT / "benchmarks" / "results" / "ssiat_reference.json"
    path.write_text(json.dumps({"reference": "HAIV-Lab/SSIAT", "results": results}, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
