"""Frozen backbones, by name, with weights from the hub or a local file: timm Vision Transformers here,
CLIP models (`backbone.family: open_clip`) in `carecl.clip_backbone`."""

from __future__ import annotations

import difflib
import zipfile
from dataclasses import replace
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from carecl.config import BackboneConfig
from carecl.data.transforms import DEFAULT_BACKBONE_PREPROCESSING, Preprocessing
from carecl.weight_files import BackboneError, check_state_fits, read_safetensors, resolve_weights_path

# Names used by the CaRE/PILOT release that timm has since renamed.
LEGACY_NAMES = {
    "vit_base_patch16_224_in21k": "vit_base_patch16_224.augreg_in21k",
    "vit_base_patch16_224_in1k": "vit_base_patch16_224.augreg_in1k",
    "vit_large_patch16_224_in21k": "vit_large_patch16_224.augreg_in21k",
}


def resolve_name(name: str) -> str:
    name = LEGACY_NAMES.get(name, name)
    architecture = name.split(".")[0]
    if not timm.is_model(architecture):
        candidates = timm.list_models("vit_*")
        close = difflib.get_close_matches(architecture, candidates, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BackboneError(f"backbone.name: timm has no model {name!r}{hint}")
    return name


def backbone_preprocessing(config: BackboneConfig) -> Preprocessing:
    """Input size, mean/std, interpolation and crop of the backbone's timm pretrained config (no model is built).

    `model_kwargs.img_size` overrides the input size; a name timm has no pretrained config for gets
    ImageNet-21K ViT conventions. A CLIP backbone: CLIP's own preprocessing.
    """
    if config.family == "open_clip":
        from carecl.clip_backbone import clip_preprocessing

        return clip_preprocessing(config)
    name = resolve_name(config.name)
    pretrained = timm.models.get_pretrained_cfg(name)
    if pretrained is None:
        base = DEFAULT_BACKBONE_PREPROCESSING
    else:
        base = Preprocessing(pretrained.input_size[-1], tuple(pretrained.mean), tuple(pretrained.std),
                             pretrained.interpolation or "bicubic", pretrained.crop_pct or 1.0)
    if base.interpolation not in ("bicubic", "bilinear", "nearest"):
        base = replace(base, interpolation="bicubic")
    size = config.model_kwargs.get("img_size")
    return base if size is None else replace(base, image_size=_side(size))


def _side(size) -> int:
    return int(size[-1]) if isinstance(size, (list, tuple)) else int(size)


def create_backbone(config: BackboneConfig, image_size: int | None = None) -> torch.nn.Module:
    """Build the ViT named in `config` without a classification head (or the CLIP model, family open_clip),
    frozen and in eval mode.

    `image_size` (the data's input side) is passed to timm as `img_size` when the model would otherwise
    expect another size (timm then resamples pretrained position embeddings); a conflicting
    `model_kwargs.img_size` is an error.
    """
    if config.family == "open_clip":
        from carecl.clip_backbone import create_clip

        return create_clip(config, image_size)
    name = resolve_name(config.name)
    use_hub = config.pretrained and config.weights is None
    kwargs = dict(config.model_kwargs)
    if image_size is not None:
        expected = backbone_preprocessing(config).image_size
        if "img_size" in kwargs and expected != image_size:
            raise BackboneError(f"backbone.model_kwargs.img_size {kwargs['img_size']} does not fit the data's "
                                f"{image_size} px images (data.image_size); make them equal")
        if expected != image_size:
            kwargs["img_size"] = image_size
    try:
        model = timm.create_model(name, pretrained=use_hub, num_classes=0, **kwargs)
    except TypeError as error:
        raise BackboneError(f"backbone.model_kwargs {config.model_kwargs} rejected by {name}: {error}") from None
    except (OSError, RuntimeError) as error:
        if not use_hub:
            raise
        raise BackboneError(
            f"could not fetch pretrained weights for {name!r} ({error}); set backbone.weights to a "
            "local file, or backbone.pretrained=false for random weights"
        ) from None
    if not isinstance(model, VisionTransformer):
        raise BackboneError(f"backbone.name: {name!r} is a {type(model).__name__}, carecl needs a timm VisionTransformer")
    if config.weights is not None:
        load_weights_file(model, config.weights)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def check_npz(path: Path) -> None:
    """An .npz that NumPy cannot open (junk, cut short) is named as such, not as an architecture mismatch."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            archive.files
    except Exception as error:  # noqa: BLE001 - numpy and zipfile raise many types for a bad file
        raise BackboneError(f"backbone.weights: cannot read {path} as a NumPy .npz archive "
                            f"({type(error).__name__}: {error})") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from .safetensors or a torch file (never unpickling arbitrary objects)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for bad files
        raise BackboneError(f"backbone.weights: cannot read {path} as a torch checkpoint of tensors "
                            f"({type(error).__name__}: {error})") from None
    # Self-supervised releases wrap their weights: iBOT's teacher, MoCo v3's model, others' state_dict.
    for container in ("teacher", "state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(container), dict):
            state = state[container]
    if not isinstance(state, dict):
        raise BackboneError(f"backbone.weights: {path} holds no state dict")
    return state


# Key prefixes of self-supervised checkpoints, outermost first: MoCo v3 keeps the ViT as the query encoder
# (the momentum encoder and predictor are dropped); DINO / iBOT teachers as `backbone.` next to their heads.
ENCODER_PREFIXES = ("module.base_encoder.", "base_encoder.", "module.", "backbone.", "encoder.")
# Training-only tensors of those releases (iBOT's mask token).
TRAINING_ONLY_KEYS = ("masked_embed",)


def normalise_checkpoint_keys(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """A self-supervised release's keys in timm's names: the encoder's own tensors with their prefix
    removed, training-only tensors dropped. A model pooled through an fc_norm (MoCo v3's ViT in
    HiDe-Prompt's loader) has no final `norm`: the release's is dropped and the fc_norm keeps LayerNorm's
    initial scale 1 and shift 0, as their loader leaves it (it discards every key the model lacks)."""
    model_keys = set(model.state_dict())
    for prefix in ENCODER_PREFIXES:
        if any(key.startswith(prefix) for key in state) and not model_keys & set(state):
            state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    state = {key: value for key, value in state.items() if key not in TRAINING_ONLY_KEYS}
    pooled_norm = isinstance(model.norm, torch.nn.Identity) and not isinstance(model.fc_norm, torch.nn.Identity)
    if pooled_norm:
        state = {key: value for key, value in state.items() if not key.startswith("norm.")}
        state.update({f"fc_norm.{name}": value.detach().clone() for name, value in model.fc_norm.state_dict().items()})
    return state


def load_weights_file(model: VisionTransformer, weights: str | Path) -> None:
    """Load a local weights file into `model`, listing every key that does not fit."""
    path = resolve_weights_path(weights)
    if not path.is_file():
        raise BackboneError(f"backbone.weights: {'a folder, not a file' if path.is_dir() else 'file not found'}: {path}")
    if path.suffix == ".npz":
        check_npz(path)
        from timm.models.vision_transformer import _load_weights

        try:
            _load_weights(model, str(path))
        except (KeyError, RuntimeError, ValueError) as error:
            raise BackboneError(f"backbone.weights: {path} does not fit the architecture: {error}") from None
        except (OSError, EOFError, zipfile.BadZipFile) as error:
            raise BackboneError(f"backbone.weights: cannot read {path}: {type(error).__name__}: {error}") from None
        return
    state = checkpoint_filter_fn(normalise_checkpoint_keys(read_state_dict(path), model), model)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    check_state_fits(model, state, path)
    model.load_state_dict(state, strict=False)
