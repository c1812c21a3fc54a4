"""Compare carecl's moe_adapters with the authors' CLIP (JiazuoYu/MoE-Adapters4CL) on a tiny CLIP.

    python scripts/compare_moe_adapters_reference.py --reference /path/to/MoE-Adapters4CL

Their `cil/clip/model.py` (and `adapter.py`) and `mtil/clip/model.py` are imported from the checkout and
built by their own `build_model` from the state dict of carecl's tiny open_clip CLIP (QuickGELU, widths that
are multiples of their 64-wide heads); every expert, router and noise weight of carecl's method is copied
into their blocks (the up-projections and routers set away from zero). For one batch the script reports
the largest differences of:
- CIL: the logits of all seen classes (router noise off on both sides: their blocks' `is_train` set False),
  one AdamW training step on a task's classes (adapter dropout 0 on both sides, same batch and targets),
  and the noisy gates of one block under the same random seed (their noisy_top_k_gating);
- MTIL: the logits through task router 1 of 3, and through the bypass (their taskid None: plain CLIP).
Results go to benchmarks/results/moe_adapters_reference.json. Nothing here is imported by carecl or its tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from carecl.clip_backbone import tokenize  # noqa: E402
from carecl.config import config_from_dict  # noqa: E402
from carecl.engine import Experiment  # noqa: E402
from carecl.scenario import Task  # noqa: E402

TINY = {"embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "head_width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}


def carecl_method(options: dict):
    config = config_from_dict({
        "seed": 0,
        "data": {"dataset": "synthetic", "synthetic_classes": 6, "synthetic_train_per_class": 4,
                 "synthetic_test_per_class": 2, "image_size": 32, "init_cls": 2, "increment": 2},
        "backbone": {"family": "open_clip", "name": "custom", "pretrained": False, "model_kwargs": TINY},
        "train": {"device": "cpu", "optimizer": "adamw", "lr": 0.001, "weight_decay": 0.0, "progress": False},
        "method": {"name": "moe_adapters", **options}})
    return Experiment.build(config).method


def load_package(reference: Path, folder: str) -> types.ModuleType:
    """Their `<folder>/clip/model.py` and `adapter.py` as a package (read from the checkout or its git objects)."""
    target = Path(tempfile.mkdtemp()) / f"ref_{folder}_clip"
    target.mkdir()
    for name in ("model.py", "adapter.py"):
        source = reference / folder / "clip" / name
        text = source.read_text() if source.is_file() else subprocess.run(
            ["git", "-C", str(reference), "show", f"HEAD:{folder}/clip/{name}"], check=True, capture_output=True,
            text=True).stdout
        (target / name).write_text(text)
    (target / "__init__.py").write_text("")
    spec = importlib.util.spec_from_file_location(target.name, target / "__init__.py",
                                                  submodule_search_locations=[str(target)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[target.name] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{target.name}.model")


def randomise_method(method, routers: int) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for injector in method.injectors:
            while injector.n_routers < routers:
                injector.add_router()
            for parameter in injector.banks.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def their_blocks(model) -> list:
    return [*model.visual.transformer.resblocks, *model.transformer.resblocks]


def copy_experts(method, model, mtil: bool) -> None:
    ours = [*method.image_moe.banks, *method.text_moe.banks]
    with torch.no_grad():
        for bank, block in zip(ours, their_blocks(model)):
            experts = block.adaptmlp_list
            for mine, theirs in zip(bank.experts, experts):
                theirs.down_proj.load_state_dict(mine.down.state_dict())
                theirs.up_proj.load_state_dict(mine.up.state_dict())
            for index in range(len(bank.gates)):
                block.router_list[index].copy_(bank.gates[index])
                block.w_noise_list[index].copy_(bank.noise[index])
            block.is_train = False  # router noise off, as carecl's evaluation
            if mtil:
                block.noisy_gating = False


def build_theirs(module, method, mtil: bool, experts: int):
    state = {k: v.clone() for k, v in method.clip.state_dict().items() if not k.endswith("attn_mask")}
    if mtil:
        args = types.SimpleNamespace(experts_num=experts, ffn_num=64, ffn_adapt=True, ffn_option="parallel",
                                     ffn_adapter_layernorm_option="none", ffn_adapter_init_option="lora",
                                     ffn_adapter_scalar="0.1", ffn_adapt_where="AdapterDoubleEncoder",
                                     apply_moe=True, task_id=0, repeat_train=False, task_num=11, topk=2,
                                     is_train=False, autorouter=True)
        model = module.build_model(state, args)
    else:
        model = module.build_model(state)
    copy_experts(method, model, mtil)
    return model.eval()


def cil(reference: Path) -> dict:
    module = load_package(reference, "cil")
    method = carecl_method({"moe": {"experts": 2, "top_k": 2}}).eval()
    method.begin_task(method.scenario.task(0))
    randomise_method(method, routers=1)
    model = build_theirs(module, method, mtil=False, experts=2)
    images = torch.rand(4, 3, 32, 32)
    seen = Task(-1, 0, 4)
    names = method.scenario.names(0, 4)
    tokens = tokenize(method.clip, [method.options.template.format(n) for n in names])
    with torch.no_grad():
        mine = method.scores(images, seen, route=0)
        theirs, _ = model(images, tokens, 0, is_train=False)
    results = {"cil_logits_max_abs_diff": (mine - theirs).abs().max().item(), "logit_scale": method.logit_scale.item()}

    # One training step on task 1's classes, dropout 0 and no router noise on both sides.
    task = method.scenario.task(0)
    targets = torch.tensor([0, 1, 1, 0])
    for adapter in [e for injector in method.injectors for bank in injector.banks for e in bank.experts]:
        adapter.dropout.p = 0.0
    for block in their_blocks(model):
        for adapter in block.adaptmlp_list:
            adapter.dropout = 0.0
    method.train()
    method.set_route = lambda route, noisy, counting=False: type(method).set_route(method, route, False, counting)
    ours_optimizer = torch.optim.AdamW([p for i in method.injectors for p in i.banks.parameters() if p.requires_grad],
                                       lr=1e-3, weight_decay=0.0)
    loss = method.training_loss(images, targets + task.low, task).loss
    ours_optimizer.zero_grad()
    loss.backward()
    ours_optimizer.step()
    model.train()
    params = [v for k, v in model.named_parameters() if "adaptmlp" in k or "router" in k or "noise" in k]
    for k, v in model.named_parameters():
        v.requires_grad_("adaptmlp" in k or "router" in k or "noise" in k)
    their_optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    task_tokens = tokenize(method.clip, [method.options.template.format(n) for n in method.scenario.names(0, 2)])
    logits, _ = model(images, task_tokens, 0, is_train=True)
    their_loss = F.cross_entropy(logits, targets)
    their_optimizer.zero_grad()
    their_loss.backward()
    results["cil_training_loss_diff"] = abs(loss.item() - their_loss.item())
    pairs = [(mine.up.weight, theirs.up_proj.weight) for bank, block in zip(
        [*method.image_moe.banks, *method.text_moe.banks], their_blocks(model))
        for mine, theirs in zip(bank.experts, block.adaptmlp_list)]
    results["cil_gradient_max_rel_diff"] = max((a.grad - b.grad).abs().max().item() / b.grad.abs().max().item()
                                               for a, b in pairs)
    their_optimizer.step()
    worst = 0.0
    for bank, block in zip([*method.image_moe.banks, *method.text_moe.banks], their_blocks(model)):
        for mine_expert, their_expert in zip(bank.experts, block.adaptmlp_list):
            worst = max(worst, (mine_expert.up.weight - their_expert.up_proj.weight).abs().max().item(),
                        (mine_expert.down.weight - their_expert.down_proj.weight).abs().max().item())
        worst = max(worst, (bank.gates[0] - block.router_list[0]).abs().max().item())
    # Adam's first step is about lr x sign(gradient): elements whose gradient is near Adam's eps can differ by
    # up to lr from rounding alone, so this is a coarse check; the gradients above are the fine one.
    results["cil_after_one_step_max_abs_diff"] = worst

    # Noisy gates of one block from the same random numbers.
    block, bank = their_blocks(model)[0], method.image_moe.banks[0]
    block.is_train = True
    tokens0 = torch.randn(5, 128)
    torch.manual_seed(7)
    their_gates, _ = block.noisy_top_k_gating(tokens0, True, block.router_list[0], block.w_noise_list[0])
    from carecl.tuners.moe_adapter import noisy_top_k_gates

    torch.manual_seed(7)
    my_gates = noisy_top_k_gates(tokens0, bank.gates[0], bank.noise[0], 2, True, 0.01)
    results["noisy_gates_max_abs_diff"] = (my_gates - their_gates).abs().max().item()
    return results


def mtil(reference: Path) -> dict:
    module = load_package(reference, "mtil")
    method = carecl_method({"moe": {"experts": 6, "top_k": 2}, "routers": "per_task", "freeze_top_experts": 2,
                            "ddas": {"features": "clip_image"}}).eval()
    for index in range(3):
        method.begin_task(method.scenario.task(index))
    randomise_method(method, routers=3)
    model = build_theirs(module, method, mtil=True, experts=6)
    images = torch.rand(4, 3, 32, 32)
    task = method.scenario.task(1)
    tokens = tokenize(method.clip, [method.options.template.format(n) for n in method.scenario.names(task.low, task.high)])
    results = {}
    with torch.no_grad():
        for route, their_route in ((1, 1), (None, -1)):  # their val_task_id -1: the zero-shot bypass
            mine = method.scores(images, task, route)
            image = F.normalize(model.encode_image(images, their_route), dim=-1)
            text = F.normalize(model.encode_text(tokens, their_route), dim=-1)
            theirs = model.logit_scale.exp() * image @ text.t()
            results[f"mtil_logits_route_{route}_max_abs_diff"] = (mine - theirs).abs().max().item()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout (or bare mirror) of JiazuoYu/MoE-Adapters4CL")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "moe_adapters_reference.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"reference": "JiazuoYu/MoE-Adapters4CL", **cil(args.reference)}
    try:
        results.update(mtil(args.reference))
    except (AttributeError, TypeError) as error:
        results["mtil_error"] = f"{type(error).__name__}: {error}"
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
