"""A training step's state as safetensors + JSON: the RNG states of Python, NumPy and torch, and an optimiser's
state (tensors by parameter and name, everything else JSON); nothing is pickled."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch



def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python, NumPy and torch (CPU and CUDA) generator states."""
    version, state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    document = {"python": [version, list(state), gauss],
                "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = cuda_state
    return document, tensors


def restore_rng(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = document["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, position, has_gauss, cached = document["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors, key=_cuda_index) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


def _cuda_index(key: str) -> int:
    return int(key.rsplit(".", 1)[1]) if key.startswith("rng.cuda.") else -1


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An optimiser's state_dict split into JSON (groups, scalars) and tensors (`prefix`.<param>.<key>)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": state["param_groups"], "scalars": scalars}, tensors


def load_optimizer_state(optimizer: torch.optim.Optimizer, document: dict[str, Any],
                         tensors: dict[str, torch.Tensor], prefix: str) -> None:
    state: dict[int, dict[str, Any]] = {}
    for index, values in document["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": document["param_groups"]})
