import math
from pathlib import Path

import pytest
import yaml

from carecl.config import ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


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
    config = config_from_dict({"method": {"name": "care", "brmoe": {"topk_routers": 3}, "alignment": {"epochs": 2}}})
    assert type(config.method).__name__ == "CareConfig"
    assert config.method.brmoe.topk_routers == 3 and config.method.alignment.epochs == 2
    assert config.method.brmoe.expert_dim == 16  # a partial section keeps the other defaults
    with pytest.raises(ConfigError, match=r"method.brmoe.topk_router'.*did you mean 'topk_routers'"):
        config_from_dict({"method": {"name": "care", "brmoe": {"topk_router": 3}}})
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
    configs = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "spaces")
    configs += sorted((ROOT / "benchmarks" / "realdata").glob("*.yaml"))
    assert len(configs) > 50
    for path in configs:
        config = load_config(path)
        if path.parent.name not in ("configs", "realdata"):
            assert config.method.name.startswith(path.parent.name.split("_")[0]), path


# ---------------------------------------------------------------- options that moved into tuner sections

OLD_STYLE = {
    "care": ({"adapter_dim": 8, "topk_routers": 1}, lambda m: (m.brmoe.adapter_dim, m.brmoe.topk_routers) == (8, 1)),
    "sema": ({"threshold": 1.5, "first_expandable": 0}, lambda m: (m.sema.threshold, m.sema.first_expandable) == (1.5, 0)),
    "mos": ({"adapter_bottleneck": 8, "adapter_dropout": 0.0}, lambda m: (m.adapter.bottleneck, m.adapter.dropout) == (8, 0.0)),
    "moal": ({"adapter_bottleneck": 8}, lambda m: m.adapter.bottleneck == 8),
    "moe_adapters": ({"experts": 4, "adapter_scale": 0.5}, lambda m: (m.moe.experts, m.moe.scale) == (4, 0.5)),
    "aper_vpt_deep": ({"first_session": {"prompt_tokens": 3}}, lambda m: m.first_session.vpt.n_prompts == 3),
}


@pytest.mark.parametrize("name", sorted(OLD_STYLE))
def test_flat_keys_of_the_old_layout_still_load_with_a_notice(name, caplog):
    flat, check = OLD_STYLE[name]
    with caplog.at_level("WARNING", logger="carecl"):
        config = config_from_dict({"method": {"name": name, **flat}})
    assert check(config.method)
    notices = [record.getMessage() for record in caplog.records if "is now" in record.getMessage()]
    assert len(notices) == len([key for value in flat.values() for key in (value if isinstance(value, dict) else [0])])
    assert all("\n" not in notice and "old key still works" in notice for notice in notices)


def test_an_old_key_beside_its_new_place_is_refused():
    with pytest.raises(ConfigError, match=r"method.adapter_dim and method.brmoe.adapter_dim are the same option"):
        config_from_dict({"method": {"name": "care", "adapter_dim": 8, "brmoe": {"adapter_dim": 4}}})


def test_tuner_options_once_out_of_reach_are_set_from_yaml():
    config = config_from_dict({"method": {"name": "moe_adapters", "moe": {"noise_epsilon": 0.5}}})
    assert config.method.moe.noise_epsilon == 0.5
    config = config_from_dict({"method": {"name": "ssiat", "adapter": {"scale": None, "layer_norm": True}}})
    assert config.method.adapter.scale is None and config.method.adapter.layer_norm
    with pytest.raises(ConfigError, match=r"method.first_session.vpt.deep is set by the tuner's name"):
        config_from_dict({"method": {"name": "aper_vpt_shallow", "first_session": {"vpt": {"deep": True}}}})


def test_a_method_default_for_a_nested_section_survives_a_partial_yaml_section():
    config = config_from_dict({"method": {"name": "mos", "adapter": {"dropout": 0.0}}})
    assert (config.method.adapter.bottleneck, config.method.adapter.dropout) == (16, 0.0)  # MOS's 16, not 64
    config = config_from_dict({"method": {"name": "ranpac", "first_session": {"adapter": {"scale": 0.2}}}})
    assert (config.method.first_session.tuner, config.method.first_session.adapter.scale) == ("adapter", 0.2)


def test_the_migration_script_rewrites_old_keys_keeping_comments_and_the_config(monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("migrate_configs", ROOT / "scripts" / "migrate_configs.py")
    migrate = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "migrate_configs", migrate)  # its dataclasses look their module up
    spec.loader.exec_module(migrate)
    old = ("# header\nmethod:\n  name: ranpac\n  first_session:\n    tuner: adapter\n    # its width\n"
           "    adapter_bottleneck: 32  # small\n    prompt_tokens: 3\n  projection_dim: 64\n")
    new, notes = migrate.migrate_text(old)
    assert "    adapter:\n      # its width\n      bottleneck: 32  # small\n    vpt:\n      n_prompts: 3\n" in new
    assert new.startswith("# header\n") and len(notes) == 2
    assert config_to_dict(config_from_dict(yaml.safe_load(new))) == config_to_dict(config_from_dict(yaml.safe_load(old)))
    assert migrate.main(["--check", str(ROOT / "configs"), str(ROOT / "benchmarks" / "realdata"),
                         str(ROOT / "src" / "carecl" / "configs")]) == 0  # every shipped file is in the new layout


def test_a_transform_recipe_is_checked_against_the_registered_recipes():
    from carecl.data.transforms import TRANSFORMS

    for name in TRANSFORMS.names():
        assert config_from_dict({"data": {"transforms": name}}).data.transforms == name
    with pytest.raises(ConfigError, match=r"data.transforms must be one of .*'pilot_wide_crop'.*got 'pilot_wide'"):
        config_from_dict({"data": {"transforms": "pilot_wide"}})


def test_every_shipped_search_space_fits_its_config():
    from carecl.tune.space import SearchSpace

    realdata = ROOT / "benchmarks" / "realdata"
    methods = sorted(path for path in (ROOT / "configs" / "spaces").glob("*.yaml") if path.stem != "lr")
    assert len(methods) > 10
    pairs = [(ROOT / "configs" / "spaces" / "lr.yaml", ROOT / "configs" / "demo.yaml")]
    for space in methods:
        # The real-data benchmark's config, and the method's own first shipped config (what a user starts from).
        pairs.append((space, realdata / ("care_release.yaml" if space.stem == "care" else f"{space.stem}.yaml")))
        pairs.append((space, sorted((ROOT / "configs" / space.stem).glob("*.yaml"))[0]))
    for space, config in pairs:
        SearchSpace.read(space).check_against(config_to_dict(load_config(config)))
    # The real-data benchmark gives every method the same budget: 8 grid points.
    for space in methods:
        grid = SearchSpace.read(space).grid()
        assert len([v for values in grid.values() for v in values]) in (8, 6) and len(grid) <= 2, space
        assert math.prod(len(values) for values in grid.values()) == 8, space
