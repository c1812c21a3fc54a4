"""CaRE's iterative prediction (`iter_pred`) vs the number of tasks T, against the single pass.

    python benchmarks/iterative.py            # T in {1, 10, 30, 60}, batch 4
    python benchmarks/iterative.py --quick    # T in {1, 5}, one round

`CaRE.iterative_scores` runs one task-known forward per learned task plus the task-free one, so
its cost is linear in T by design; the release uses it up to 60 tasks (`iter_pred_max_tasks`).
Each T is timed against `CaRE.logits` (the task-free single pass) of the same learner.
"""

from __future__ import annotations

import sys

import torch

import common
from training import care_learner


def arguments():
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument("--batch", type=int, default=4)
    return parser.parse_args()


def measure(device: str, args, tasks: list[int], repeats: int) -> dict:
    vit = common.vit_b(device)
    x = common.images(args.batch, device)
    calls = {}
    for n_tasks in tasks:
        method = care_learner(vit, n_tasks, args.batch, device).eval()
        method.regrow(0, n_tasks)  # grown already: count every task as learned

        def single(method=method):
            with torch.inference_mode(), common.autocast(device, args.amp):
                return method.logits(x)

        def iterative(method=method):
            with torch.inference_mode(), common.autocast(device, args.amp):
                return method.iterative_scores(x)
        single()  # builds the folded tables; task-known forwards read the same ones
        calls[f"single {n_tasks}"], calls[f"iterative {n_tasks}"] = single, iterative
        common.progress(f"[{device}] built CaRE with T={n_tasks}")
    medians = common.Interleaved().run(calls, device, repeats, warmup=0, log=common.progress)
    return {"machine": common.machine(device), "precision": common.precision(device, args.amp), "repeats": repeats,
            "batch": args.batch, "tasks": tasks,
            "single_seconds": {t: medians[f"single {t}"] for t in tasks},
            "iterative_seconds": {t: medians[f"iterative {t}"] for t in tasks}}


def main() -> None:
    args = arguments()
    common.set_threads(args.threads)
    tasks = args.tasks or ([1, 5] if args.quick else [1, 10, 30, 60])
    repeats = args.repeats or (1 if args.quick else 2)
    runs = [measure(device, args, tasks, repeats) for device in common.devices(args.device)]
    common.finish("iterative", {"runs": runs}, args)


if __name__ == "__main__":
    sys.exit(main())
