"""Task-free inference vs the number of tasks T (ViT-B/16 shapes, random weights).

    python benchmarks/inference.py            # T in {1, 10, 50, 100, 300}, batch 4 and 32
    python benchmarks/inference.py --quick    # T in {1, 10, 50}, batch 4, one round

Times, in one process and interleaved: the plain frozen timm ViT forward, carecl's sparse
BR-MoE forward for every T, and the dense formulation (benchmarks/dense.py) for T <= 50.
Peak memory: one fresh interpreter per configuration (see common.peak_extra_bytes).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import common
from dense import DenseBRMoE

SCRIPT = common.ROOT / "benchmarks" / "inference.py"


def arguments():
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument("--dense-max-tasks", type=int, default=50)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-tasks", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--probe-dense", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def forward_call(fn, x, device: str, amp: str):
    def call():
        with torch.inference_mode(), common.autocast(device, amp):
            return fn(x)
    return call


# ---------------------------------------------------------------- one configuration per process


def probe(args) -> dict:
    """Peak extra memory of one forward per batch size, in this fresh process: the plain ViT
    (--probe-tasks 0) or carecl with T tasks, and then the dense formulation of the same model."""
    common.set_threads(args.threads)
    vit = common.vit_b("cpu")
    models = {"plain": vit}
    if args.probe_tasks > 0:
        sparse, _ = common.brmoe_vit_b(vit, args.probe_tasks)
        models = {"sparse": sparse, **({"dense": DenseBRMoE(sparse)} if args.probe_dense else {})}
    answer = {}
    for kind, model in models.items():
        forward_call(model, common.images(1, "cpu"), "cpu", "none")()  # warm-up: builds the folded tables once
        calls = {batch: forward_call(model, common.images(batch, "cpu"), "cpu", "none") for batch in args.batches}
        answer[kind] = {str(batch): common.peak_extra_bytes(call, "cpu") for batch, call in calls.items()}
    return answer


# ---------------------------------------------------------------- timing and memory


def measure(device: str, args, tasks: list[int], batches: list[int], repeats: int) -> dict:
    log = common.progress
    vit = common.vit_b(device)
    models, grow_seconds = {}, {}
    for n_tasks in tasks:
        models[n_tasks], grow_seconds[n_tasks] = common.brmoe_vit_b(vit, n_tasks)
        log(f"[{device}] built T={n_tasks}: add_task x{n_tasks} took {grow_seconds[n_tasks]:.1f}s")
    dense = {t: DenseBRMoE(models[t]) for t in tasks if t <= args.dense_max_tasks}

    agreement = {}
    x = common.images(4, device, seed=1)
    for n_tasks, dense_model in dense.items():
        sparse = forward_call(models[n_tasks], x, device, "none")().features
        reference = forward_call(dense_model, x, device, "none")()
        agreement[n_tasks] = ((sparse - reference).abs().max() / reference.abs().max()).item()
    log(f"[{device}] sparse vs dense, max relative difference: {agreement}")

    timings = {}
    for batch in batches:
        x = common.images(batch, device)
        calls = {"plain": forward_call(vit, x, device, args.amp)}
        calls.update({f"sparse {t}": forward_call(models[t], x, device, args.amp) for t in tasks})
        calls.update({f"dense {t}": forward_call(m, x, device, args.amp) for t, m in dense.items()})
        log(f"[{device}] batch {batch}: {len(calls)} configurations, {repeats} rounds")
        # Every configuration is warmed up at the first batch size; later sizes warm up the shared ViT once.
        warmup = 1 if batch == batches[0] else 0
        if not warmup:
            common.timed(calls["plain"], device)
        timings[batch] = common.Interleaved().run(calls, device, repeats, warmup=warmup, log=log)

    parameters = {}
    for n_tasks, model in models.items():
        parameters[n_tasks] = common.parameter_breakdown(model)
        parameters[n_tasks]["brmoe_parameters"] = common.parameter_count(model.layers)

    memory = measure_memory(device, args, tasks, batches, models, dense, vit)
    return {"machine": common.machine(device), "precision": common.precision(device, args.amp), "repeats": repeats,
            "tasks": tasks, "batches": batches, "dense_tasks": sorted(dense), "grow_seconds": grow_seconds,
            "agreement": agreement, "timings": timings, "parameters": parameters, "memory": memory}


def measure_memory(device, args, tasks, batches, models, dense, vit) -> dict:
    if device == "cuda":
        result = {}
        for batch in batches:
            x = common.images(batch, device)
            entries = {"plain": vit, **{f"sparse {t}": models[t] for t in tasks}, **{f"dense {t}": d for t, d in dense.items()}}
            for name, model in entries.items():
                call = forward_call(model, x, device, args.amp)
                call()
                result.setdefault(name, {})[str(batch)] = common.peak_extra_bytes(call, device)
        return {"method": "torch.cuda.max_memory_allocated minus memory_allocated before the call", "peak_extra": result}
    result = {}
    common_args = ["--batches", ",".join(map(str, batches))] + (["--threads", str(args.threads)] if args.threads else [])
    for n_tasks in [0, *tasks]:
        with_dense = n_tasks in dense
        common.progress(f"[cpu] memory probe: {'plain ViT' if n_tasks == 0 else f'T={n_tasks}'}"
                        + (" (sparse and dense)" if with_dense else ""))
        answer = common.run_probe(SCRIPT, [*common_args, "--probe-tasks", str(n_tasks)]
                                  + (["--probe-dense"] if with_dense else []))
        for kind, peaks in answer.items():
            result["plain" if kind == "plain" else f"{kind} {n_tasks}"] = peaks
    return {"method": "VmHWM minus the resident set before the call, one fresh process per number of tasks, "
                      "glibc mmap threshold fixed at 64 KiB", "peak_extra": result}


def main() -> None:
    args = arguments()
    if args.probe:
        print(json.dumps(probe(args)))
        return
    common.set_threads(args.threads)
    tasks = args.tasks or ([1, 10, 50] if args.quick else [1, 10, 50, 100, 300])
    batches = args.batches or ([4] if args.quick else [4, 32])
    repeats = args.repeats or (1 if args.quick else 3)
    runs = [measure(device, args, tasks, batches, repeats) for device in common.devices(args.device)]
    common.finish("inference", {"runs": runs}, args)


if __name__ == "__main__":
    sys.exit(main())
