"""Frozen CLIP models (image and text towers, tokenizer, logit scale) from open_clip: `backbone.family: open_clip`.

    backbone: {family: open_clip, name: ViT-B-16-quickgelu, weights: ~/.cache/clip/ViT-B-16.pt}

open_clip is an optional dependency (`pip install "carecl[clip]"`), imported only here. Weights come
from the hub (`backbone.tag`, default OpenAI's) or a local file: OpenAI's TorchScript archive, an
open_clip state dict (.pt/.pth/.bin) or .safetensors. `name: custom` builds the architecture given in
`model_kwargs` ({embed_dim, vision_cfg, text_cfg, quick_gelu}): the tiny test CLIPs, or a CLIP-shaped
model around other weights.
"""

from __future__ import annotations

import copy
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carecl.config import BackboneConfig
from carecl.data.transforms import Preprocessing
from carecl.weight_files import BackboneError, check_state_fits, read_safetensors, resolve_weights_path

CUSTOM = "custom"
# OpenAI CLIP's pixel statistics (every CLIP tower here unless the model config names others).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Entries of OpenAI's archives that are not weights (and open_clip's causal mask, a buffer it never saves).
ARCHIVE_METADATA = ("input_resolution", "context_length", "vocab_size", "attn_mask")


class ClipBackboneError(BackboneError):
    """The CLIP backbone cannot be built or loaded; the message names the key or file."""


def open_clip_module():
    try:
        import open_clip
    except ImportError:
        raise ClipBackboneError('backbone.family open_clip needs open-clip-torch: pip install "carecl[clip]"') from None
    return open_clip


def architecture(config: BackboneConfig) -> dict[str, Any]:
    """The open_clip model config ({embed_dim, vision_cfg, text_cfg, ...}) the backbone config describes."""
    if config.name == CUSTOM:
        missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config.model_kwargs]
        if missing:
            raise ClipBackboneError(f"backbone.model_kwargs: a custom CLIP needs {', '.join(missing)}")
        return copy.deepcopy(dict(config.model_kwargs))
    found = open_clip_module().get_model_config(config.name)
    if found is None:
        raise ClipBackboneError(f"backbone.name: open_clip has no model {config.name!r} (see open_clip.list_models())")
    return found


def clip_preprocessing(config: BackboneConfig) -> Preprocessing:
    """CLIP's evaluation preprocessing: the tower's input size, CLIP's mean/std, bicubic resize, centre crop."""
    model = architecture(config)
    size = model["vision_cfg"].get("image_size", 224)
    size = int(size[-1]) if isinstance(size, (list, tuple)) else int(size)
    preprocess = model.get("preprocess_cfg", {})
    return Preprocessing(size, tuple(preprocess.get("mean", CLIP_MEAN)), tuple(preprocess.get("std", CLIP_STD)),
                         "bicubic", 1.0, augment="crop")


def create_clip(config: BackboneConfig, image_size: int | None = None) -> nn.Module:
    """The open_clip CLIP model of `config`, frozen and in eval mode, its image tower at `image_size`."""
    open_clip = open_clip_module()
    expected = clip_preprocessing(config).image_size
    resize = image_size is not None and image_size != expected
    if config.name == CUSTOM:
        kwargs = architecture(config)
        kwargs.pop("preprocess_cfg", None)
        if resize:
            kwargs["vision_cfg"]["image_size"] = image_size
        model = open_clip.CLIP(**kwargs)
    else:
        hub = config.pretrained and config.weights is None
        extra = dict(config.model_kwargs, **({"force_image_size": image_size} if resize else {}))
        try:
            model = open_clip.create_model(config.name, pretrained=config.tag if hub else None, **extra)
        except TypeError as error:
            raise ClipBackboneError(f"backbone.model_kwargs {config.model_kwargs} rejected by {config.name}: {error}") from None
        except (OSError, RuntimeError) as error:
            if not hub:
                raise
            raise ClipBackboneError(f"could not fetch CLIP weights {config.name}/{config.tag} ({error}); set "
                                    "backbone.weights to a local file (e.g. OpenAI's ViT-B-16.pt)") from None
    if config.weights is not None:
        load_clip_weights(model, config.weights)
    model.requires_grad_(False)
    return model.eval()


def read_clip_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a CLIP checkpoint: OpenAI's TorchScript archive, a torch state dict or .safetensors."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if zipfile.is_zipfile(path) and any(name.endswith("constants.pkl") for name in zipfile.ZipFile(path).namelist()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises many types for bad files
            raise ClipBackboneError(f"backbone.weights: cannot read {path}: {error}") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ClipBackboneError(f"backbone.weights: {path} holds no state dict")
    return {key.removeprefix("module."): value for key, value in state.items() if key not in ARCHIVE_METADATA}


def load_clip_weights(model: nn.Module, weights: str | Path) -> None:
    """Load a local CLIP checkpoint, listing every key that does not fit."""
    path = resolve_weights_path(weights)
    if not path.is_file():
        raise ClipBackboneError(f"backbone.weights: {'a folder, not a file' if path.is_dir() else 'file not found'}: "
                                f"{path}")
    state = read_clip_state(path)
    if "logit_scale" in state and state["logit_scale"].shape != model.logit_scale.shape:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    check_state_fits(model, state, path)
    model.load_state_dict(state)


def tokenize(model: nn.Module, texts: list[str]) -> torch.Tensor:
    """CLIP's BPE tokens of `texts` (the vocabulary ships with open_clip), at the text tower's context length."""
    return open_clip_module().tokenize(texts, context_length=model.context_length)
