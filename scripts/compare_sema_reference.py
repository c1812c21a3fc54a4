"""Compare carecl's SEMA layer with the authors' (huiyiwang01's SEMA-CL, commit 5a45512 "code for SEMA") on one block.

    python scripts/compare_sema_reference.py --reference /path/to/SEMA-CL [--commit 5a45512]

Their `backbone/sema_block.py` and `sema_components.py` are read from the checkout (at the commit, through
git) and run on CPU (their `.cuda()` calls made no-ops). One expandable block with three adapters (the
third newly added, its router column in `new_router`) gets carecl's weights, and both see the same
residual stream: the script reports the largest differences of the mixed adapter output, the newest
adapter's RD loss, the per-adapter z-scores after the same training losses entered both windows, and
whether both decide to expand for an in-distribution and an out-of-distribution batch.
Results go to benchmarks/results/sema_reference.json. Nothing here is imported by carecl or its tests.
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
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from carecl.tuners.sema import SEMAConfig, SEMALayer  # noqa: E402

WIDTH, BOTTLENECK, RD_DIM, BUFFER, THRESHOLD = 32, 8, 6, 20, 2.0


def load_reference(reference: Path, commit: str) -> types.ModuleType:
    folder = Path(tempfile.mkdtemp())
    (folder / "backbone").mkdir()
    for name in ("sema_block.py", "sema_components.py"):
        text = subprocess.run(["git", "-C", str(reference), "show", f"{commit}:backbone/{name}"], check=True,
                              capture_output=True, text=True).stdout
        (folder / "backbone" / name).write_text(text)
    (folder / "backbone" / "__init__.py").write_text("")
    sys.path.insert(0, str(folder))
    nn.Module.cuda = lambda self, device=None: self  # their routers are created with .cuda()
    spec = importlib.util.spec_from_file_location("backbone.sema_block", folder / "backbone" / "sema_block.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["backbone.sema_block"] = module
    spec.loader.exec_module(module)
    return module


def their_config():
    return types.SimpleNamespace(d_model=WIDTH, ffn_num=BOTTLENECK, ffn_adapter_init_option="lora", ffn_adapter_scalar="0.1",
                                 ffn_adapter_layernorm_option="none", adapt_start_layer=0, adapt_end_layer=0,
                                 rd_dim=RD_DIM, buffer_size=BUFFER, exp_threshold=THRESHOLD)


def build_pair(module):
    torch.manual_seed(0)
    ours = SEMALayer(WIDTH, SEMAConfig(BOTTLENECK, RD_DIM, BUFFER, THRESHOLD, 0, 0), expandable=True)
    theirs = module.SEMAModules(their_config(), layer_id=0, writer=None)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        ours.add_adapter()
    theirs.add_adapter()  # the second adapter, then its router column is merged as at the end of its task
    theirs.fix_router()
    theirs.add_adapter()  # the third, newly added: its column lives in new_router
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        for mine, their in zip(ours.adapters, theirs.adapters):
            their.functional.down_proj.load_state_dict(mine.functional.down.state_dict())
            their.functional.up_proj.load_state_dict(mine.functional.up.state_dict())
            their.rd.encoder.load_state_dict(mine.rd[0].state_dict())
            their.rd.decoder.load_state_dict(mine.rd[1].state_dict())
        theirs.router.weight.copy_(torch.cat([a.gate.weight for a in ours.adapters[:2]]))
        theirs.router.bias.copy_(torch.cat([a.gate.bias for a in ours.adapters[:2]]))
        theirs.new_router.weight.copy_(ours.adapters[2].gate.weight)
        theirs.new_router.bias.copy_(ours.adapters[2].gate.bias)
    for adapter in ours.adapters[:2]:
        adapter.newly_added.fill_(False)
    for adapter in theirs.adapters[:2]:
        adapter.newly_added = False
    return ours, theirs


def ours_forward(layer, hidden):
    """carecl's block branch for one layer (SEMAInjector._branch without the injector)."""
    mean_token = hidden.mean(dim=1)
    losses = torch.stack([a.rd_losses(mean_token) for a in layer.adapters])
    z_scores = torch.stack([a.window.z_scores(loss.detach()) for a, loss in zip(layer.adapters, losses)])
    weights = torch.cat([a.gate(mean_token) for a in layer.adapters], dim=1).softmax(dim=1)
    outputs = torch.stack([a.functional(hidden) for a in layer.adapters], dim=1)
    return (outputs * weights[:, :, None, None]).sum(dim=1), losses, z_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout (or bare mirror) of SEMA-CL")
    parser.add_argument("--commit", default="5a45512")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "sema_reference.json")
    args = parser.parse_args()
    module = load_reference(args.reference, args.commit)
    ours, theirs = build_pair(module)
    theirs.eval()
    hidden = torch.randn(5, 7, WIDTH)
    with torch.no_grad():
        # The same training losses enter both windows (their Records, carecl's LossWindow).
        for step in range(6):
            seen = torch.randn(5, 7, WIDTH, generator=torch.Generator().manual_seed(10 + step))
            _, losses, _ = ours_forward(ours, seen)
            for mine, their, loss in zip(ours.adapters, theirs.adapters, losses):
                mine.window.add(loss)
                their.add_z_score_record(loss)
        mine_out, mine_losses, mine_z = ours_forward(ours, hidden)
        their_out = theirs(hidden)
        their_z = torch.stack([a(hidden)[2] for a in theirs.adapters])
        results = {"reference": f"SEMA-CL {args.commit}",
                   "mixed_output_max_abs_diff": (mine_out - their_out["func_out"]).abs().max().item(),
                   "newest_rd_loss_abs_diff": abs(mine_losses[-1].mean().item() - their_out["rd_loss"].item()),
                   "z_scores_max_abs_diff": (mine_z - their_z).abs().max().item()}
        # Expansion decisions on an in-distribution and a shifted batch (their detecting path, the layer not yet grown).
        for name, batch in (("in_distribution", torch.randn(8, 7, WIDTH)), ("shifted", torch.randn(8, 7, WIDTH) * 30 + 10)):
            _, _, z = ours_forward(ours, batch)
            ours_expands = bool(z.mean(dim=1).min() > THRESHOLD)
            theirs.detecting_outlier, theirs.added_for_task = True, False
            count = len(theirs.adapters)
            their_expands = bool(theirs(batch)["added"])
            if len(theirs.adapters) > count:
                theirs.adapters = theirs.adapters[:count]  # undo their growth for the next check
            results[f"expands_{name}"] = {"carecl": ours_expands, "authors": their_expands}
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
