"""Compare carecl's L2P, DualPrompt and CODA-Prompt with LAMDA-PILOT's code (the CaRE tables' source) on a tiny ViT.

    git clone https://github.com/LAMDA-CL/LAMDA-PILOT /tmp/pilot
    python scripts/compare_prompt_reference.py --reference /tmp/pilot

Their ViTs (backbone/vit_l2p.py, backbone/vit_dualprompt.py, with backbone/prompt.py's pools) are built at
the tiny shape and loaded with carecl's tiny timm ViT weights (L2P's longer position table through their
own `resize_pos_embed`), their prompts, keys and heads set to carecl's. For a random batch the script
reports the largest differences of the logits and of the key pull term, in training (DualPrompt: the
task's own slot) and at test (key matching), with batch-level selection on and off, and which slots each
side chose; their code always reshapes DualPrompt's prefixes, so with `kv_reshape_quirk` off the logits
differ, as they should. CODA-Prompt: the prompted CLS features with their `CodaPrompt`, training task 1
(task 0's components frozen) and at test. Results go to benchmarks/results/prompt_reference.json. Nothing here is imported by carecl.
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


def their_state(ours: torch.nn.Module) -> dict:
    # A prefix injector wraps each attention: its weights sit one level deeper in our names.
    return {k.replace(".attn.attention.", ".attn."): v.clone() for k, v in ours.state_dict().items()
            if not k.startswith("head")}


def compare_l2p(reference, batchwise: bool) -> dict:
    vit_l2p = reference["vit_l2p"]
    options = {"name": "l2p", "pool_size": 4, "prompt_length": 2, "top_k": 2, "batchwise_selection": batchwise}
    method = Experiment.build(tiny_config(method=options)).method.eval()
    with torch.no_grad():
        method.head.weight.normal_()
    theirs = vit_l2p.VisionTransformer(**SHAPE, num_classes=method.head.out_features, prompt_length=2, pool_size=4,
                                       top_k=2, prompt_pool=True, prompt_key=True, batchwise_prompt=batchwise,
                                       head_type="prompt", embedding_key="cls").eval()
    state = their_state(method.backbone)
    state["pos_embed"] = vit_l2p.resize_pos_embed(state["pos_embed"], theirs.pos_embed, 1, theirs.patch_embed.grid_size)
    state.update({"prompt.prompt": method.pool.prompts.data, "prompt.prompt_key": method.pool.keys.data,
                  "head.weight": method.head.weight.data, "head.bias": method.head.bias.data})
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    images = torch.rand(6, 3, SHAPE["img_size"], SHAPE["img_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        query = method.query(images)
        out = theirs(images, cls_features=query)
        features, pull = method.prompted_features(images, None)
        selection = method.pool.select(query)
    return {"logits_max_abs_diff": (method.head(features) - out["logits"]).abs().max().item(),
            "pull_abs_diff": abs(pull.item() - out["reduce_sim"].item()),
            "same_slots": bool(torch.equal(selection.indices.sort(1).values, out["prompt_idx"].sort(1).values))}


def compare_dualprompt(reference, batchwise: bool, quirk: bool) -> dict:
    vit_dp = reference["vit_dualprompt"]
    heads, width = SHAPE["num_heads"], SHAPE["embed_dim"]
    options = {"name": "dualprompt", "g_layers": [0], "e_layers": [1], "g_length": 2, "e_length": 3, "pool_size": 4,
               "batchwise_selection": batchwise, "kv_reshape_quirk": quirk}
    method = Experiment.build(tiny_config(method=options)).method.eval()
    with torch.no_grad():
        method.head.weight.normal_()
    theirs = vit_dp.VisionTransformer(**SHAPE, num_classes=method.head.out_features, prompt_length=3, pool_size=4,
                                      top_k=1, prompt_pool=True, prompt_key=True, batchwise_prompt=batchwise,
                                      head_type="token", embedding_key="cls", use_prompt_mask=True, use_g_prompt=True,
                                      g_prompt_length=2, g_prompt_layer_idx=[0], use_prefix_tune_for_g_prompt=True,
                                      use_e_prompt=True, e_prompt_layer_idx=[1], use_prefix_tune_for_e_prompt=True).eval()
    state = their_state(method.backbone)
    g = method.g_prompt.data  # (layers, 2, length, C) -> their (layers, 2, length, heads, head dim)
    e = method.pool.prompts.data  # (pool, layers, 2, length, C) -> their (layers, 2, pool, length, heads, head dim)
    state.update({"g_prompt": g.reshape(*g.shape[:3], heads, width // heads),
                  "e_prompt.prompt": e.permute(1, 2, 0, 3, 4).reshape(*e.shape[1:3], e.shape[0], e.shape[3], heads,
                                                                      width // heads),
                  "e_prompt.prompt_key": method.pool.keys.data,
                  "head.weight": method.head.weight.data, "head.bias": method.head.bias.data})
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    images = torch.rand(6, 3, SHAPE["img_size"], SHAPE["img_size"], generator=torch.Generator().manual_seed(2))
    task = method.scenario.task(1)
    results = {}
    with torch.no_grad():
        query = method.query(images)
        for phase, our_task, their_args in (("train", task, {"task_id": 1, "train": True}), ("test", None, {})):
            out = theirs(images, cls_features=query, **their_args)
            features, pull = method.prompted_features(images, our_task)
            results[phase] = {"logits_max_abs_diff": (method.head(features) - out["logits"]).abs().max().item(),
                              "pull_abs_diff": abs(pull.item() - out["reduce_sim"].item())}
    return results


def compare_coda(reference) -> dict:
    """Their CodaPrompt (backbone/prompt.py) on their CODA ViT, with our components, keys and attention vectors;
    their prompted layers are fixed to blocks 0-4, so both sides use a 5-block tiny ViT."""
    vit_coda, prompt_module = reference["vit_coda"], reference["prompt"]
    shape = {**SHAPE, "depth": 5}
    options = {"name": "coda_prompt", "pool_size": 6, "prompt_length": 4, "layers": [0, 1, 2, 3, 4]}
    backbone = {"name": "vit_tiny_patch16_224", "pretrained": False, "model_kwargs": {**TINY_VIT, "depth": 5}}
    method = Experiment.build(tiny_config(method=options, backbone=backbone)).method.eval()
    for task in method.scenario.tasks()[:2]:
        method.begin_task(task)
    method._n_learned_tasks = 2
    with torch.no_grad():
        for tensor in (method.components, method.keys, method.attention):
            tensor.normal_()
    theirs = vit_coda.VisionTransformer(**shape, num_classes=0).eval()
    missing, unexpected = theirs.load_state_dict(their_state(method.backbone), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    pool = prompt_module.CodaPrompt(shape["embed_dim"], method.scenario.n_tasks, [6, 4, 0.0], key_dim=shape["embed_dim"])
    pool.task_count = 1
    for layer in range(5):
        setattr(pool, f"e_p_{layer}", torch.nn.Parameter(method.components.data[layer].clone()))
        setattr(pool, f"e_k_{layer}", torch.nn.Parameter(method.keys.data[layer].clone()))
        setattr(pool, f"e_a_{layer}", torch.nn.Parameter(method.attention.data[layer].clone()))
    images = torch.rand(4, 3, SHAPE["img_size"], SHAPE["img_size"], generator=torch.Generator().manual_seed(3))
    results = {}
    with torch.no_grad():
        query = theirs(images)[0][:, 0]
        torch.testing.assert_close(query, method.query(images))
        for phase, task, train in (("train", method.scenario.task(1), True), ("test", None, False)):
            their_features = theirs(images, prompt=pool, q=query, train=train)[0][:, 0]
            ours = method.prompted_features(images, task)[0]
            results[phase] = {"features_max_abs_diff": (ours - their_features).abs().max().item()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of LAMDA-CL/LAMDA-PILOT")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sys.path.insert(0, str(args.reference.resolve()))
    from backbone import prompt, vit_coda_promtpt, vit_dualprompt, vit_l2p
    reference = {"vit_l2p": vit_l2p, "vit_dualprompt": vit_dualprompt, "vit_coda": vit_coda_promtpt, "prompt": prompt}
    results = {
        "l2p": {f"batchwise_{b}": compare_l2p(reference, b) for b in (True, False)},
        "dualprompt": {f"batchwise_{b}_reshape_quirk_{q}": compare_dualprompt(reference, b, q)
                       for b in (True, False) for q in (True, False)},
        "coda_prompt": compare_coda(reference),
    }
    path = ROOT / "benchmarks" / "results" / "prompt_reference.json"
    path.write_text(json.dumps({"reference": "LAMDA-CL/LAMDA-PILOT", "tiny_vit": TINY_VIT, "results": results},
                               indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
