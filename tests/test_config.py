"""LoraConfig validation and dict round trips, including configs written by peft."""

from __future__ import annotations

import logging

import pytest

from lorakit import LoftQConfig, LoraConfig, TaskType
from lorakit.errors import ConfigError


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"r": 0}, r"r=0: the rank must be a positive int"),
        ({"r": 2.5}, r"r=2.5"),
        ({"lora_alpha": -1}, r"lora_alpha=-1: must be a positive finite number"),
        ({"lora_dropout": 1.0}, r"lora_dropout=1.0: must be a number in \[0, 1\)"),
        ({"bias": "some"}, r"bias='some': allowed values are \['none', 'all', 'lora_only'\]"),
        ({"init_lora_weights": "xavier"}, r"init_lora_weights='xavier': allowed values"),
        ({"init_lora_weights": "loftq"}, r"needs loftq_config"),
        ({"task_type": "CLS"}, r"task_type='CLS': allowed values are \['CAUSAL_LM'"),
        ({"layers_to_transform": [-1]}, r"layers_to_transform=\[-1\]"),
        ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\]=0"),
        ({"target_modules": [1]}, r"target_modules=\[1\]: must be a string"),
        ({"use_dora": True}, r"DoRA is not supported yet"),
    ],
)
def test_invalid_values_name_the_field(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**options)  # type: ignore[arg-type]


def test_round_trip_and_no_shared_state() -> None:
    targets = ["q_proj", "v_proj"]
    config = LoraConfig(
        r=4,
        target_modules=targets,
        rank_pattern={"q_proj": 2},
        task_type=TaskType.CAUSAL_LM,
        init_lora_weights="loftq",
        loftq_config=LoftQConfig(loftq_iter=2),
    )
    targets.append("k_proj")
    assert config.target_modules == ["q_proj", "v_proj"]
    data = config.to_dict()
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert data["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    assert LoraConfig.from_dict(data) == config


def test_peft_written_config_loads_and_names_ignored_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import peft

    data = peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True).to_dict()
    data["peft_type"] = "LORA"
    data["task_type"] = None
    with caplog.at_level(logging.WARNING):
        config = LoraConfig.from_dict(data)
    assert config.r == 4 and config.target_modules == ["q_proj"]
    assert "lora_bias" in caplog.text


def test_other_peft_types_are_refused() -> None:
    with pytest.raises(ConfigError, match="peft_type='IA3'"):
        LoraConfig.from_dict({"peft_type": "IA3"})
