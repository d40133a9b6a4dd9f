"""LoraConfig validation and dict round trips, including configs written by peft."""

from __future__ import annotations

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
        (
            {"loftq_config": LoftQConfig(loftq_iter=2)},
            r"loftq_config=LoftQConfig\(loftq_bits=4, loftq_iter=2\) with "
            r"init_lora_weights=True: .* would be ignored",
        ),
        (
            {"init_lora_weights": "gaussian", "loftq_config": {"loftq_iter": 2}},
            r"with init_lora_weights='gaussian'.*Fix: set init_lora_weights='loftq'",
        ),
        ({"task_type": "CLS"}, r"task_type='CLS': allowed values are \['CAUSAL_LM'"),
        ({"layers_to_transform": [-1]}, r"layers_to_transform=\[-1\]"),
        ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\]=0"),
        ({"target_modules": [1]}, r"target_modules=\[1\]: must be a string"),
        (
            {"use_dora": True, "init_lora_weights": "olora"},
            r"use_dora=True with init_lora_weights='olora'",
        ),
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


def test_peft_written_config_with_a_feature_lorakit_lacks_is_refused() -> None:
    import peft

    data = peft.LoraConfig(r=4, target_modules=["q_proj"], use_qalora=True).to_dict()
    with pytest.raises(ConfigError, match=r"use_qalora=True: lorakit does not implement"):
        LoraConfig.from_dict(data)
    data["use_qalora"] = False  # peft's defaults and bookkeeping fields load
    config = LoraConfig.from_dict(data)
    assert config.r == 4 and config.target_modules == ["q_proj"]


def test_unknown_config_field_that_is_set_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"use_magic=True: not a LoRA option lorakit knows"):
        LoraConfig.from_dict({"r": 4, "use_magic": True})
    assert LoraConfig.from_dict({"r": 4, "merge_weights": False}).r == 4  # old peft, unset


def test_other_peft_types_are_refused() -> None:
    with pytest.raises(ConfigError, match="peft_type='IA3'"):
        LoraConfig.from_dict({"peft_type": "IA3"})
