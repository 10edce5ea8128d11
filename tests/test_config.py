"""Typed config: unknown keys and invalid values fail naming the key; --set reaches any value."""

from __future__ import annotations

import pytest

from covidscan.config import ConfigError, config_from_dict, load_config


def test_defaults_are_valid():
    config = load_config()
    assert config.data.split.method == "auto" and config.training.phases[0].epochs >= 1


def test_unknown_key_error_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.imagesize"):
        config_from_dict({"data": {"imagesize": 224}})
    with pytest.raises(ConfigError, match=r"training\.phases\.0\.learning_rate"):
        config_from_dict({"training": {"phases": [{"learning_rate": 0.1}]}})


def test_set_overrides_nested_values_and_list_items():
    config = config_from_dict(
        {"training": {"phases": [{"epochs": 2}, {"epochs": 3}]}},
        [
            "data.image_size=64",
            "training.phases.1.lr=1e-5",
            "data.split.ratios=[0.7, 0, 0.3]",
            "data.augment.hflip=true",
        ],
    )
    assert config.data.image_size == 64 and config.data.augment.hflip is True
    assert config.training.phases[1].lr == pytest.approx(1e-5) and config.training.phases[0].epochs == 2
    assert config.data.split.ratios == [0.7, 0.0, 0.3]


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.image_size=5", "data.image_size"),
        ("data.split.ratios=[0.5, 0.5]", "data.split.ratios"),
        ("data.split.ratios=[0.5, 0.4, 0.4]", "sum to 1"),
        ("data.channels=2", "data.channels"),
        ("data.normalize=zscore", "data.normalize"),
        ("training.batch_size=yes", "training.batch_size"),
        ("training.phases.0.trainable=some", "trainable"),
        ("training.phases.5.lr=0.1", "no list index 5"),
        ("data.split.method=file", "data.split.file"),
        ("seed", "key=value"),
    ],
)
def test_invalid_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        config_from_dict({}, [override])


def test_yaml_file_and_missing_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: demo\ndata:\n  split:\n    method: grouped\n")
    config = load_config(path, ["seed=7"])
    assert (config.name, config.seed, config.data.split.method) == ("demo", 7, "grouped")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
