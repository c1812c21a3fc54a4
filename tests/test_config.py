import pytest
import yaml

from carecl.config import ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config, save_config


def test_defaults_roundtrip_through_yaml(tmp_path):
    config = config_from_dict({"data": {"dataset": "digits"}})
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*did you mean 'epochs'"):
        config_from_dict({"train": {"epoch": 3}})


def test_unknown_section_suggests_closest():
    with pytest.raises(ConfigError, match=r"'dat'.*did you mean 'data'"):
        config_from_dict({"dat": {}})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):
        config_from_dict({"train": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match="data.shuffle: expected true/false"):
        config_from_dict({"data": {"shuffle": "yes"}})


def test_impossible_split_rejected_before_work():
    with pytest.raises(ConfigError, match="data.increment must be positive"):
        config_from_dict({"data": {"increment": 0}})


def test_method_section_is_typed_per_method():
    config = config_from_dict({"method": {"name": "care", "topk_routers": 3, "alignment": {"epochs": 2}}})
    assert type(config.method).__name__ == "CareConfig"
    assert config.method.topk_routers == 3 and config.method.alignment.epochs == 2
    with pytest.raises(ConfigError, match=r"method.topk_router'.*did you mean 'topk_routers'"):
        config_from_dict({"method": {"name": "care", "topk_router": 3}})
    with pytest.raises(ConfigError, match=r"method.name: unknown method 'cair'.*'care'"):
        config_from_dict({"method": {"name": "cair"}})


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 5}}))
    config = load_config(path, ["train.epochs=2", "data.class_order=[1, 0]", "method.name=care", "method.iter_pred=false"])
    assert config.train.epochs == 2 and config.data.class_order == [1, 0] and config.method.iter_pred is False
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.epochs"])


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {lr: fast}\n")
    with pytest.raises(ConfigError, match="bad.yaml: train.lr: expected a number"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_demo_config_loads():
    from carecl.cli.main import demo_config_path

    config = load_config(demo_config_path())
    assert config.data.dataset == "digits" and config.data.init_cls == 2 and config.data.increment == 2
    assert config_to_dict(config)["method"]["name"] == config.method.name


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
    configs += sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "realdata").glob("*.yaml"))
    assert len(configs) > 50
    for path in configs:
        config = load_config(path)
        if path.parent.name not in ("configs", "realdata"):
            assert config.method.name.startswith(path.parent.name.split("_")[0]), path
