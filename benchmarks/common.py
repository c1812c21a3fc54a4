"""Shared by the benchmark scripts: machine description, ViT-B/16 BR-MoE models, timing, memory, results.

Timings are medians of calls interleaved round-robin in one process (every configuration sees
the same background load), reported as ratios to a baseline measured in the same rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import timm  # noqa: E402

from carecl.tuners.brmoe import BRMoEConfig, BRMoEViT  # noqa: E402
from carecl.methods.care_config import CareConfig  # noqa: E402

VIT_B = "vit_base_patch16_224"
IMAGE_SIZE = 224
# The published adapter sizes (configs/care/*.yaml): shared 64, experts 16, K=3 experts, M=2 routers.
PUBLISHED = BRMoEConfig(adapter_dim=64, expert_dim=16, topk_experts=3, topk_routers=2)
# B100 Inc3 (OmniBenchmark-1K, 301 tasks) adds 3 classes per task; ImageNet-R B0Inc10 adds 10.
CLASSES_PER_TASK = 10


# ---------------------------------------------------------------- arguments and devices


def parser(description: str) -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--quick", action="store_true", help="smaller sets, one repeat (a smoke run, not for the tables)")
    result.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU, then CUDA too when present")
    result.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                        help="autocast dtype on CUDA (CPU runs in float32 regardless)")
    result.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    result.add_argument("--repeats", type=int, default=None, help="timed rounds per configuration")
    result.add_argument("--no-report", action="store_true", help="do not regenerate BENCHMARKS.md")
    return result


def devices(choice: str) -> list[str]:
    if choice == "cpu":
        return ["cpu"]
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        return ["cuda"]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def set_threads(threads: int | None) -> int:
    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    return count


def autocast(device: str, amp: str):
    """bf16/fp16 autocast on CUDA when asked; a no-op context otherwise."""
    if device != "cuda" or amp == "none":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def precision(device: str, amp: str) -> str:
    return amp if device == "cuda" and amp != "none" else "fp32"


# ---------------------------------------------------------------- machine


def machine(device: str) -> dict:
    """CPU model, cores, torch/timm versions (and the GPU when used)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "timm": timm.__version__, "python": platform.python_version(), "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---------------------------------------------------------------- models


def vit_b(device: str = "cpu") -> torch.nn.Module:
    """ViT-B/16 with random weights (nothing is downloaded): the shapes are what matter here."""
    torch.manual_seed(0)
    return timm.create_model(VIT_B, pretrained=False, num_classes=0).eval().to(device)


@torch.no_grad()
def randomise_experts(model: BRMoEViT, seed: int = 0) -> None:
    """Fresh adapters output 0 (zero scale) and later experts start as means: give every expert
    and shared adapter distinct random values, so routing sees distinct experts. In place."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        for adapter in [layer.shared, *layer.experts]:
            for parameter in adapter.parameters():
                noise = torch.randn(parameter.shape, generator=generator) * 0.05
                parameter.copy_(noise.to(parameter.device, parameter.dtype))
            adapter.scale.add_(1.0)
            adapter.norm.weight.add_(1.0)
    model.invalidate_caches()


def grow(model: BRMoEViT, n_tasks: int, classes_per_task: int = CLASSES_PER_TASK) -> float:
    """add_task n_tasks times on one thread (small ops: a second thread only adds contention);
    returns the seconds it took."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        for _ in range(n_tasks):
            model.add_task(classes_per_task)
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)


def brmoe_vit_b(vit: torch.nn.Module, n_tasks: int, config: BRMoEConfig = PUBLISHED) -> tuple[BRMoEViT, float]:
    """A BR-MoE ViT-B with n_tasks random tasks on a shared frozen ViT (hooks of other models stay inert)."""
    torch.manual_seed(n_tasks)
    model = BRMoEViT(vit, config).eval()
    seconds = grow(model, n_tasks)
    randomise_experts(model, seed=n_tasks)
    return model, seconds


def care_options(**overrides) -> CareConfig:
    options = CareConfig(brmoe=dataclasses.replace(PUBLISHED))
    for key, value in overrides.items():
        setattr(options, key, value)
    return options


def images(batch: int, device: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(device)


# ---------------------------------------------------------------- memory accounting


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (views of one storage count once)."""
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def parameter_breakdown(model: BRMoEViT) -> dict[str, int]:
    """Parameter bytes of the frozen ViT and of each kind of BR-MoE part, plus the folded tables."""
    layers = model.layers
    return {
        "vit": tensor_bytes(model.vit.parameters()),
        "routers": tensor_bytes(p for layer in layers for p in layer.routers.parameters()),
        "experts": tensor_bytes(p for layer in layers for p in layer.experts.parameters()),
        "perceptrons": tensor_bytes(p for layer in layers for p in layer.perceptrons.parameters()),
        "shared": tensor_bytes(p for layer in layers for p in layer.shared.parameters()),
        "tables": sum(layer.frozen_table_bytes() for layer in layers),
    }


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


@dataclass
class Interleaved:
    """Median seconds of each named call, measured round-robin (order rotated every round)."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def run(self, calls: dict[str, Callable[[], object]], device: str, repeats: int, warmup: int = 1,
            log: Callable[[str], None] = print) -> dict[str, float]:
        names = list(calls)
        for name in names:
            for _ in range(warmup):
                timed(calls[name], device)
        for round_index in range(repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                seconds = timed(calls[name], device)
                self.samples.setdefault(name, []).append(seconds)
            log(f"  round {round_index + 1}/{repeats}: " + ", ".join(
                f"{n} {self.samples[n][-1]:.3f}s" for n in names))
        return self.medians()

    def medians(self) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in self.samples.items()}


# ---------------------------------------------------------------- peak memory (one configuration per process)


def probe_environment() -> dict[str, str]:
    """glibc returns every allocation >= 64 KiB to the OS on free (fixed mmap threshold), so the
    resident-set size follows torch's live CPU tensors instead of the allocator's free lists."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def resident_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_resident() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory a call needs on top of what was resident before it (CPU: VmHWM; CUDA: allocator)."""
    gc.collect()
    if device == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - before
    before = resident_bytes()
    reset_peak_resident()
    fn()
    return peak_resident_bytes() - before


def run_probe(script: Path, arguments: list[str]) -> dict:
    """Run `script --probe ...` in a fresh interpreter; its last stdout line is a JSON object."""
    completed = subprocess.run([sys.executable, str(script), "--probe", *arguments], env=probe_environment(),
                               capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"memory probe {arguments} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- results


def save(name: str, document: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def finish(name: str, document: dict, arguments: argparse.Namespace) -> None:
    """Save the results (a --quick run goes to its own file) and regenerate BENCHMARKS.md."""
    document["quick"] = bool(arguments.quick)
    path = save(name + ("-quick" if arguments.quick else ""), document)
    print(f"results: {path.relative_to(ROOT)}")
    if not arguments.no_report and not arguments.quick:
        import report  # a sibling module: scripts run as `python benchmarks/NAME.py`
        print(f"updated: {report.write().relative_to(ROOT)}")


def megabytes(count: float) -> float:
    return count / 2**20


def progress(message: str) -> None:
    print(message, flush=True)
