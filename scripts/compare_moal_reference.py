"""Compare carecl's MoAL analytic head with the authors' code (Zi-Jian-Gao/Moal) on random features.

    python scripts/compare_moal_reference.py --reference /path/to/Moal

The authors' Learner methods `optimise_ridge_parameter`, `cls_align`, `IL_align`, `cali_weight`,
`_compute_relations` and `_build_feature_set`'s pseudo-feature rule are read from
`Moal/models/adapt_ac_com_sdc_EMA_auto.py` (their source, compiled on its own: the rest of their package is
not imported) and run on a stand-in learner whose network returns the given features, with carecl's random
buffer as their `ac_model.fc[0]`. The same features, labels and batches go to carecl's `first_analytic_fit`,
`rls_update` (through `MoAL.update_analytic_head`) and `rumination_set`. Reported: the largest differences
of R and W after the first task, after a second task's recursive update, and after rumination on the
mistakes; and whether the pseudo-features agree. Results go to benchmarks/results/moal_reference.json.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from carecl.classifiers import one_hot  # noqa: E402
from carecl.methods.moal import MoAL, first_analytic_fit, rumination_set  # noqa: E402
from carecl.scenario import Task  # noqa: E402

WIDTH, HIDDEN, PER_CLASS = 16, 40, 24
METHODS = ("optimise_ridge_parameter", "cls_align", "IL_align", "cali_weight", "_compute_relations")


def their_methods(reference: Path) -> dict:
    relative = "Moal/models/adapt_ac_com_sdc_EMA_auto.py"
    path = reference / relative
    source = path.read_text() if path.is_file() else subprocess.run(
        ["git", "-C", str(reference), "show", f"HEAD:{relative}"], check=True, capture_output=True, text=True).stdout
    learner = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Learner")
    functions = [n for n in learner.body if isinstance(n, ast.FunctionDef) and n.name in METHODS]
    namespace = {"torch": torch, "np": np, "F": F, "copy": copy, "logging": types.SimpleNamespace(info=print),
                 "tqdm": lambda iterable, **kwargs: iterable, "target2onehot": lambda y, n: F.one_hot(y.long(), n).float()}
    exec(compile(ast.Module(body=functions, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return {name: namespace[name] for name in METHODS}


class StandIn(nn.Module):
    """Their network as their alignment code reads it: `model(x)["features"]` and `model.ac_model.fc`."""

    def __init__(self, buffer: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.ac_model = types.SimpleNamespace(fc=nn.Sequential(nn.Linear(WIDTH, HIDDEN, bias=False), nn.ReLU(),
                                                                nn.Linear(HIDDEN, classes, bias=False)))
        self.ac_model.fc[0].weight.data = buffer.clone()

    def forward(self, features):
        return {"features": features}


def batches(features, labels, size):
    return [(None, features[i:i + size], labels[i:i + size]) for i in range(0, len(labels), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout (or bare mirror) of Zi-Jian-Gao/Moal")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "moal_reference.json")
    args = parser.parse_args()
    theirs = their_methods(args.reference)
    generator = torch.Generator().manual_seed(0)
    buffer = torch.randn(HIDDEN, WIDTH, generator=generator) / WIDTH ** 0.5
    centres = torch.randn(4, WIDTH, generator=generator) * 0.6
    labels = torch.arange(4).repeat_interleave(PER_CLASS)
    features = centres[labels] + torch.randn(len(labels), WIDTH, generator=generator)
    order = torch.randperm(len(labels), generator=generator)
    features, labels = features[order], labels[order]
    first, second = labels < 2, labels >= 2
    if not hasattr(np, "mat"):
        np.mat = np.asmatrix  # their code predates NumPy 2, which removed the alias
    learner = types.SimpleNamespace(_device="cpu", _total_classes=2, R=None)
    for name, function in theirs.items():
        setattr(learner, name, types.MethodType(function, learner))
    model = StandIn(buffer, 2)
    expand = lambda x: F.relu(x @ buffer.T)  # noqa: E731

    # Task 1: their cls_align against carecl's first fit, on the same rows in the same order.
    learner.cls_align(batches(features[first], labels[first], 16), model)
    mine_r, mine_w = first_analytic_fit(expand(features[first]), one_hot(labels[first], 2, torch.float32), 0.9)
    results = {"reference": "Zi-Jian-Gao/Moal",
               "first_task_R_max_rel_diff": ((mine_r - learner.R).abs().max() / learner.R.abs().max()).item(),
               "first_task_W_max_rel_diff": ((mine_w - model.ac_model.fc[-1].weight.T).abs().max()
                                             / mine_w.abs().max()).item()}

    # Task 2: the head grows by zero rows; their IL_align against carecl's recursive update.
    learner._total_classes = 4
    grown = nn.Linear(HIDDEN, 4, bias=False)
    grown.weight.data = torch.cat([model.ac_model.fc[-1].weight.data, torch.zeros(2, HIDDEN)])
    model.ac_model.fc[-1] = grown
    learner.IL_align(batches(features[second], labels[second], 16), model)
    # carecl's own MoAL.update_analytic_head, run on a stand-in that holds its head and random buffer.
    head = types.SimpleNamespace(expand=expand, analytic_inverse=mine_r,
                                 analytic_weight=torch.cat([mine_w, torch.zeros(HIDDEN, 2)], dim=1))
    MoAL.update_analytic_head(head, [(x, y) for _, x, y in batches(features[second], labels[second], 16)], Task(1, 2, 4))
    r, w = head.analytic_inverse, head.analytic_weight
    results["second_task_R_max_rel_diff"] = ((r - learner.R).abs().max() / learner.R.abs().max()).item()
    results["second_task_W_max_rel_diff"] = ((w - model.ac_model.fc[-1].weight.T).abs().max() / w.abs().max()).item()

    # Rumination: pseudo-features of the old classes, then RLS on the mistakes only (their cali_weight).
    means = torch.stack([features[labels == c].mean(0) for c in range(4)])
    learner._known_classes, learner._means = 2, [m.numpy() for m in means]
    learner._compute_relations()
    task = Task(1, 2, 4)
    ours_features, ours_labels = rumination_set(features[second], labels[second], means, task)
    theirs_pseudo = [features[second][labels[second] == n] - means[n] + means[c]
                     for c, n in enumerate(learner._relations.tolist())]
    n_new = len(ours_features) - sum(len(p) for p in theirs_pseudo)
    results["pseudo_features_max_abs_diff"] = (ours_features[n_new:] - torch.cat(theirs_pseudo)).abs().max().item()
    learner.cali_weight([(None, ours_features[i:i + 16], ours_labels[i:i + 16]) for i in range(0, len(ours_labels), 16)], model)
    judged = [(ours_features[i:i + 16], ours_labels[i:i + 16]) for i in range(0, len(ours_labels), 16)]
    mistakes = sum(int(((expand(x) @ w).argmax(dim=1) != y).sum()) for x, y in judged)
    MoAL.update_analytic_head(head, judged, task, wrong_only=True)
    w = head.analytic_weight
    results["rumination_mistakes_learned_from"] = mistakes
    results["rumination_W_max_rel_diff"] = ((w - model.ac_model.fc[-1].weight.T).abs().max() / w.abs().max()).item()
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
