"""Local weights files shared by every backbone family: `asset:NAME` paths and the check that a state dict fits a model."""

from __future__ import annotations

from pathlib import Path

import torch

from carecl.config import ASSET_PREFIX
from carecl.errors import CareclError


class BackboneError(CareclError, ValueError):
    """The backbone name or weights file cannot be used; the message names it."""


def resolve_weights_path(weights: str | Path) -> Path:
    """A file path, or `asset:NAME` for a weights file shipped inside the carecl package."""
    if isinstance(weights, str) and weights.startswith(ASSET_PREFIX):
        from importlib import resources

        return Path(str(resources.files("carecl") / "assets" / weights[len(ASSET_PREFIX) :]))
    return Path(weights).expanduser()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a junk, truncated or unreadable one is a BackboneError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types (and OSError)
        raise BackboneError(f"backbone.weights: cannot read {path}: not a complete safetensors file "
                            f"({type(error).__name__}: {error})") from None


def check_state_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("head.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or misshaped:
        lines = [f"backbone.weights: {source} does not fit the architecture"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise BackboneError("\n".join(lines))
