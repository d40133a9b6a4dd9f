"""TrainConfig: validation messages, YAML/JSON files, overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorakit.train import TrainConfig, TrainConfigError, load_train_config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 0}, r"TrainConfig.batch_size = 0 is not allowed; use an integer >= 1"),
        ({"epochs": 1.5}, r"epochs = 1.5 .* an integer >= 1"),
        ({"max_steps": 0}, r"max_steps = 0 .* an integer >= 1, or null"),
        ({"learning_rate": 0}, r"learning_rate = 0 .* a number > 0.0"),
        ({"learning_rate": "fast"}, r"learning_rate = 'fast' .* use a number"),
        ({"warmup_ratio": 1.5}, r"warmup_ratio = 1.5 .* between 0.0 and 1.0"),
        ({"lr_scheduler": "step"}, r"lr_scheduler = 'step' .* 'constant', 'linear', 'cosine'"),
        ({"precision": "fp16"}, r"precision = 'fp16' .* one of 'fp32', 'bf16'"),
        ({"warmup_steps": 5, "warmup_ratio": 0.1}, r"both set; set only one"),
        ({"gradient_checkpointing": "yes"}, r"gradient_checkpointing = 'yes' .* true or false"),
        ({"resume": ""}, r"resume = '' .* a checkpoint folder path"),
    ],
)
def test_bad_values_name_field_value_and_allowed(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(**changes)


def test_yaml_file_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-4\nbatch_size: 4\nlr_scheduler: cosine\nmax_steps: 50\n")
    config = load_train_config(path, {"batch_size": 16, "seed": None})
    assert config.learning_rate == 1e-4  # PyYAML reads 1e-4 as a string; accepted as a number
    assert (config.batch_size, config.lr_scheduler, config.max_steps, config.seed) == (
        16,
        "cosine",
        50,
        0,
    )


def test_json_file(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text('{"epochs": 3, "precision": "bf16"}')
    config = load_train_config(path)
    assert (config.epochs, config.precision) == (3, "bf16")


def test_unknown_option_suggests_the_closest(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("learning_rat: 0.1\n")
    with pytest.raises(
        TrainConfigError,
        match=r"unknown TrainConfig option 'learning_rat'; did you mean 'learning_rate'",
    ):
        load_train_config(path)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config file .*missing.yaml does not exist"):
        load_train_config(tmp_path / "missing.yaml")
    with pytest.raises(TrainConfigError, match=r"extension '.toml'; use one of .yaml, .yml, .json"):
        load_train_config(tmp_path / "run.toml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(TrainConfigError, match=r"holds a list; it must be a mapping"):
        load_train_config(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(TrainConfigError, match=r"cannot parse config file .*broken.json"):
        load_train_config(broken)


def test_overrides_do_not_touch_the_original() -> None:
    config = TrainConfig(batch_size=4)
    changed = config.with_overrides({"batch_size": 8})
    assert (config.batch_size, changed.batch_size) == (4, 8)
