"""Compare carecl's EASE with the authors' code (sun-hailong/CVPR24-Ease) on a tiny ViT with shared weights.

    git clone https://github.com/sun-hailong/CVPR24-Ease /tmp/ease_ref
    python scripts/compare_ease_reference.py --reference /tmp/ease_ref

The authors' ViT (their backbone/vit_ease.py) is loaded with the weights of carecl's tiny timm ViT, both
get the same three adapter sets, and the script reports the largest differences between:
1. the task-free features (their `forward(test=True)`: every adapter, concatenated) and carecl's
   batched `subspace_features`;
2. each adapter's own features (their `forward_proto`);
3. the prototype complement (their `Learner.solve_sim_reset`, run on a bare learner) on random prototypes;
4. the reweighted scores (their `CosineLinear.forward_reweight`), with and without `use_init_ptm`.
Results go to benchmarks/results/ease_reference.json. Nothing here is imported by carecl or its tests.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from carecl.engine import Experiment  # noqa: E402
from helpers import TINY_VIT, tiny_config  # noqa: E402
from reference_tools import load_pilot_vit  # noqa: E402

N_TASKS = 3


def reference_modules(path: Path):
    sys.path.insert(0, str(path))
    from backbone import linears, vit_ease  # the authors' modules, from their checkout
    return vit_ease, linears


def reference_vit(vit_ease, ours: torch.nn.Module, bottleneck: int) -> torch.nn.Module:
    """Their VisionTransformer with our ViT's weights (their q/k/v split and MLP names)."""
    config = SimpleNamespace(ffn_adapt=True, ffn_option="parallel", ffn_adapter_layernorm_option="none",
                             ffn_adapter_init_option="lora", ffn_adapter_scalar="0.1", ffn_num=bottleneck,
                             d_model=TINY_VIT["embed_dim"], vpt_on=False, vpt_num=0, _device="cpu")
    theirs = vit_ease.VisionTransformer(img_size=TINY_VIT["img_size"], patch_size=TINY_VIT["patch_size"],
                                        embed_dim=TINY_VIT["embed_dim"], depth=TINY_VIT["depth"],
                                        num_heads=TINY_VIT["num_heads"], num_classes=0, qkv_bias=True,
                                        tuning_config=config)
    return load_pilot_vit(theirs, ours.state_dict(), TINY_VIT["embed_dim"]).eval()


def copy_adapters(method, theirs) -> None:
    """Our sets 0..T-2 into their adapter_list, the last into their cur_adapter."""
    def copied(our_set):
        target = torch.nn.ModuleList()
        theirs.get_new_adapter()
        for ours, their in zip(our_set, theirs.cur_adapter):
            their.down_proj.load_state_dict(ours.down.state_dict())
            their.up_proj.load_state_dict(ours.up.state_dict())
            target.append(their.eval())  # their adapter_list is a plain list: .eval() on the ViT never reaches it
        return target
    theirs.adapter_list = [copied(s) for s in method.bank.sets[:-1]]
    theirs.cur_adapter = copied(method.bank.sets[-1])


def bare_learner(ease_module: Path, method, use_init_ptm: bool):
    """Their Learner's `solve_sim_reset` (and `get_cls_range`) on an object holding just what it reads (their module imports
    the whole PILOT tree, so the method's source is taken from the file and nothing else runs)."""
    source = ease_module.read_text()
    learner = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef) and node.name == "Learner")
    methods = [ast.get_source_segment(source, node) for node in learner.body
               if isinstance(node, ast.FunctionDef) and node.name in ("solve_sim_reset", "get_cls_range")]
    namespace = {"torch": torch, "F": torch.nn.functional}
    exec(compile("class Learner:\n    " + "\n\n    ".join(methods), str(ease_module), "exec"), namespace)
    scenario = method.scenario
    bare = namespace["Learner"]()
    bare.moni_adam, bare.use_init_ptm = False, use_init_ptm
    bare._cur_task, bare.init_cls, bare.inc = N_TASKS - 1, scenario.sizes[0], scenario.sizes[1]
    bare._total_classes, bare._device = scenario.n_classes, "cpu"
    return bare


