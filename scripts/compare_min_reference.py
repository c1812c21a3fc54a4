"""Compare carecl's MIN with the authors' code (ASCIIJK's commit 292d883, kept in thuwng/MiN-NeurIPS2025) on a small ViT.

    git clone https://github.com/thuwng/MiN-NeurIPS2025 /tmp/min_ref && git -C /tmp/min_ref checkout 292d883
    python scripts/compare_min_reference.py --reference /tmp/min_ref

Their ViT (MiN/backbones/ViT_MiN.py, which hard-codes a width of 768 for its noise) gets the weights of a
2-block, 768-wide timm ViT, and carecl's random buffer and noise projections. Their network (MiNbaseNet) and
their learner's own methods (`run`, `fit_fc`, `re_fit`, `get_task_prototype`, compiled from their files and run
on a bare object: their modules download weights and need CUDA) then learn three tasks from the same fixed
batches as carecl's MIN, in their order: task 0 trains the noise's mlp, its pair and the LayerNorms, then fits;
later tasks fit first, then set the mixture from the prototypes and train their own pair. Per task the script
reports the largest differences of the training losses, the trained weights, the mixture weights, the
prototypes, the analytic classifier (W and R), and at the end the test logits and predictions.
Results go to benchmarks/results/min_reference.json. Nothing here is imported by carecl or its tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from carecl.engine import Experiment  # noqa: E402
from carecl.methods.base import TaskContext  # noqa: E402
from helpers import tiny_config  # noqa: E402
from reference_tools import bare_class, max_diff, train_ours  # noqa: E402

VIT = {"img_size": 32, "patch_size": 16, "embed_dim": 768, "depth": 2, "num_heads": 12}
HIDDEN, BUFFER, GAMMA, FIT_EPOCHS, FIT_BATCH = 16, 256, 10.0, 2, 8
BATCH, EPOCHS, LR, WEIGHT_DECAY, PER_CLASS = 4, 2, 0.05, 5e-4, 6
OPTIONS = {"name": "min", "noise": {"hidden": HIDDEN}, "buffer_size": BUFFER, "gamma": GAMMA, "fit_epochs": FIT_EPOCHS,
           "fit_batch_size": FIT_BATCH, "later_epochs": EPOCHS}


class OnCpu:
    """Their PiNoise builds its projections on "cuda:0": the torch their module sees, with devices on the CPU."""

    def __getattr__(self, name):
        return (lambda *args, **kwargs: torch.device("cpu")) if name == "device" else getattr(torch, name)


def their_network(reference: Path, method):
    sys.path.insert(0, str(reference / "MiN"))
    from backbones import ViT_MiN, linears
    ViT_MiN.torch = OnCpu()
    args = {"hidden_dim": HIDDEN, "gamma": GAMMA, "buffer_size": BUFFER, "device": "cpu"}
    vit = ViT_MiN.VisionTransformer(num_classes=0, weight_init="skip", args=args, **VIT)
    missing, unexpected = vit.load_state_dict(method.backbone.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("noise_maker") for k in missing), (missing, unexpected)
    vit.out_dim, vit.layer_num = VIT["embed_dim"], VIT["depth"]
    for ours, theirs in zip(method.noise.layers, vit.noise_maker):
        theirs.w_down.copy_(ours.down)
        theirs.w_up.copy_(ours.up)
    incnet = reference / "MiN" / "utils" / "inc_net.py"
    namespace = {"torch": torch, "nn": nn, "F": F, "SimpleLinear": linears.SimpleLinear,
                 "get_pretrained_backbone": lambda args: vit}
    bare_class(incnet, "RandomBuffer", ("__init__", "forward"), namespace, bases="torch.nn.Linear")
    network_class = bare_class(incnet, "MiNbaseNet", (
        "__init__", "forward_fc", "in_features", "out_features", "update_fc", "fit", "forward", "update_task_prototype",
        "extend_task_prototype", "extract_feature", "forward_normal_fc", "update_noise", "unfreeze_noise",
        "init_unfreeze"), namespace, bases="nn.Module")
    network = network_class(args)
    network.buffer.weight.copy_(method.buffer)  # their buffer's W is its registered `weight`
    return network


def their_learner(reference: Path, network):
    sys.path.insert(0, str(reference / "MiN"))
    from utils.training_tool import get_optimizer, get_scheduler
    namespace = {"torch": torch, "F": F, "tqdm": partial(tqdm, disable=True), "get_optimizer": get_optimizer, "get_scheduler": get_scheduler}
    learner = bare_class(reference / "MiN" / "models" / "MiN.py", "MinNet",
                         ("fit_fc", "re_fit", "run", "get_task_prototype"), namespace)()
    learner._network, learner.device, learner.logger = network, "cpu", logging.getLogger("min-reference")
    learner.args = {"optimizer_type": "sgd", "scheduler_type": "step"}
    learner.init_epochs = learner.epochs = EPOCHS
    learner.init_lr = learner.lr = LR
    learner.init_weight_decay = learner.weight_decay = WEIGHT_DECAY
    learner.fit_epoch, learner.cur_task = FIT_EPOCHS, -1
    return learner


def task_data(task, generator, per_class=PER_CLASS):
    labels = torch.arange(task.low, task.high).repeat_interleave(per_class)
    images = torch.rand(len(labels), 3, VIT["img_size"], VIT["img_size"], generator=generator)
    images += labels[:, None, None, None] * 0.05  # a little class signal
    order = torch.randperm(len(labels), generator=generator)
    return images[order], labels[order]


def batched(images, labels, size):
    return [(images[i:i + size], labels[i:i + size]) for i in range(0, len(labels), size)]


def their_loader(images, labels, size):
    return [(None, x, y) for x, y in batched(images, labels, size)]


def our_context(experiment, task, images, labels) -> TaskContext:
    """Augmented and plain passes are the same fixed images, in their order, in batches of the size asked for."""
    return TaskContext(task, experiment.scenario, torch.device("cpu"), lambda: batched(images, labels, FIT_BATCH),
                       augmented_loader=lambda size, number: batched(images, labels, size))


def learn_theirs(learner, network, task, images, labels) -> list[float]:
    """Their init_train / increment_train, step for step, on fixed batches (their loaders without shuffling)."""
    losses = []
    original = F.cross_entropy

    def recorded(*args, **kwargs):
        loss = original(*args, **kwargs)
        losses.append(loss.item())
        return loss

    learner.cur_task += 1
    fits = their_loader(images, labels, FIT_BATCH)
    if task.index > 0:
        learner.fit_fc(fits, None)
    network.update_fc(task.size)
    network.update_noise()
    network.extend_task_prototype(learner.get_task_prototype(network, their_loader(images, labels, BATCH)))
    F.cross_entropy = recorded
    try:
        learner.run(their_loader(images, labels, BATCH))
    finally:
        F.cross_entropy = original
    network.update_task_prototype(learner.get_task_prototype(network, their_loader(images, labels, BATCH)))
    if task.index == 0:
        learner.fit_fc(fits, None)
    learner.re_fit(fits, None)
    return losses


def noise_pair_diff(method, network) -> float:
    """Our current pair against their newest μ, σ in every block."""
    return max(max(max_diff(ours.mean[0].weight, theirs.mu[-1].weight), max_diff(ours.scale[0].weight, theirs.sigmma[-1].weight),
                   max_diff(ours.mean[0].bias, theirs.mu[-1].bias))
               for ours, theirs in zip(method.noise.layers, network.backbone.noise_maker))


def compare(reference: Path) -> dict:
    torch.manual_seed(0)
    config = tiny_config(method=OPTIONS, backbone={"name": "vit_tiny_patch16_224", "pretrained": False,
                                                   "model_kwargs": VIT},
                         train={"epochs": EPOCHS, "lr": LR, "batch_size": BATCH, "weight_decay": WEIGHT_DECAY,
                                "optimizer": "sgd", "momentum": 0.9}, data={"image_size": VIT["img_size"]})
    experiment = Experiment.build(config)
    method = experiment.method
    network = their_network(reference, method)
    learner = their_learner(reference, network)
    generator, results = torch.Generator().manual_seed(1), {"tasks": []}
    for task in method.scenario.tasks():
        images, labels = task_data(task, generator)
        context = our_context(experiment, task, images, labels)
        method.begin_task(task)
        method.prepare_task(context)
        our_losses = train_ours(method, experiment, task, batched(images, labels, BATCH))
        method.finish_task(context)
        their_losses = learn_theirs(learner, network, task, images, labels)
        first = network.backbone.noise_maker[0]
        row = {
            "training_losses": max_diff(our_losses, their_losses),
            "mixture_weights": max_diff(method.noise.mixture, first.weight_noise.detach()),
            "noise_pair_after_training": noise_pair_diff(method, network),
            "noise_pair_largest_weight": max(layer.mean[0].weight.abs().max().item() for layer in method.noise.layers),
            "noise_mlp": max(max_diff(o.mlp.weight, t.MLP.weight) for o, t in zip(method.noise.layers, network.backbone.noise_maker)),
            "noise_mlp_largest_weight": max(layer.mlp.weight.abs().max().item() for layer in method.noise.layers),
            "layer_norms": max(max_diff(method.norms.norms[f"blocks_{i}_norm1"].weight, block.norm1.weight)
                               for i, block in enumerate(network.backbone.blocks)),
            "prototype": max_diff(method.prototypes[-1], network.task_prototypes[-1]),
            "analytic_weight": max_diff(method.analytic.weight, network.weight),
            "analytic_inverse": max_diff(method.analytic.inverse, network.R),
            "analytic_weight_scale": network.weight.abs().max().item(),
        }
        results["tasks"].append(row)
    results.update(compare_predictions(method, network, generator))
    return results


def compare_predictions(method, network, generator) -> dict:
    images = torch.rand(24, 3, VIT["img_size"], VIT["img_size"], generator=generator)
    method.eval(), network.eval()
    with torch.no_grad():
        ours = method.predict(images)
        theirs = network(images)["logits"]
    return {"test_images": len(images), "test_logits": max_diff(ours, theirs),
            "predictions_equal": int((ours.argmax(1) == theirs.argmax(1)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of thuwng/MiN-NeurIPS2025 at 292d883")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    results = compare(args.reference.resolve())
    path = ROOT / "benchmarks" / "results" / "min_reference.json"
    path.write_text(json.dumps({"reference": "thuwng/MiN-NeurIPS2025 @ 292d883 (ASCIIJK)", "vit": VIT, "hidden": HIDDEN,
                                "buffer_size": BUFFER, "gamma": GAMMA, "batch_size": BATCH, "epochs": EPOCHS,
                                "results": results}, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
