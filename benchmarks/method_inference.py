"""Task-free inference cost of each method vs the number of tasks T (ViT-B/16 shapes, random weights),
mirroring CaRE paper Table 6: trainable parameters per task (Pt), what the learner adds to the frozen
ViT after T tasks (Pa: parameters, and classifier tensors such as prototypes), and time per image.

    python benchmarks/method_inference.py                 # T in {10, 50, 100}, batch 2, 2 rounds
    python benchmarks/method_inference.py --quick         # T in {10}, one round

Each method is built as `carecl train` builds it (its registered class, its default options, 10 classes
per task), grown to T tasks by replaying `begin_task`, its learned tensors randomised, then timed on
`method.predict` (what evaluation calls) interleaved with the plain frozen ViT forward of the same images.
"""

from __future__ import annotations

import torch

import common

from carecl.config import config_from_dict  # noqa: E402  (common puts src/ on the path)
from carecl.methods.base import build_method  # noqa: E402
from carecl.scenario import Scenario  # noqa: E402

# The methods whose inference grows with T, and CaRE, whose single pass is built not to; `method:` options.
# CaRE's release default adds iterative prediction while T <= 61 (extra task-known forwards).
METHODS = {"care": {"name": "care", "iter_pred": False}, "care_iterative": {"name": "care"}, "ease": {"name": "ease"},
           "ssiat": {"name": "ssiat"}, "mos": {"name": "mos"}, "tuna": {"name": "tuna"}}
CLASSES = common.CLASSES_PER_TASK


def arguments():
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    parser.add_argument("--merge", action="store_true",
                        help="keep the other methods' rows of the saved results (same batch, tasks and threads)")
    parser.add_argument("--note", default=None, help="a remark on this call's rows, printed under the table")
    return parser.parse_args()


def grown_method(name: str, vit: torch.nn.Module, n_tasks: int) -> torch.nn.Module:
    config = config_from_dict({"data": {"dataset": "synthetic", "init_cls": CLASSES, "increment": CLASSES},
                               "backbone": {"name": common.VIT_B, "pretrained": False}, "method": dict(METHODS[name]),
                               "train": {"device": "cpu"}})
    scenario = Scenario.build(CLASSES * n_tasks, CLASSES, CLASSES, seed=0, shuffle=False)
    torch.manual_seed(n_tasks)
    method = build_method(config, vit, scenario)
    method.regrow(n_tasks, n_tasks)
    randomise_learned(method)
    return method.eval()


@torch.no_grad()
def randomise_learned(method: torch.nn.Module) -> None:
    """Fresh adapters add nothing and fresh classifiers are zeros: give every learned tensor random values."""
    generator = torch.Generator().manual_seed(0)
    frozen = {id(p) for module in method.backbone_modules() for p in module.parameters()}
    for tensor in [*method.parameters(), *method.buffers()]:
        if id(tensor) not in frozen and tensor.is_floating_point() and tensor.numel():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05 + (tensor != 0) * tensor)
    if hasattr(method, "model"):
        method.model.invalidate_caches()


def added_sizes(method: torch.nn.Module, n_tasks: int) -> dict[str, float]:
    """Millions of values: learned parameters, learned buffers (prototypes, statistics), trainable per task."""
    frozen = {id(p) for module in method.backbone_modules() for p in module.parameters()}
    parameters = sum(p.numel() for p in method.parameters() if id(p) not in frozen)
    learned = {id(p) for p in method.parameters()}
    buffers = sum(t.numel() for t in method.state_tensors().values() if id(t) not in learned)
    per_task = parameters / n_tasks
    return {"parameters_M": parameters / 1e6, "buffers_M": buffers / 1e6, "per_task_M": per_task / 1e6}


def measure(args, tasks: list[int], repeats: int) -> dict:
    vit = common.vit_b("cpu")
    images = common.images(args.batch, "cpu")
    rows = {}
    for name in args.methods:
        for n_tasks in tasks:
            common.progress(f"[method_inference] {name}, T = {n_tasks}")
            method = grown_method(name, vit, n_tasks)
            calls = {"plain": lambda: vit(images), "method": lambda predict=method.predict: predict(images)}
            with torch.inference_mode():
                timings = common.Interleaved().run(calls, "cpu", repeats, log=common.progress)
            rows[f"{name} {n_tasks}"] = {"method": name, "tasks": n_tasks, **added_sizes(method, n_tasks),
                                         "seconds_per_image": timings["method"] / args.batch,
                                         "plain_seconds_per_image": timings["plain"] / args.batch}
    return rows


def main() -> None:
    args = arguments()
    threads = common.set_threads(args.threads)
    tasks = args.tasks or ([10] if args.quick else [10, 50, 100])
    repeats = args.repeats or (1 if args.quick else 2)
    run = {"machine": common.machine("cpu"), "threads": threads, "batch": args.batch, "repeats": repeats,
           "tasks": tasks, "classes_per_task": CLASSES, "rows": measure(args, tasks, repeats)}
    if args.note:
        for row in run["rows"].values():
            row["note"] = args.note
    if args.merge:
        run = merged_with_saved(run)
    common.finish("method_inference", {"runs": [run]}, args)


def merged_with_saved(run: dict) -> dict:
    """`run`'s rows added to the saved run's, which must have been measured with the same settings."""
    saved = common.load("method_inference")
    if not saved:
        return run
    previous = saved["runs"][-1]
    settings = ("threads", "batch", "repeats", "tasks")
    if any(previous[key] != run[key] for key in settings):
        raise SystemExit(f"--merge: the saved results used other settings ({ {k: previous[k] for k in settings} })")
    if previous["machine"] != run["machine"]:  # the table's header names the earlier machine; say where these ran
        where = f"measured on {run['machine']['cpu']} ({run['machine']['cores']} cores), not on the machine named above"
        for row in run["rows"].values():
            row["note"] = f"{row['note']}; {where}" if row.get("note") else where
        run["machine"] = previous["machine"]
    rows = {**previous["rows"], **run["rows"]}
    order = {name: index for index, name in enumerate(METHODS)}
    run["rows"] = dict(sorted(rows.items(), key=lambda item: (order[item[1]["method"]], item[1]["tasks"])))
    run["merged_from"] = "rows of methods not measured in this call come from an earlier call with the same settings"
    return run


if __name__ == "__main__":
    main()
