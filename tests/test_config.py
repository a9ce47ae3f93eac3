"""The config tree: defaults < YAML < dotted overrides, strict keys and types, saved and reloaded."""

import pytest
import yaml

from jepa4rec_dist.config import (
    Config,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    save_config,
)


def test_defaults_match_the_spec():
    cfg = load_config()
    assert cfg.data.item_text.max_attr_tokens == 32 and cfg.data.item_text.max_attrs == 3
    assert cfg.sequence.max_items == 50 and cfg.sequence.max_tokens == 1024
    assert cfg.pretrain.objective == "jepa" and cfg.pretrain.masking.ratio == 0.5
    assert (cfg.pretrain.masking.replace_mask, cfg.pretrain.masking.replace_random) == (0.8, 0.1)


def test_recformer_objective_resolves_its_own_mask_ratio():
    assert load_config(overrides=["--pretrain.objective=recformer"]).pretrain.masking.ratio == 0.15
    explicit = load_config(overrides=["--pretrain.objective=recformer", "--pretrain.masking.ratio=0.3"])
    assert explicit.pretrain.masking.ratio == 0.3


def test_yaml_then_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("loader:\n  batch_size: 8\n  seed: 3\ndata:\n  item_text:\n    attributes: [title, brand]\n")
    b = tmp_path / "b.yaml"
    b.write_text("loader:\n  batch_size: 4\n")
    cfg = load_config([a, b], ["--loader.seed=7", "--sequence.max_tokens=256"])
    assert cfg.loader.batch_size == 4  # later file wins
    assert cfg.loader.seed == 7  # override beats YAML
    assert cfg.sequence.max_tokens == 256
    assert cfg.data.item_text.attributes == ["title", "brand"]
    assert cfg.loader.num_workers == 2  # untouched default


@pytest.mark.parametrize("override, message", [
    ("--loader.batch_sise=4", "unknown config key 'loader.batch_sise'"),
    ("--loaderr.batch_size=4", "unknown config key 'loaderr'"),
    ("--data.item_text.max_attr=4", "unknown config key 'data.item_text.max_attr'"),
    ("--loader.batch_size=four", "loader.batch_size: expected an integer"),
    ("--loader.batch_size=0", "loader.batch_size: must be > 0"),
    ("--loader.batch_size=2.5", "loader.batch_size: expected an integer"),
    ("--pretrain.masking.unit=sentence", "pretrain.masking.unit: must be one of"),
    ("--pretrain.masking.ratio=1.5", "pretrain.masking.ratio: must be in (0, 1)"),
    ("--loader.drop_last=maybe", "loader.drop_last: expected true/false"),
    ("--loader.steps_per_epoch=5", "loader.steps_per_epoch is only used with loader.mode=fixed"),
    ("--data.dataset=generic", "data.generic.interactions and data.generic.items are required"),
    ("--loader.batch_size", "expected --section.key=value"),
    ("--loader.batch_size.x=1", "loader.batch_size: expected an integer"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ValueError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_bad_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loader: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ValueError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_config(listing)


def test_int_is_accepted_for_float_and_null_for_optional():
    cfg = load_config(overrides=["--pretrain.masking.replace_mask=1", "--pretrain.masking.replace_random=0",
                                 "--data.item_text.attributes=null"])
    assert cfg.pretrain.masking.replace_mask == 1.0 and isinstance(cfg.pretrain.masking.replace_mask, float)
    assert cfg.data.item_text.attributes is None


def test_exponent_floats_without_a_dot():
    cfg = load_config(overrides=["--train.lr=1e-3", "--pretrain.temperature=5E-2"])
    assert cfg.train.lr == 0.001 and cfg.pretrain.temperature == 0.05
    with pytest.raises(ValueError, match="train.lr: expected a number, got 'fast'"):
        load_config(overrides=["--train.lr=fast"])


def test_parse_override_types():
    assert parse_override("--a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=[x, y]") == (["a", "b"], ["x", "y"])
    assert parse_override("--a=true") == (["a"], True)
    assert parse_override("--a=some text") == (["a"], "some text")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["--loader.batch_size=3", "--pretrain.masking.unit=attribute"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert config_from_dict(yaml.safe_load(path.read_text())) == cfg
    assert config_to_dict(again)["loader"]["batch_size"] == 3
    assert isinstance(again, Config)


def test_every_shipped_config_loads():
    from pathlib import Path

    files = sorted(Path(__file__).parent.parent.joinpath("configs").rglob("*.yaml"))
    assert files, "configs/ has no YAML"
    for path in files:
        load_config(path)  # strict: an unknown key or bad value in a shipped recipe fails here
