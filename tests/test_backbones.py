import pytest
import timm
import torch
from safetensors.torch import save_file

from carecl.backbones import BackboneError, create_backbone, resolve_name
from carecl.config import BackboneConfig

from helpers import TINY_VIT


def tiny(**kwargs):
    return BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, model_kwargs=dict(TINY_VIT), **kwargs)


def test_legacy_release_name_resolves():
    assert resolve_name("vit_base_patch16_224_in21k") == "vit_base_patch16_224.augreg_in21k"


def test_unknown_name_is_clear():
    with pytest.raises(BackboneError, match="no model 'vit_tiny_patch16_2244'.*did you mean"):
        resolve_name("vit_tiny_patch16_2244")


def test_backbone_is_frozen_and_headless():
    model = create_backbone(tiny())
    assert not any(p.requires_grad for p in model.parameters())
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 32)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_loads(tmp_path, suffix):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"model": state}, path)
    model = create_backbone(tiny(weights=str(path)))
    assert torch.equal(model.pos_embed, source.pos_embed)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_mismatched_weights_list_the_keys(tmp_path):
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **{**TINY_VIT, "depth": 3})
    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 32)
    del state["norm.weight"]
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(BackboneError) as info:
        create_backbone(tiny(weights=str(path)))
    message = str(info.value)
    assert "bad.safetensors" in message
    assert "missing (1): norm.weight" in message
    assert "unexpected" in message and "blocks.2." in message
    assert "blocks.0.mlp.fc1.weight: file (7, 32)" in message


def test_missing_weights_file(tmp_path):
    with pytest.raises(BackboneError, match="file not found"):
        create_backbone(tiny(weights=str(tmp_path / "none.safetensors")))


def _release_checkpoint(source: torch.nn.Module, layout: str) -> dict:
    """A tiny ViT's weights laid out as a self-supervised release saves them."""
    state = {k: v.clone() for k, v in source.state_dict().items()}
    if layout == "ibot":  # {"teacher": {"backbone.*", "head.*"}} and iBOT's mask token
        teacher = {f"backbone.{k}": v for k, v in state.items()}
        teacher.update({"backbone.masked_embed": torch.zeros(32), "head.last_layer.weight": torch.zeros(4, 32)})
        return {"teacher": teacher, "student": {"x": torch.zeros(1)}, "epoch": 3}
    if layout == "mocov3":  # {"model": {"module.base_encoder.*", "module.momentum_encoder.*", "module.predictor.*"}}
        model = {f"module.base_encoder.{k}": v for k, v in state.items()}
        model.update({f"module.momentum_encoder.{k}": torch.zeros_like(v) for k, v in state.items()})
        model.update({"module.predictor.0.weight": torch.zeros(4, 32), "module.base_encoder.head.0.weight": torch.zeros(4, 32)})
        return {"model": model, "optimizer": {"x": torch.zeros(1)}}
    return state  # DINO: the raw state dict


@pytest.mark.parametrize("layout", ["ibot", "mocov3", "dino"])
def test_self_supervised_release_checkpoints_load_with_their_key_conventions(tmp_path, layout):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)
    path = tmp_path / f"{layout}.pth"
    torch.save(_release_checkpoint(source, layout), path)
    model = create_backbone(tiny(weights=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_fc_norm_model_drops_the_release_final_norm_as_hide_prompt_loads_it():
    # MoCo v3 in HiDe-Prompt's loader: the ViT pools through an fc_norm, which keeps LayerNorm's init.
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)
    with torch.no_grad():
        source.norm.weight.normal_()
    target = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, fc_norm=True,
                               global_pool="token", **TINY_VIT)
    from carecl.backbones import normalise_checkpoint_keys
    state = normalise_checkpoint_keys(_release_checkpoint(source, "mocov3")["model"], target)
    assert "norm.weight" not in state
    assert torch.equal(state["fc_norm.weight"], torch.ones(32)) and torch.equal(state["fc_norm.bias"], torch.zeros(32))
    target.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=True)