def compare(reference: Path) -> dict:
    torch.manual_seed(0)
    vit_ease, linears = reference_modules(reference)
    results = {}
    for use_init_ptm in (False, True):
        options = {"name": "ease", "adapter": {"bottleneck": 4}, "alpha": 0.3, "use_init_ptm": use_init_ptm, "beta": 0.7}
        method = Experiment.build(tiny_config(method=options)).method
        for task in method.scenario.tasks():
            method.begin_task(task)
        with torch.no_grad():
            for adapters in method.bank.sets:
                for parameter in adapters.parameters():
                    torch.nn.init.normal_(parameter, std=0.3)
        method._n_learned_tasks = N_TASKS
        method.eval()
        theirs = reference_vit(vit_ease, method.backbone, bottleneck=4)
        copy_adapters(method, theirs)
        images = torch.rand(5, 3, TINY_VIT["img_size"], TINY_VIT["img_size"])
        width = method.backbone.num_features
        with torch.no_grad():
            ours = method.subspace_features(images)
            their_all = theirs(images, test=True, use_init_ptm=use_init_ptm)
            their_each = torch.stack([theirs.forward_proto(images, adapt_index=i) for i in range(N_TASKS)], dim=1)
        offset = int(use_init_ptm)
        key = "with_init_ptm" if use_init_ptm else "adapters_only"
        results[key] = {"features_all_max_abs_diff": (ours.flatten(1) - their_all).abs().max().item(),
                        "features_each_max_abs_diff": (ours[:, offset:] - their_each).abs().max().item()}
        # Prototype complement and reweighted scores on random prototypes.
        with torch.no_grad():
            method.prototypes.normal_()
            fc = linears.CosineLinear(method.prototypes.shape[1] * width, method.scenario.n_classes)
            fc.weight.data = method.prototypes.flatten(1).clone()
            bare = bare_learner(reference / "models" / "ease.py", method, use_init_ptm)
            bare._network = SimpleNamespace(fc=fc, out_dim=width)
            bare.solve_sim_reset()
            method.complement_old_classes(N_TASKS - 1)
            results[key]["complement_max_abs_diff"] = (method.prototypes.flatten(1) - fc.weight.data).abs().max().item()
            scores = method.class_scores(ours)
            theirs_scores = fc.forward_reweight(their_all, cur_task=N_TASKS - 1, alpha=0.3, beta=0.7,
                                                init_cls=method.scenario.sizes[0], inc=method.scenario.sizes[1],
                                                out_dim=width, use_init_ptm=use_init_ptm)["logits"]
            results[key]["scores_max_abs_diff"] = (scores - theirs_scores).abs().max().item()
            results[key]["same_predictions"] = bool((scores.argmax(1) == theirs_scores.argmax(1)).all())
        results[key].update(compare_training_step(method, theirs, linears, images))
    return results


def compare_training_step(method, theirs, linears, images) -> dict:
    """The last task's loss and its adapters' gradients (dropout off in both: its masks cannot be matched)."""
    task = method.scenario.task(N_TASKS - 1)
    targets = torch.arange(task.low, task.high).repeat(len(images))[: len(images)]
    for ours, their in zip(method.bank.sets[-1], theirs.cur_adapter):
        ours.dropout.p, their.dropout = 0.0, 0.0
    head = linears.CosineLinear(method.backbone.num_features, task.size)
    method.proxy_head.weight.data.copy_(head.weight.data)
    method.proxy_head.sigma.data.copy_(head.sigma.data)
    method.train(), theirs.train()
    method.bank.sets[-1].requires_grad_(True)
    our_loss = method.training_loss(images, targets, task).loss
    our_loss.backward()
    their_loss = torch.nn.functional.cross_entropy(head(theirs(images, test=False))["logits"], targets - task.low)
    their_loss.backward()
    gradient_diff = max((ours.down.weight.grad - their.down_proj.weight.grad).abs().max().item()
                        for ours, their in zip(method.bank.sets[-1], theirs.cur_adapter))
    return {"training_loss_abs_diff": abs(our_loss.item() - their_loss.item()),
            "adapter_gradient_max_abs_diff": gradient_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of sun-hailong/CVPR24-Ease")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = compare(args.reference.resolve())
    path = ROOT / "benchmarks" / "results" / "ease_reference.json"
    path.write_text(json.dumps({"reference": "sun-hailong/CVPR24-Ease", "tiny_vit": TINY_VIT, "tasks": N_TASKS,
                                "results": results}, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
