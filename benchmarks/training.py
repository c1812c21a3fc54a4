"""CaRE training step vs the number of tasks T (ViT-B/16 shapes, random weights).

    python benchmarks/training.py            # T in {1, 10, 50, 100, 300}, batch 16
    python benchmarks/training.py --quick    # T in {1, 10, 50}, one round

One step = what the engine does per batch while learning the newest task: `CaRE.training_loss`
(task-known forward, cosine CE + per-block auxiliary losses, shared-adapter anchoring), backward,
SGD step over the trainable parameters. All T share one frozen ViT; steps are interleaved.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

import common
from carecl.config import config_from_dict
from carecl.methods.base import TaskContext
from carecl.methods.care import CaRE
from carecl.scenario import Scenario


def arguments():
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument("--batch", type=int, default=16, help="training batch (16 in most published settings)")
    return parser.parse_args()


def care_learner(vit, n_tasks: int, batch: int, device: str) -> CaRE:
    """A CaRE learner on `vit` that has grown T tasks and is about to train the newest one."""
    per_task = common.CLASSES_PER_TASK
    options = common.care_options()
    config = config_from_dict({
        "seed": 0,
        "data": {"dataset": "synthetic", "synthetic_classes": n_tasks * per_task, "init_cls": per_task,
                 "increment": per_task, "shuffle": False, "image_size": common.IMAGE_SIZE},
        "backbone": {"name": common.VIT_B, "pretrained": False},
        "train": {"batch_size": batch, "device": device, "progress": False},
        "method": {"name": "care", "brmoe": dataclasses.asdict(options.brmoe)},
    })
    scenario = Scenario.build(n_tasks * per_task, per_task, per_task, seed=0, shuffle=False)
    torch.manual_seed(n_tasks)
    method = CaRE(config, vit, scenario)
    method.regrow(n_tasks, n_tasks - 1)
    common.randomise_experts(method.model, seed=n_tasks)
    return method.to(device)


def training_step(method: CaRE, device: str, batch: int, amp: str):
    task = method.scenario.task(method.scenario.n_tasks - 1)
    context = TaskContext(task, method.scenario, torch.device(device), statistics_loader=lambda: None)
    method.begin_phase(method.training_phases(task)[0], context)  # anchors the shared adapters (task > 0)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device, enabled=device == "cuda" and amp == "fp16")
    images = common.images(batch, device)
    targets = torch.randint(task.low, task.high, (batch,), generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        method.train()
        with common.autocast(device, amp):
            loss = method.training_loss(images, targets, task).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def measure(device: str, args, tasks: list[int], repeats: int) -> dict:
    vit = common.vit_b(device)
    steps, trainable = {}, {}
    for n_tasks in tasks:
        method = care_learner(vit, n_tasks, args.batch, device)
        steps[n_tasks] = training_step(method, device, args.batch, args.amp)
        trainable[n_tasks] = sum(p.numel() for p in method.trainable_parameters())
        common.progress(f"[{device}] built CaRE with T={n_tasks}")
    calls = {f"T={t}": steps[t] for t in tasks}
    medians = common.Interleaved().run(calls, device, repeats, log=common.progress)
    return {"machine": common.machine(device), "precision": common.precision(device, args.amp), "repeats": repeats,
            "batch": args.batch, "tasks": tasks, "step_seconds": {t: medians[f"T={t}"] for t in tasks},
            "trainable_parameters": trainable}


def main() -> None:
    args = arguments()
    common.set_threads(args.threads)
    tasks = args.tasks or ([1, 10, 50] if args.quick else [1, 10, 50, 100, 300])
    repeats = args.repeats or (1 if args.quick else 3)
    runs = [measure(device, args, tasks, repeats) for device in common.devices(args.device)]
    common.finish("training", {"runs": runs}, args)


if __name__ == "__main__":
    sys.exit(main())
