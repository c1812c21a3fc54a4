"""Release (PILOT-style) JSON import, and the shipped configs/care/*.yaml published settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carecl.config import ConfigError, load_config
from carecl.compat.release_json import RELEASE_KEYS, UNKNOWN_REASON, load_experiment_file, load_release_json, release_to_config

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "data" / "release"
CARE_CONFIGS = REPO / "configs" / "care"
ALL_FIXTURES = sorted(FIXTURES.glob("*.json"))


def read_json(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def write_json(path: Path, settings: dict) -> Path:
    path.write_text(json.dumps(settings, indent=2))
    return path


# ---------------------------------------------------------------- mapping


def test_release_fixture_maps_to_typed_values():
    config, report = load_release_json(FIXTURES / "care_inr_inc10.json")
    assert config.seed == 1993
    assert (config.data.dataset, config.data.init_cls, config.data.increment) == ("imagenet-r", 10, 10)
    assert config.data.shuffle is True
    assert config.data.root is None  # release JSONs hold no data root
    assert config.backbone.name == "vit_base_patch16_224_in21k"  # `_brmoe` dropped, legacy name kept
    assert config.backbone.pretrained is True
    assert config.backbone.model_kwargs == {"drop_path_rate": 0.0}
    train = config.train
    assert (train.epochs, train.lr, train.batch_size) == (60, 0.01, 16)
    assert (train.min_lr, train.weight_decay, train.optimizer) == (0.0, 0.0005, "sgd")
    method = config.method
    assert method.name == "care"
    assert (method.brmoe.adapter_dim, method.brmoe.expert_dim, method.brmoe.topk_experts, method.brmoe.topk_routers) == (64, 16, 3, 2)
    assert method.scale == 20.0 and isinstance(method.scale, float)
    assert method.iter_pred is True
    alignment = method.alignment
    assert (alignment.epochs, alignment.lr, alignment.storage, alignment.decay) == (30, 0.005, "covariance", True)
    # The release's alignment optimiser reads its weight decay from the same key.
    assert alignment.weight_decay == 0.0005
    assert ("tuned_epoch", "train.epochs", 60) in report.mapped
    assert ("dataset", "data.dataset", "imagenet-r") in report.mapped


def test_release_fixture_with_non_default_values():
    config, _ = load_release_json(FIXTURES / "care_ob1k_b100inc3.json")
    assert (config.data.dataset, config.data.init_cls, config.data.increment) == ("omnibenchmark1k", 100, 3)
    assert config.method.iter_pred is False
    assert config.method.brmoe.topk_experts == 2
    assert config.method.alignment.storage == "variance"
    assert config.method.alignment.epochs == 3
    assert config.backbone.model_kwargs == {"drop_path_rate": 0.1}

    config, _ = load_release_json(FIXTURES / "care_ina_inc20.json")
    assert config.data.dataset == "imagenet-a"
    assert config.method.aux_cos_loss is False
    assert config.method.self_dist_loss is False
    assert (config.method.alignment.epochs, config.method.alignment.lr) == (10, 0.01)


@pytest.mark.parametrize("fixture", ALL_FIXTURES, ids=lambda path: path.name)
def test_every_release_key_is_mapped_or_reported_ignored(fixture):
    keys = set(json.loads(fixture.read_text()))
    _, report = load_release_json(fixture)
    assert report.release_keys() == keys
    assert all(reason for _, reason in report.ignored)
    mapped_keys = {key for key, _, _ in report.mapped}
    for key, reason in report.ignored:
        # A key the table maps is never also dropped for a CaRE config.
        assert key not in mapped_keys
        if key not in RELEASE_KEYS:
            assert reason == UNKNOWN_REASON
    text = report.format()
    for key in keys:
        assert key in text


def test_ignored_keys_carry_their_reason():
    _, report = load_release_json(FIXTURES / "care_inr_inc10.json")
    ignored = dict(report.ignored)
    assert "exemplar" in ignored["memory_size"]
    assert "adapter_dim" in ignored["ffn_num"]  # the CaRE backbone does not read ffn_num
    assert ignored["device"] and ignored["prefix"]
    assert report.warnings == [w for w in report.warnings if "decay" in w]  # nothing else to warn about


def test_dataset_names_are_converted():
    base = read_json("care_inr_inc10.json")
    expected = {"cifar224": "cifar100", "imagenetr": "imagenet-r", "imageneta": "imagenet-a",
                "objectnet": "objectnet", "omnibenchmark": "omnibenchmark", "vtab": "vtab",
                "omnibenchmark1k": "omnibenchmark1k"}
    for release_name, carecl_name in expected.items():
        config, _ = release_to_config({**base, "dataset": release_name})
        assert config.data.dataset == carecl_name


def test_values_carecl_cannot_express_are_warned_not_mapped():
    config, report = load_release_json(FIXTURES / "care_cifar_odd_values.json")
    mapped_keys = {key for key, _, _ in report.mapped}
    for key in ("m", "memory_size", "memory_per_class", "fixed_memory", "scheduler"):
        assert key not in mapped_keys
    warnings = "\n".join(report.warnings)
    assert "m=0.2" in warnings
    assert "memory_size=2000" in warnings and "memory_per_class=20" in warnings
    assert "steplr" in warnings
    assert "pretrained=false" in warnings
    assert "'crct_epoch'" in warnings and "did you mean 'crct_epochs'" in warnings
    assert "'wandb_project'" in warnings
    assert dict(report.ignored)["wandb_project"] == UNKNOWN_REASON
    assert "WARNING" in report.format()
    # The values it can express are still taken.
    assert config.data.shuffle is False
    assert config.train.optimizer == "adam"
    assert config.method.scale == 16.0
    assert config.train.precision == "fp16"  # use_amp: the release's fp16 autocast
    assert config.backbone.name == "vit_base_patch16_224_in21k"  # from the older `convnet_type`


def test_clean_release_values_raise_no_disagreement_warnings():
    _, report = load_release_json(FIXTURES / "care_ina_inc20.json")
    joined = "\n".join(report.warnings)
    for word in ("margin", "memory", "scheduler", "amp", "unknown"):
        assert word not in joined


def test_imported_decay_uses_the_release_formula_without_warning():
    config, report = load_release_json(FIXTURES / "care_inr_inc10.json")
    assert config.method.alignment.decay and config.method.alignment.decay_formula == "release"
    assert not any("decay" in warning for warning in report.warnings)


# ---------------------------------------------------------------- seeds


def test_seed_list_uses_the_first_and_reports_the_rest():
    config, report = load_release_json(FIXTURES / "care_ob1k_b100inc3.json")
    assert config.seed == 1993
    seed_warnings = [w for w in report.warnings if w.startswith("seed")]
    assert len(seed_warnings) == 1 and "1994" in seed_warnings[0] and "1995" in seed_warnings[0]


def test_single_seed_list_and_plain_seed_raise_no_warning():
    base = read_json("care_inr_inc10.json")
    for seed in ([7], 7):
        config, report = release_to_config({**base, "seed": seed})
        assert config.seed == 7
        assert not any(w.startswith("seed") for w in report.warnings)


@pytest.mark.parametrize("seed", [[], ["1993"], [1.5], True])
def test_bad_seed_is_an_error(tmp_path, seed):
    path = write_json(tmp_path / "bad_seed.json", {**read_json("care_inr_inc10.json"), "seed": seed})
    with pytest.raises(ConfigError, match="'seed'") as error:
        load_release_json(path)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "key, value",
    [
        ("init_cls", "ten"),
        ("increment", 0),
        ("tuned_epoch", -1),
        ("init_lr", "fast"),
        ("batch_size", 16.5),
        ("decay", "yes"),
        ("ca_storage_efficient_method", "multi-centroid"),
        ("optimizer", "lbfgs"),
        ("dataset", "imagenet-z"),
        ("drop_path", 1.5),
        ("shuffle", None),
    ],
)
def test_impossible_value_names_file_and_key(tmp_path, key, value):
    path = write_json(tmp_path / "care_bad.json", {**read_json("care_inr_inc10.json"), key: value})
    with pytest.raises(ConfigError) as error:
        load_release_json(path)
    message = str(error.value)
    assert str(path) in message
    assert repr(key) in message


def test_load_config_reports_bad_release_value_too(tmp_path):
    path = write_json(tmp_path / "care_bad.json", {**read_json("care_inr_inc10.json"), "init_cls": "ten"})
    with pytest.raises(ConfigError, match="init_cls"):
        load_experiment_file(path)
    with pytest.raises(ConfigError, match="release JSON experiment file"):
        load_config(path)


@pytest.mark.parametrize("key", ["dataset", "init_cls", "model_name", "tuned_epoch", "crct_epochs", "decay"])
def test_missing_required_key_is_an_error(tmp_path, key):
    settings = read_json("care_inr_inc10.json")
    del settings[key]
    path = write_json(tmp_path / "care_missing.json", settings)
    with pytest.raises(ConfigError, match=key) as error:
        load_release_json(path)
    assert str(path) in str(error.value)


def test_unknown_method_names_model_name(tmp_path):
    path = write_json(tmp_path / "other.json", {**read_json("care_inr_inc10.json"), "model_name": "no_such_method"})
    with pytest.raises(ConfigError, match="model_name") as error:
        load_release_json(path)
    assert str(path) in str(error.value)


def test_not_json_and_not_an_object(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"dataset": "cifar224",')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_release_json(broken)
    listed = write_json(tmp_path / "list.json", [1, 2])
    with pytest.raises(ConfigError, match="JSON object"):
        load_release_json(listed)
    with pytest.raises(ConfigError, match="not found"):
        load_release_json(tmp_path / "absent.json")


def test_two_keys_disagreeing_on_one_setting_is_an_error(tmp_path):
    settings = {**read_json("care_inr_inc10.json"), "convnet_type": "vit_base_patch16_224"}
    path = write_json(tmp_path / "conflict.json", settings)
    with pytest.raises(ConfigError, match="backbone_type.*convnet_type"):
        load_release_json(path)


def test_duplicate_key_is_reported(tmp_path):
    path = tmp_path / "dup.json"
    text = (FIXTURES / "care_inr_inc10.json").read_text()
    path.write_text(text.replace('"init_lr": 0.01,', '"init_lr": 0.01,\n    "init_lr": 0.02,'))
    config, report = load_release_json(path)
    assert config.train.lr == 0.02  # last one wins, as with the release's json.load
    assert any("'init_lr' appears more than once" in warning for warning in report.warnings)


def test_care_options_of_another_method_are_reported_ignored():
    settings = {**read_json("care_inr_inc10.json"), "model_name": "simplecil"}
    config, report = release_to_config(settings)
    assert config.method.name == "simplecil"
    ignored = dict(report.ignored)
    assert "simplecil" in ignored["topk_routers"] and "simplecil" in ignored["crct_epochs"]
    assert report.release_keys() == set(settings)
    assert config.train.epochs == 60


def test_load_config_dispatches_json_and_applies_overrides():
    config, _ = load_experiment_file(FIXTURES / "care_inr_inc10.json", ["data.root=/datasets", "train.epochs=2"])
    assert config.data.root == "/datasets"
    assert config.train.epochs == 2
    assert config.method.alignment.epochs == 30


# ---------------------------------------------------------------- published YAML settings

# research-settings.md, one row per file; results.md gives the paper's Ā / A_last.
# stem: dataset, init_cls, increment, tuned_epoch, init_lr, batch, crct_epochs, ca_lr, decay,
#       iter_pred, plain aux losses (ImageNet-A), amp, Ā, A_last
PUBLISHED = {
    "cifar100_b0inc10": ("cifar100", 10, 10, 60, 0.05, 64, 30, 0.005, False, True, False, False, "95.46", "92.46"),
    "cifar100_b0inc5": ("cifar100", 5, 5, 60, 0.05, 64, 30, 0.005, False, True, False, False, "95.26", "91.97"),
    "imagenet-a_b0inc20": ("imagenet-a", 20, 20, 20, 0.01, 16, 10, 0.01, True, True, True, False, "73.40", "64.78"),
    "imagenet-a_b0inc4": ("imagenet-a", 4, 4, 20, 0.01, 16, 10, 0.01, True, True, True, False, "69.85", "59.91"),
    "imagenet-r_b0inc10": ("imagenet-r", 10, 10, 60, 0.01, 16, 30, 0.005, True, True, False, False, "84.57", "78.80"),
    "imagenet-r_b0inc20": ("imagenet-r", 20, 20, 60, 0.02, 32, 30, 0.005, True, True, False, False, "85.75", "80.53"),
    "imagenet-r_b0inc4": ("imagenet-r", 4, 4, 20, 0.05, 16, 20, 0.005, True, True, False, False, "82.92", "76.98"),
    "objectnet_b0inc10": ("objectnet", 10, 10, 30, 0.05, 64, 30, 0.005, True, True, False, False, "77.54", "66.54"),
    "objectnet_b0inc20": ("objectnet", 20, 20, 30, 0.05, 64, 30, 0.005, True, True, False, False, "77.58", "67.55"),
    "objectnet_b0inc4": ("objectnet", 4, 4, 30, 0.01, 16, 30, 0.005, True, True, False, False, "76.88", "65.13"),
    "omnibenchmark_b0inc5": ("omnibenchmark", 5, 5, 20, 0.01, 16, 30, 0.005, True, True, False, False, "84.74", "77.69"),
    "vtab_b0inc10": ("vtab", 10, 10, 30, 0.01, 16, 30, 0.005, True, True, False, False, "96.93", "93.80"),
    "omnibenchmark1k_b0inc10": ("omnibenchmark1k", 10, 10, 20, 0.02, 32, 5, 0.005, True, False, False, True, "78.54", "68.27"),
    "omnibenchmark1k_b0inc5": ("omnibenchmark1k", 5, 5, 20, 0.01, 16, 3, 0.005, True, False, False, True, "78.00", "67.46"),
    "omnibenchmark1k_b100inc6": ("omnibenchmark1k", 100, 6, 20, 0.02, 32, 3, 0.005, True, False, False, True, "77.65", "69.01"),
    "omnibenchmark1k_b100inc3": ("omnibenchmark1k", 100, 3, 20, 0.01, 16, 3, 0.005, True, False, False, True, "77.18", "68.51"),
}
# Classes per benchmark, to check the task count the header states.
N_CLASSES = {"cifar100": 100, "imagenet-a": 200, "imagenet-r": 200, "objectnet": 200,
             "omnibenchmark": 300, "vtab": 50, "omnibenchmark1k": 1000}


def n_tasks(n_classes: int, init_cls: int, increment: int) -> int:
    return 1 + -(-(n_classes - init_cls) // increment)


def test_one_yaml_per_published_setting():
    assert sorted(path.stem for path in CARE_CONFIGS.glob("*.yaml")) == sorted(PUBLISHED)


@pytest.mark.parametrize("stem", sorted(PUBLISHED))
def test_published_yaml_matches_research_settings(stem):
    (dataset, init_cls, increment, epochs, lr, batch, crct, ca_lr, decay,
     iter_pred, plain_aux, _amp, _a_bar, _a_last) = PUBLISHED[stem]
    config = load_config(CARE_CONFIGS / f"{stem}.yaml")
    assert config.seed == 1993
    assert (config.data.dataset, config.data.init_cls, config.data.increment) == (dataset, init_cls, increment)
    assert config.data.shuffle is True and config.data.root == "data"
    assert (config.backbone.name, config.backbone.pretrained) == ("vit_base_patch16_224.augreg_in21k", True)
    train = config.train
    assert (train.epochs, train.lr, train.batch_size) == (epochs, lr, batch)
    assert (train.min_lr, train.momentum, train.weight_decay, train.optimizer) == (0.0, 0.9, 5e-4, "sgd")
    method = config.method
    assert method.name == "care"
    assert (method.brmoe.adapter_dim, method.brmoe.expert_dim, method.brmoe.topk_experts, method.brmoe.topk_routers) == (64, 16, 3, 2)
    assert method.scale == 20.0
    assert method.iter_pred is iter_pred
    assert method.aux_cos_loss is (not plain_aux) and method.self_dist_loss is (not plain_aux)
    alignment = method.alignment
    assert (alignment.epochs, alignment.lr, alignment.decay, alignment.storage) == (crct, ca_lr, decay, "covariance")


@pytest.mark.parametrize("stem", sorted(PUBLISHED))
def test_published_yaml_header_names_tasks_and_paper_result(stem):
    dataset, init_cls, increment, *_, amp, a_bar, a_last = PUBLISHED[stem]
    lines = (CARE_CONFIGS / f"{stem}.yaml").read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1].startswith("# ")
    assert f"{n_tasks(N_CLASSES[dataset], init_cls, increment)} tasks" in lines[0]
    assert f"{a_bar} / A_last {a_last}" in lines[1]
    assert load_config(CARE_CONFIGS / f"{stem}.yaml").train.precision == ("fp16" if amp else "fp32")


def test_release_json_and_published_yaml_agree():
    """The release-style ImageNet-R B0 Inc10 fixture imports to the shipped YAML's settings."""
    imported, _ = load_release_json(FIXTURES / "care_inr_inc10.json")
    shipped = load_config(CARE_CONFIGS / "imagenet-r_b0inc10.yaml")
    assert imported.seed == shipped.seed
    assert imported.data.dataset == shipped.data.dataset
    assert (imported.data.init_cls, imported.data.increment) == (shipped.data.init_cls, shipped.data.increment)
    assert imported.train == shipped.train
    assert imported.method == shipped.method
