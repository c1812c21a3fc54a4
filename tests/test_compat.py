"""Release checkpoints (spec §8): import against the dense oracle and a release-style forward, errors, export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from brmoe_oracle import dense_forward
from helpers import N_CLASSES, Shape, TASK_SIZES, TINY, TINY_VIT, release_care_config, release_checkpoint, save

from carecl.cli.main import main
from carecl.compat import (
    ReferenceCheckpointError,
    export_reference,
    import_reference,
    load_reference,
    read_reference_checkpoint,
)
from carecl.compat.reference import build_from_reference
from carecl.compat.reference_layout import group_keys
from carecl.compat.release_json import load_experiment_file
from carecl.engine import load_experiment, run_experiment
from carecl.errors import CareclError
from carecl.runs.directory import RunDirectory
from carecl.scenario import class_order

pytestmark = pytest.mark.usefixtures("single_thread")

RELEASE_CONFIGS = Path(__file__).parent / "data" / "release"


# ---------------------------------------------------------------- a checkpoint in the release's layout


# ---------------------------------------------------------------- a release-style forward on the raw tensors


def _layer_norm(state, prefix, x, eps):
    return F.layer_norm(x, x.shape[-1:], state[prefix + "weight"], state[prefix + "bias"], eps)


def _linear(state, prefix, x):
    return x @ state[prefix + "weight"].T + state[prefix + "bias"]


def _adapter(state, prefix, x):
    hidden = torch.relu(_linear(state, prefix + "down_proj.", _layer_norm(state, prefix + "adapter_layer_norm_before.", x, 1e-5)))
    return _linear(state, prefix + "up_proj.", hidden) * state[prefix + "scale"]


def _entropy(logits):
    p = logits.softmax(-1)
    return -(p * torch.log(p + 1e-10)).sum(-1)


def _attention(state, prefix, x, heads):
    batch, tokens, dim = x.shape
    q, k, v = (_linear(state, prefix + f"attn.{part}_proj.", x).view(batch, tokens, heads, dim // heads).transpose(1, 2)
               for part in "qkv")
    weights = (q @ k.transpose(-1, -2) * (dim // heads) ** -0.5).softmax(-1)
    return _linear(state, prefix + "attn.proj.", (weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


def _release_moe(state, prefix, z, task, n_tasks, topk_experts, topk_routers):
    """Shared adapter + Σ over selected routers of their top-K softmax mixture of all-token expert outputs."""
    n_experts = n_tasks if task is None else task + 1
    outputs = torch.stack([_adapter(state, prefix + f"adapter.{i}.", z) for i in range(n_experts)], 1)  # B E N C
    shared = _adapter(state, prefix + "shared_adapter.", z)
    if n_experts == 1:
        return shared + outputs[:, 0]
    cls = outputs[:, :, 0]
    entropy = torch.stack([
        _entropy(_linear(state, prefix + f"latent_head.{i}.1.", _layer_norm(state, prefix + f"latent_head.{i}.0.", cls[:, i], 1e-5)))
        for i in range(n_experts)], 1)
    scores = torch.full((z.shape[0], n_experts, n_experts), float("-inf"), dtype=z.dtype)
    for i in range(n_experts):
        scores[:, i, : i + 1] = _linear(state, prefix + f"router.{i}.", cls[:, i])
    if task is None:
        chosen = entropy.argsort(1)[:, :topk_routers]
    else:
        others = entropy[:, :task].argsort(1)[:, : max(topk_routers - 1, 0)]
        chosen = torch.cat([torch.full((z.shape[0], 1), task), others], 1)
    mixture = torch.zeros(z.shape[0], n_experts, dtype=z.dtype)
    for sample, routers in enumerate(chosen):
        for router in routers.tolist():
            row = scores[sample, router]
            if topk_experts < n_experts:
                kept = row.topk(topk_experts).indices
                row = torch.full_like(row, -100.0).index_copy(0, kept, row[kept])
            mixture[sample] += row.softmax(0)
    return shared + torch.einsum("be,benc->bnc", mixture, outputs)


def release_forward(state, images, task, *, heads, patch, topk_experts, topk_routers):
    """(final-norm CLS features, unscaled cosine logits) computed from the release's tensors directly."""
    n_tasks = len([key for key in state if key.startswith("fc.heads.")])
    depth = len({key.split(".")[2] for key in state if key.startswith("backbone.blocks.")})
    x = F.conv2d(images, state["backbone.patch_embed.proj.weight"], state["backbone.patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["backbone.cls_token"].expand(len(x), -1, -1), x], 1) + state["backbone.pos_embed"]
    for block in range(depth):
        prefix = f"backbone.blocks.{block}."
        x = x + _attention(state, prefix, _layer_norm(state, prefix + "norm1.", x, 1e-6), heads)
        mlp = _linear(state, prefix + "fc2.", F.gelu(_linear(state, prefix + "fc1.", _layer_norm(state, prefix + "norm2.", x, 1e-6))))
        x = x + mlp + _release_moe(state, f"backbone.adapter.adapter_layer{block}.", x, task, n_tasks, topk_experts, topk_routers)
    features = _layer_norm(state, "backbone.norm.", x, 1e-6)[:, 0]
    weights = torch.cat([state[f"fc.heads.{i}.0.weight"] for i in range(n_tasks)])
    return features, F.normalize(features, dim=-1) @ F.normalize(weights, dim=-1).T


# ---------------------------------------------------------------- helpers


def images(batch: int = 6, size: int = 16, seed: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def outputs(experiment, x: torch.Tensor, n_tasks: int) -> dict:
    with torch.no_grad():
        result = {task: experiment.features(x, task=task) for task in [None, *range(n_tasks)]}
        result["logits"] = experiment.logits(x)
    return result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save(release_checkpoint(TINY, TASK_SIZES, N_CLASSES), tmp_path_factory.mktemp("release") / "care_task3.pth")


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("topk_experts, topk_routers", [(2, 2), (1, 3)])
def test_imported_outputs_match_release_forward_and_dense_oracle(checkpoint, topk_experts, topk_routers):
    config = release_care_config(topk_experts, topk_routers)
    raw = read_reference_checkpoint(checkpoint)
    release64 = {key: value.double() for key, value in raw.items()}
    reference = {"heads": TINY.heads, "patch": TINY.patch, "topk_experts": topk_experts, "topk_routers": topk_routers}
    x = images(dtype=torch.float64)

    experiment = load_reference(checkpoint, config)
    assert experiment.n_learned_tasks == len(TASK_SIZES) and experiment.n_seen_classes == sum(TASK_SIZES)
    assert experiment.model.task_sizes == TASK_SIZES
    assert len(experiment.statistics) == 0
    float32 = outputs(experiment, x.float(), len(TASK_SIZES))
    float64 = outputs(experiment.double(), x, len(TASK_SIZES))
    for task in [None, *range(len(TASK_SIZES))]:
        features, logits = release_forward(release64, x, task, **reference)
        assert relative_error(float64[task], features) < 1e-10, f"task={task}"
        assert relative_error(float32[task], features) < 1e-4, f"task={task}"
        with torch.no_grad():
            oracle_features, _ = dense_forward(experiment.model, x, task=task)
        assert relative_error(float64[task], oracle_features) < 1e-10, f"task={task}"
        if task is None:
            assert float64["logits"].shape == (len(x), sum(TASK_SIZES))
            assert relative_error(float64["logits"], logits) < 1e-10
            assert relative_error(float32["logits"], logits) < 1e-4

    # The comparison can fail: the adapters, routing and q/k/v order all change the outputs.
    unscaled = {key: (value * 0 if key.endswith(".scale") else value) for key, value in release64.items()}
    assert relative_error(release_forward(unscaled, x, None, **reference)[0], float64[None]) > 1e-3
    swapped = {**release64}
    for block in range(TINY.depth):
        prefix = f"backbone.blocks.{block}.attn."
        swapped[prefix + "q_proj.weight"], swapped[prefix + "k_proj.weight"] = (
            release64[prefix + "k_proj.weight"], release64[prefix + "q_proj.weight"])
    assert relative_error(release_forward(swapped, x, None, **reference)[0], float64[None]) > 1e-3
    assert relative_error(float64[None], float64[len(TASK_SIZES) - 1]) > 1e-3


def test_tensors_land_where_the_spec_says(checkpoint):
    raw = read_reference_checkpoint(checkpoint)
    experiment = load_reference(checkpoint, release_care_config())
    attention = experiment.model.vit.blocks[1].attn
    expected_qkv = torch.cat([raw[f"backbone.blocks.1.attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(attention.qkv.weight, expected_qkv)
    assert torch.equal(experiment.model.vit.blocks[0].mlp.fc2.bias, raw["backbone.blocks.0.fc2.bias"])
    layer = experiment.model.layers[1]
    moe = "backbone.adapter.adapter_layer1."
    assert torch.equal(layer.shared.scale, raw[moe + "shared_adapter.scale"])
    assert torch.equal(layer.experts[2].norm.weight, raw[moe + "adapter.2.adapter_layer_norm_before.weight"])
    assert torch.equal(layer.experts[3].up_proj.weight, raw[moe + "adapter.3.up_proj.weight"])
    assert torch.equal(layer.routers[2].weight, raw[moe + "router.2.weight"])
    assert torch.equal(layer.perceptrons[0][1].weight, raw[moe + "latent_head.0.1.weight"])
    assert torch.equal(experiment.classifier.heads[3], raw["fc.heads.3.0.weight"])


def test_anchor_copies_and_data_parallel_prefix_are_ignored(checkpoint, tmp_path):
    raw = read_reference_checkpoint(checkpoint)
    noisy = dict(raw)
    for copy in ("ema_adapter", "_shared_adapter"):
        for key in [k for k in raw if ".shared_adapter." in k]:
            noisy[key.replace(".shared_adapter.", f".{copy}.")] = torch.randn(raw[key].shape)
    wrapped = {f"module.{key}": value for key, value in noisy.items()}
    x = images()
    expected = outputs(load_reference(checkpoint, release_care_config()), x, len(TASK_SIZES))
    for variant in (noisy, wrapped):
        got = outputs(load_reference(save(variant, tmp_path / "variant.pth"), release_care_config()), x, len(TASK_SIZES))
        assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_class_order_comes_from_the_config_over_the_datasets_classes(checkpoint, tmp_path):
    config = release_care_config()
    experiment = load_reference(checkpoint, config)
    assert experiment.scenario.n_classes == N_CLASSES  # from backbone.head.weight, not the 9 seen classes
    assert experiment.scenario.order.tolist() == class_order(N_CLASSES, config.seed).tolist()
    unshuffled = load_reference(checkpoint, release_care_config(shuffle=False))
    assert unshuffled.scenario.order.tolist() == list(range(N_CLASSES))

    state = read_reference_checkpoint(checkpoint)
    del state["backbone.head.weight"], state["backbone.head.bias"]
    headless = save(state, tmp_path / "headless.pth")
    assert load_reference(headless, config, n_classes=N_CLASSES).scenario.n_classes == N_CLASSES
    assert load_reference(headless, config).scenario.n_classes == sum(TASK_SIZES)  # assumed: all classes seen
    with pytest.raises(ReferenceCheckpointError, match="has 11 rows"):
        load_reference(checkpoint, config, n_classes=13)


def test_vit_base_layout_with_unequal_first_task():
    """ViT-B shapes (12 blocks, width 768, 12 heads, bottlenecks 64/16), the release's B100 Inc3 JSON."""
    shape = Shape(dim=768, depth=12, heads=12, patch=16, image=32, mlp=3072, adapter_dim=64, expert_dim=16)
    sizes = [100, 3, 3]
    state = release_checkpoint(shape, sizes, n_classes=1000, seed=5)
    config, _ = load_experiment_file(RELEASE_CONFIGS / "care_ob1k_b100inc3.json", ["backbone.model_kwargs.img_size=32"])
    assert config.data.root is None  # nothing is read from a dataset
    experiment = build_from_reference(state, config, "vit-b state").method  # load_reference minus torch.load
    assert experiment.model.task_sizes == sizes and experiment.scenario.n_classes == 1000
    assert experiment.model.vit.blocks[11].attn.qkv.weight.shape == (3 * 768, 768)
    assert experiment.model.layers[11].shared.down_proj.weight.shape == (64, 768)
    assert experiment.model.layers[11].experts[2].down_proj.weight.shape == (16, 768)
    assert experiment.model.layers[11].routers[2].weight.shape == (3, 768)
    x = images(batch=2, size=32)
    options = config.method
    reference = {"heads": 12, "patch": 16, "topk_experts": options.brmoe.topk_experts, "topk_routers": options.brmoe.topk_routers}
    with torch.no_grad():
        for task in (None, 0, 2):
            features, _ = release_forward(state, x, task, **reference)
            assert relative_error(experiment.features(x, task=task), features) < 1e-4, f"task={task}"
        assert relative_error(experiment.logits(x), release_forward(state, x, None, **reference)[1]) < 1e-4


# ---------------------------------------------------------------- errors


def test_every_missing_unexpected_and_misshaped_key_is_listed(tmp_path):
    state = release_checkpoint(TINY, TASK_SIZES, N_CLASSES)
    del state["backbone.blocks.0.attn.k_proj.weight"]
    del state["backbone.adapter.adapter_layer1.router.2.bias"]
    state["backbone.blocks.0.attn.qkv.weight"] = torch.randn(96, 32)
    state["backbone.adapter.adapter_layer0.adapter.9.scale"] = torch.randn(32)
    for block in range(TINY.depth):
        state[f"backbone.adapter.adapter_layer{block}.shared_adapter.down_proj.weight"] = torch.randn(16, 32)
    state["backbone.adapter.adapter_layer0.latent_head.1.1.weight"] = torch.randn(3, 32)
    path = save(state, tmp_path / "broken.pth")
    with pytest.raises(ReferenceCheckpointError) as caught:
        load_reference(path, release_care_config())
    message = str(caught.value)
    assert str(path) in message
    assert "missing (2 keys)" in message and "unexpected (2 keys)" in message and "mis-shaped (3 keys)" in message
    for key in ("backbone.blocks.0.attn.k_proj.weight", "backbone.adapter.adapter_layer1.router.2.bias",
                "backbone.blocks.0.attn.qkv.weight", "backbone.adapter.adapter_layer0.adapter.9.scale",
                "backbone.adapter.adapter_layer0.latent_head.1.1.weight: checkpoint (3, 32) vs expected (2, 32)"):
        assert key in message
    assert ("backbone.adapter.adapter_layer*.shared_adapter.down_proj.weight: checkpoint (16, 32) vs expected (8, 32)"
            " [blocks 0-1]") in message
    assert "adapter_dim is 16, the config's method.brmoe.adapter_dim is 8" in message


def test_heads_that_do_not_fit_init_cls_and_increment(checkpoint):
    with pytest.raises(ReferenceCheckpointError, match=r"have \[3, 2, 2, 2\] classes, but init_cls=2, increment=2") as caught:
        load_reference(checkpoint, release_care_config(init_cls=2))
    assert str(checkpoint) in str(caught.value)
    with pytest.raises(ReferenceCheckpointError, match="init_cls=3, increment=3"):
        load_reference(checkpoint, release_care_config(increment=3))


def test_heads_must_be_numbered_from_zero(tmp_path):
    state = release_checkpoint(TINY, TASK_SIZES, N_CLASSES)
    del state["fc.heads.1.0.weight"]
    with pytest.raises(ReferenceCheckpointError, match=r"fc\.heads\.1\.0\.weight missing"):
        load_reference(save(state, tmp_path / "gap.pth"), release_care_config())


class _Payload:
    """Unpickling this would create `marker`: weights_only must refuse before running anything."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_non_tensor_content_and_damaged_files_are_clear_errors(checkpoint, tmp_path):
    tensors_and_int = save({"fc.heads.0.0.weight": torch.zeros(3, 32), "epoch": 3}, tmp_path / "with_int.pth")
    with pytest.raises(ReferenceCheckpointError, match=r"non-tensor entries: 'epoch' \(int\)") as caught:
        read_reference_checkpoint(tensors_and_int)
    assert str(tensors_and_int) in str(caught.value)

    marker = tmp_path / "executed"
    pickled = save({"fc.heads.0.0.weight": torch.zeros(3, 32), "extra": _Payload(marker)}, tmp_path / "object.pth")
    with pytest.raises(ReferenceCheckpointError, match="pickled objects other than tensors") as caught:
        read_reference_checkpoint(pickled)
    assert str(pickled) in str(caught.value) and not marker.exists()

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(ReferenceCheckpointError, match="not a readable torch.save file") as caught:
        read_reference_checkpoint(truncated)
    assert str(truncated) in str(caught.value)

    with pytest.raises(ReferenceCheckpointError, match="holds a list"):
        read_reference_checkpoint(save([torch.zeros(2)], tmp_path / "list.pth"))
    with pytest.raises(ReferenceCheckpointError, match="checkpoint not found"):
        read_reference_checkpoint(tmp_path / "absent.pth")


def test_cli_import_error_exits_2_and_writes_nothing(tmp_path, capsys):
    state = release_checkpoint(TINY, TASK_SIZES, N_CLASSES)
    del state["backbone.norm.bias"]
    path = save(state, tmp_path / "broken.pth")
    config = write_release_json(tmp_path)
    code = main(["import-reference", "--checkpoint", str(path), "--config", str(config), "--output",
                 str(tmp_path / "run"), *TINY_OVERRIDES])
    assert code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "backbone.norm.bias" in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_group_keys_compacts_block_indices():
    keys = [f"backbone.blocks.{b}.norm1.weight" for b in (0, 1, 2, 5)] + ["fc.heads.0.0.weight"]
    assert group_keys(keys) == ["backbone.blocks.*.norm1.weight [blocks 0-2, 5]", "fc.heads.0.0.weight"]


# ---------------------------------------------------------------- run directories and export


TINY_OVERRIDES = [
    "--set", "backbone.model_kwargs={" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}",
    "--set", f"data.synthetic_classes={N_CLASSES}", "--set", "data.image_size=16",
    "--set", "data.synthetic_train_per_class=4", "--set", "data.synthetic_test_per_class=4",
    "--set", "train.device=cpu", "--set", "train.progress=false", "--set", "eval.topk=2",
]


def write_release_json(folder: Path) -> Path:
    """A release experiment file (as in its exps/ folder) for the tiny model on synthetic data."""
    settings = {
        "prefix": "care", "dataset": "synthetic", "shuffle": True, "init_cls": 3, "increment": 2,
        "model_name": "care", "backbone_type": "vit_tiny_patch16_224_brmoe", "device": ["0"], "seed": [1993],
        "tuned_epoch": 2, "init_lr": 0.01, "batch_size": 16, "weight_decay": 0.0005, "min_lr": 0,
        "optimizer": "sgd", "scheduler": "cosine", "crct_epochs": 2, "ca_lr": 0.005,
        "ca_storage_efficient_method": "covariance", "decay": False, "pretrained": True, "scale": 20, "m": 0,
        "iter_pred": True, "expert_dim": TINY.expert_dim, "adapter_dim": TINY.adapter_dim,
        "topk_experts": 2, "topk_routers": 2,
    }
    path = folder / "care_tiny.json"
    path.write_text(json.dumps(settings))
    return path


def test_import_eval_export_round_trip(checkpoint, tmp_path, monkeypatch, capsys):
    config = write_release_json(tmp_path)
    run = tmp_path / "imported"
    assert main(["import-reference", "--checkpoint", str(checkpoint), "--config", str(config),
                 "--output", str(run), *TINY_OVERRIDES]) == 0
    out = capsys.readouterr().out
    assert "imported 4 tasks" in out and "no class statistics" in out
    note = json.loads((run / "reference_import.json").read_text())
    assert note["task_sizes"] == TASK_SIZES and note["n_classes"] == N_CLASSES
    assert "backbone.head.weight" in note["ignored_keys"]
    assert not (run / "metrics.json").exists()

    # Moved, and used from another working directory: the backbone file travels with the run.
    moved = tmp_path / "elsewhere" / "imported"
    shutil.move(str(run), str(moved))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--run", str(moved)]) == 0
    out = capsys.readouterr().out
    assert "after task 4/5" in out and "(recorded -)" in out

    experiment = load_experiment(RunDirectory.open(moved)).method.eval()
    direct = load_reference(checkpoint, config, overrides=TINY_OVERRIDES[1::2])
    x = images()
    assert_same_outputs(outputs(experiment, x, 4), outputs(direct, x, 4))

    exported = tmp_path / "exported.pth"
    assert main(["export-reference", "--run", str(moved), "--output", str(exported)]) == 0
    original, written = read_reference_checkpoint(checkpoint), read_reference_checkpoint(exported)
    assert set(written) == set(original)
    for key, value in original.items():
        if key.startswith("backbone.head."):
            assert written[key].shape == value.shape and not written[key].any()
        else:
            assert torch.equal(written[key], value), key
    again = load_reference(exported, config, overrides=TINY_OVERRIDES[1::2])
    assert_same_outputs(outputs(again, x, 4), outputs(direct, x, 4))


def assert_same_outputs(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_export_of_a_carecl_trained_run_reimports_exactly(tmp_path):
    config = release_care_config(train={"epochs": 1}, synthetic_train_per_class=6, synthetic_test_per_class=3)
    config.method.alignment.epochs = 1
    config.method.alignment.samples_per_class = 4
    run_experiment(config, tmp_path / "run")
    trained = load_experiment(RunDirectory.open(tmp_path / "run")).method.eval()
    state = export_reference(tmp_path / "run", tmp_path / "care.pth")
    assert "backbone.blocks.0.attn.q_proj.weight" in state and "backbone.blocks.0.attn.qkv.weight" not in state
    assert state["backbone.head.weight"].shape == (N_CLASSES, TINY.dim)
    assert state["backbone.adapter.adapter_layer0.shared_adapter.scale"].abs().sum() > 0  # trained, not the zero init
    n_tasks = trained.n_learned_tasks
    assert [state[f"fc.heads.{i}.0.weight"].shape[0] for i in range(n_tasks)] == [3, 2, 2, 2, 2]
    reimported = load_reference(tmp_path / "care.pth", tmp_path / "run" / "config.yaml")
    x = images()
    assert_same_outputs(outputs(reimported, x, n_tasks), outputs(trained, x, n_tasks))


def test_import_reference_python_api_writes_a_loadable_run(checkpoint, tmp_path):
    summary = import_reference(checkpoint, release_care_config(), tmp_path / "run")
    assert summary.task_sizes == TASK_SIZES and summary.n_classes == N_CLASSES
    with pytest.raises(CareclError, match="already holds a run"):
        import_reference(checkpoint, release_care_config(), tmp_path / "run")
    assert (tmp_path / "run" / "backbone.safetensors").is_file()
    assert RunDirectory.open(tmp_path / "run").config_for_loading().backbone.weights == str((tmp_path / "run" / "backbone.safetensors").resolve())
