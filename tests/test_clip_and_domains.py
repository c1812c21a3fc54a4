"""CLIP backbones (open_clip) and multi-domain streams: weights from OpenAI-style TorchScript archives and state
dicts, errors that name the file, injection into both towers, display names for classes, domains as tasks
in their own label spaces, the task-incremental protocol and MTIL's Transfer / Avg / Last."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from carecl.backbones import backbone_preprocessing, create_backbone
from carecl.clip_backbone import ClipBackboneError
from carecl.config import ConfigError, DataConfig
from carecl.data import DatasetError, build_dataset
from carecl.engine import Experiment, run_experiment
from carecl.metrics import RunSummary, TaskEvaluation, forgetting, learned_part, transfer
from carecl.runs.directory import RunDirectory
from carecl.tuners.adapter import AdapterConfig, ParallelAdapterInjector

from helpers import DOMAINS, clip_config, domains_config, tiny_config, write_domains


def tiny_clip(seed: int):
    torch.manual_seed(seed)
    return create_backbone(clip_config({"name": "moe_adapters"}).backbone, 16)


def with_weights(path) -> object:
    return dataclasses.replace(clip_config({"name": "moe_adapters"}).backbone, weights=str(path))


def test_clip_weights_load_from_a_torchscript_archive_and_a_state_dict(tmp_path):
    source = tiny_clip(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(source, (torch.rand(1, 3, 16, 16), torch.zeros(1, 12, dtype=torch.long)), strict=False)
    traced.save(str(tmp_path / "ViT-tiny.pt"))  # how OpenAI ships ViT-B-16.pt
    torch.save(source.state_dict(), tmp_path / "state.pt")
    for file in ("ViT-tiny.pt", "state.pt"):
        torch.manual_seed(2)
        loaded = create_backbone(with_weights(tmp_path / file), 16)
        assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in source.state_dict().items())
        assert not any(p.requires_grad for p in loaded.parameters())


def test_a_clip_file_that_does_not_fit_names_the_file_and_keys(tmp_path):
    state = tiny_clip(1).state_dict()
    state.pop("ln_final.weight")
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"(?s)broken\.pt does not fit.*missing \(1\): ln_final\.weight"):
        create_backbone(with_weights(tmp_path / "broken.pt"), 16)
    with pytest.raises(ClipBackboneError, match="file not found"):
        create_backbone(with_weights(tmp_path / "absent.pt"), 16)
    with pytest.raises(ClipBackboneError, match="open_clip has no model 'ViT-Nope'"):
        backbone_preprocessing(dataclasses.replace(with_weights(tmp_path / "x"), name="ViT-Nope"))


def test_clip_preprocessing_follows_the_tower():
    preprocessing = backbone_preprocessing(clip_config({"name": "moe_adapters"}).backbone)
    assert preprocessing.image_size == 16 and preprocessing.crop_pct == 1.0 and preprocessing.interpolation == "bicubic"
    assert preprocessing.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_a_parallel_adapter_wraps_both_clip_towers_and_comes_off():
    clip = tiny_clip(0)
    tokens = torch.randint(1, 400, (2, 12))
    images = torch.rand(2, 3, 16, 16)
    before = clip.encode_image(images), clip.encode_text(tokens)
    injectors = [ParallelAdapterInjector(tower, AdapterConfig(bottleneck=4, scale=1.0)) for tower in (clip.visual, clip)]
    for injector in injectors:
        torch.nn.init.normal_(injector.adapters[0].up.weight)
    after = clip.encode_image(images), clip.encode_text(tokens)
    assert not torch.allclose(before[0], after[0]) and not torch.allclose(before[1], after[1])
    for injector in injectors:
        injector.remove()
    assert torch.equal(clip.encode_image(images), before[0]) and torch.equal(clip.encode_text(tokens), before[1])


def test_class_names_file_as_lines_or_a_mapping(tmp_path):
    roots = write_domains(tmp_path / "data")
    data = DataConfig(dataset="imagefolder", root=str(roots["colours"]), image_size=16)
    assert build_dataset(data).class_names == ["blue", "green", "red"]
    (tmp_path / "names.txt").write_text("navy\nlime\ncrimson\n")
    (tmp_path / "names.yaml").write_text("red: scarlet\n")
    assert build_dataset(dataclasses.replace(data, class_names_file=str(tmp_path / "names.txt"))).class_names == [
        "navy", "lime", "crimson"]
    assert build_dataset(dataclasses.replace(data, class_names_file=str(tmp_path / "names.yaml"))).class_names == [
        "blue", "green", "scarlet"]
    (tmp_path / "short.txt").write_text("one\n")
    with pytest.raises(DatasetError, match=r"short\.txt lists 1 names for the dataset's 3 classes"):
        build_dataset(dataclasses.replace(data, class_names_file=str(tmp_path / "short.txt")))
    (tmp_path / "bad.yaml").write_text("purple: violet\n")
    with pytest.raises(DatasetError, match=r"bad\.yaml names classes the dataset does not have: \['purple'\]"):
        build_dataset(dataclasses.replace(data, class_names_file=str(tmp_path / "bad.yaml")))


def test_domains_are_tasks_with_consecutive_ids_and_their_own_templates(tmp_path):
    roots = write_domains(tmp_path / "data")
    config = domains_config(roots, {"name": "moe_adapters"})
    config.data.domains[1].templates = ["stripes going {}."]
    experiment = Experiment.build(config)
    scenario = experiment.scenario
    assert scenario.sizes == tuple(len(classes) for classes in DOMAINS.values())
    assert scenario.names(3, 5) == ["horizontal", "vertical"] and scenario.task_name(2) == "textures"
    assert scenario.templates(1) == ("stripes going {}.",) and scenario.templates(0) is None
    train = experiment.data.train
    assert sorted(set(train.targets[: 3 * 8].tolist())) == [0, 1, 2]  # the first member's images come first
    method = experiment.method
    assert method.training_templates(scenario.task(1)) == ["stripes going {}."]
    assert method.test_templates(scenario.task(0)) == [method.options.template]
    twice = [{"name": "colours", "root": str(roots["colours"])}] * 2
    with pytest.raises(ConfigError, match=r"data\.domains names must differ"):
        clip_config({"name": "moe_adapters"}, data={"dataset": "domains", "domains": twice})


def test_a_domain_with_a_broken_folder_is_named(tmp_path):
    roots = write_domains(tmp_path / "data")
    roots["stripes"] = tmp_path / "missing"
    with pytest.raises(DatasetError, match=r"data\.domains\[1\] \(stripes\): data\.root .*missing does not exist"):
        Experiment.build(domains_config(roots, {"name": "moe_adapters"}))


def test_unseen_tasks_need_a_method_that_scores_them(tmp_path):
    roots = write_domains(tmp_path / "data")
    config = domains_config(roots, {"name": "moe_adapters"})
    config = dataclasses.replace(config, backbone=tiny_config().backbone, method=tiny_config().method)
    with pytest.raises(ConfigError, match="simplecil cannot score classes it has not learned"):
        Experiment.build(config)
    with pytest.raises(ConfigError, match="unseen_tasks needs eval.protocol: task_incremental"):
        clip_config({"name": "moe_adapters"}, evaluation={"unseen_tasks": True})


def test_task_incremental_simplecil_run_records_domains_and_predicts_without_data(tmp_path):
    roots = write_domains(tmp_path / "data")
    config = domains_config(roots, {"name": "simplecil"}, evaluation={"unseen_tasks": False})
    config = dataclasses.replace(config, backbone=dataclasses.replace(tiny_config().backbone,
                                                                      model_kwargs={"img_size": 16, "patch_size": 8,
                                                                                    "embed_dim": 16, "depth": 1,
                                                                                    "num_heads": 2}))
    summary = run_experiment(config, tmp_path / "run")
    assert np.isnan(summary.matrix[0][1])  # nothing measured before it was learned
    assert json.loads((tmp_path / "run" / "classes.json").read_text())["task_sizes"] == [3, 2, 3]
    recorded = RunDirectory(tmp_path / "run").classes()
    again = Experiment.for_inference(config, recorded)
    assert again.scenario.sizes == (3, 2, 3) and again.scenario.task_name(1) == "stripes"


def test_mtil_metrics_by_hand_and_forgetting_ignores_zero_shot_entries():
    matrix = np.array([[80.0, 10.0, 20.0], [70.0, 90.0, 30.0], [60.0, 85.0, 95.0]])
    tasks = [0, 1, 2]
    assert transfer(matrix, tasks) == pytest.approx((10.0 + (20.0 + 30.0) / 2) / 2)
    evaluations = [TaskEvaluation(i, float(np.mean(row[: i + 1])), 100.0, 2, list(row), float("nan"), row[i], 10)
                   for i, row in enumerate(matrix)]
    summary = RunSummary.from_evaluations(evaluations)
    assert summary.task_average == pytest.approx(np.mean(matrix.mean(axis=0)))
    assert summary.last_task_average == pytest.approx(80.0)
    # Best earlier accuracy of task 1 is 90 (after learning it), never the zero-shot 10.
    assert summary.forgetting == pytest.approx(((80 - 60) + (90 - 85)) / 2)
    assert forgetting(learned_part(matrix, tasks)) == summary.forgetting
    plain = RunSummary.from_evaluations([TaskEvaluation(0, 50.0, 90.0, 2, [50.0], float("nan"), 50.0, 4)])
    assert np.isnan(plain.transfer) and np.isnan(plain.task_average)


class FakeArchive:
    """A torchvision-style dataset: `classes`, `targets`, (PIL image, label) items; refuses a missing root."""

    def __init__(self, root: str, download: bool, train: bool = True, size: int = 10) -> None:
        if not (Path(root) / "present").exists():
            raise RuntimeError("Dataset not found. You can use download=True to download it")
        assert download is False
        self.classes = ["sea_lion", "fire_truck", "maple_tree"]
        self.targets = [index % 3 for index in range(size if train else size // 2)]
        self.offset = 0 if train else 100

    def __getitem__(self, index: int):
        from PIL import Image

        return Image.new("L", (8, 8), color=self.offset + index), self.targets[index]

    def __len__(self) -> int:
        return len(self.targets)


def test_mtil_reads_members_in_order_with_the_authors_splits_and_protocol(tmp_path, monkeypatch):
    from carecl.data import mtil

    official = mtil.Member(lambda **k: FakeArchive(**k), {"train": True}, {"train": False},
                           lambda d: d.targets, lambda d: d.classes)
    single = mtil.Member(lambda **k: FakeArchive(size=13, **k), None, None, lambda d: d.targets, lambda d: d.classes)
    monkeypatch.setattr(mtil, "MEMBERS", {"pets": official, "eurosat": single})
    (tmp_path / "present").touch()
    data = DataConfig(dataset="mtil", root=str(tmp_path), dataset_order=["eurosat", "pets"], image_size=8)
    built = build_dataset(data)
    assert built.task_names == ["eurosat", "pets"] and built.task_sizes == [3, 3]
    assert built.class_names[:3] == ["sea lion", "fire truck", "maple tree"]
    assert built.task_templates == [["a photo of a {}."], ["a photo of a {}."]]
    # The split of a member without a test set is torch's random_split with a generator seeded 42.
    train_part, test_part = torch.utils.data.random_split(range(13), [10, 3], generator=torch.Generator().manual_seed(42))
    assert [item.index for item in built.train.samples[:10]] == list(train_part)
    assert [item.index for item in built.test.samples[:3]] == list(test_part)
    assert built.train.targets[10:].tolist() == [index % 3 + 3 for index in range(10)]  # pets' ids follow eurosat's
    assert np.asarray(built.train.samples[10].load()).shape == (8, 8, 3)
    (tmp_path / "mtil_protocol.json").write_text(json.dumps(
        {"pets": {"classnames": ["seal", "engine", "maple"], "templates": ["a photo of a {}, a type of pet."]}}))
    built = build_dataset(data)
    assert built.class_names[3:] == ["seal", "engine", "maple"]
    assert built.task_templates[1] == ["a photo of a {}, a type of pet."]
    (tmp_path / "present").unlink()
    with pytest.raises(DatasetError, match=r"mtil member 'eurosat': cannot read it under .*nothing is downloaded"):
        build_dataset(data)
    with pytest.raises(DatasetError, match=r"unknown mtil members \['nope'\]"):
        build_dataset(dataclasses.replace(data, dataset_order=["nope"]))


def test_domain_learning_rates_follow_the_member_and_unknown_names_fail(tmp_path):
    roots = write_domains(tmp_path / "data")
    method = Experiment.build(domains_config(roots, {"name": "moe_adapters", "domain_lr": {"stripes": 0.5}})).method
    lrs = [phase.lr for task in method.scenario.tasks() for phase in method.training_phases(task)]
    assert lrs == [0.01, 0.5, 0.01]
    with pytest.raises(ConfigError, match=r"domain_lr names no member of the stream: \['stripe'\]"):
        Experiment.build(domains_config(roots, {"name": "moe_adapters", "domain_lr": {"stripe": 0.5}}))
