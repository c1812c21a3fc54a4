"""Compare carecl's NoRGa and HiDe-Prompt with the authors' code (Minhchuyentoancbn/MoE_PromptCL) on a tiny ViT.

    git clone https://github.com/Minhchuyentoancbn/MoE_PromptCL /tmp/norga
    python scripts/compare_norga_reference.py --reference /tmp/norga

Their ViT (vits/norga_prompt_vision_transformer.py, with peft/prompt/norga_prompt.py's pool and attention.py's
NoRGa_Attention) is built at the tiny shape, loaded with carecl's tiny timm ViT weights, and given carecl's
prompts, gate scales (set away from 1), head and TII MLP. For a random batch the script reports the largest
differences of: the main model's logits while training task 2 (their `train=True` path, prompt momentum
0.1) and at test with per-image slots (the reshape quirk makes an image's prefix depend on its
neighbours'), for each gate activation; HiDe-Prompt against their vits/hide_prompt_vision_transformer.py
(plain prefix attention, `PreT_Attention`); and
the TII model's logits (their MlpMapping [2] and [4, 4] and head). Results go to
benchmarks/results/norga_reference.json. Nothing here is imported by carecl or its tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from carecl.engine import Experiment  # noqa: E402
from helpers import TINY_VIT, tiny_config  # noqa: E402

SHAPE = {k: TINY_VIT[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
LENGTH, MOMENTUM = 3, 0.1


def ours(name: str, gate: str = "tanh", hidden=(2,)):
    options = {"name": name, "prompt_layers": [0, 1], "prompt_length": LENGTH, "prompt_momentum": MOMENTUM,
               "tii_mlp_hidden": list(hidden), **({"gate": gate} if name == "norga" else {})}
    method = Experiment.build(tiny_config(method=options)).method.eval()
    with torch.no_grad():
        method.head.weight.normal_()
        method.tii_head.weight.normal_()
        if name == "norga":
            method.act_scale.copy_(torch.tensor([[0.7, 1.3], [1.6, 0.4]]))
    return method


def state_of(method) -> dict:
    return {k.replace(".attn.attention.", ".attn."): v.clone() for k, v in method.backbone.state_dict().items()
            if not k.startswith("head")}


def theirs_main(vits, method, gate):
    heads, width = SHAPE["num_heads"], SHAPE["embed_dim"]
    model = vits.VisionTransformer(**SHAPE, num_classes=method.head.out_features, prompt_length=LENGTH,
                                   pool_size=method.prompts.shape[0], top_k=1, prompt_pool=True, prompt_key=False,
                                   head_type="token", use_prompt_mask=True, use_e_prompt=True,
                                   e_prompt_layer_idx=[0, 1], use_prefix_tune_for_e_prompt=True,
                                   g_prompt_length=1, g_prompt_layer_idx=[],
                                   **({"gate_act": gate} if hasattr(method, "act_scale") else {})).eval()
    p = method.prompts.data  # (slots, layers, 2, length, C) -> their (layers, 2, slots, length, heads, head dim)
    state = state_of(method)
    state.update({"e_prompt.prompt": p.permute(1, 2, 0, 3, 4).reshape(p.shape[1], 2, p.shape[0], LENGTH, heads,
                                                                       width // heads),
                  "head.weight": method.head.weight.data, "head.bias": method.head.bias.data})
    if hasattr(method, "act_scale"):
        state["e_prompt.act_scale"] = method.act_scale.data.reshape(-1, 2, 1, 1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def compare_main(vits, method, gate: str | None) -> dict:
    name = method.options.name
    model = theirs_main(vits, method, gate if name == "norga" and gate != "identity" else None)  # theirs: None = identity
    images = torch.rand(6, 3, SHAPE["img_size"], SHAPE["img_size"], generator=torch.Generator().manual_seed(1))
    task = method.scenario.task(2)
    slots = torch.tensor([0, 2, 1, 1, 0, 2])
    with torch.no_grad():
        train_ours = method.head(method.features_with_slots(images, task))
        train_theirs = model(images, task_id=2, prompt_id=torch.full((6, 1), 2), train=True,
                             prompt_momentum=MOMENTUM)["logits"]
        test_ours = method.head(method.features_with_slots(images, None, slots))
        test_theirs = model(images, task_id=2, prompt_id=slots[:, None])["logits"]
    return {"train_logits_max_abs_diff": (train_ours - train_theirs).abs().max().item(),
            "test_logits_max_abs_diff": (test_ours - test_theirs).abs().max().item()}


def compare_tii(vits, method) -> dict:
    hidden = method.options.tii_mlp_hidden
    model = vits.VisionTransformer(**SHAPE, num_classes=method.tii_head.out_features, mlp_structure=list(hidden)).eval()
    state = state_of(method)
    mlp = dict(method.tii_mlp.state_dict())
    # Our TaskIdentityMLP: layers.i (Linear or Sequential(Linear, act/norm)) -> their net.i.{0: Linear, 2: norm}.
    for key, value in mlp.items():
        parts = key.split(".")
        if parts[0] == "norm":
            state[f"mlp.{key}"] = value
            continue
        index = int(parts[1])
        if len(parts) == 3:  # a bare Linear (the last layer)
            state[f"mlp.net.{index}.0.{parts[2]}"] = value
        else:
            position = 0 if parts[2] == "0" else 2  # their [Linear, Dropout, LayerNorm]
            state[f"mlp.net.{index}.{position}.{parts[3]}"] = value
    state.update({"head.weight": method.tii_head.weight.data, "head.bias": method.tii_head.bias.data})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    images = torch.rand(5, 3, SHAPE["img_size"], SHAPE["img_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        difference = (method.tii_logits(method.query(images)) - model(images)["logits"]).abs().max().item()
    return {"tii_logits_max_abs_diff": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of Minhchuyentoancbn/MoE_PromptCL")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gates = ("tanh", "sigmoid", "gelu", "identity")
    # Ours first: their module registers its own ViT names in timm's registry, over timm's.
    methods = {"norga": {gate: ours("norga", gate) for gate in gates}, "hide_prompt": ours("hide_prompt"),
               "tii_2": ours("hide_prompt", hidden=(2,)), "tii_4_4": ours("hide_prompt", hidden=(4, 4))}
    sys.path.insert(0, str(args.reference.resolve()))
    import vits.hide_prompt_vision_transformer as hide_vits
    import vits.norga_prompt_vision_transformer as vits
    results = {
        "norga": {gate: compare_main(vits, methods["norga"][gate], gate) for gate in gates},
        "hide_prompt": compare_main(hide_vits, methods["hide_prompt"], None),
        "tii_mlp_2": compare_tii(vits, methods["tii_2"]),
        "tii_mlp_4_4": compare_tii(vits, methods["tii_4_4"]),
    }
    path = ROOT / "benchmarks" / "results" / "norga_reference.json"
    path.write_text(json.dumps({"reference": "Minhchuyentoancbn/MoE_PromptCL", "tiny_vit": TINY_VIT,
                                "results": results}, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
