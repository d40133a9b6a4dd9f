"""Every field of peft's `LoraConfig` is carried over by lorakit or refused, never dropped.

peft is the oracle twice: its `LoraConfig` fields are enumerated (a field added by a later peft
fails `test_every_peft_field_is_classified` until lorakit decides on it), and a carried field
must leave lorakit's adapter config as peft's own model keeps it.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import ConfigError
from lorakit.layers import LoraLayer
from parity.parity_support import tiny_gpt2, tiny_llama, trainable_names
from tiny_models import tiny_sequence_classifier

# Fields whose values lorakit implements: peft.LoraConfig keywords setting each to a
# non-default value on the tiny Llama (with the companions some need).
CARRIED: dict[str, dict[str, Any]] = {
    "task_type": {"task_type": "CAUSAL_LM"},
    "base_model_name_or_path": {"base_model_name_or_path": "org/base"},
    "revision": {"revision": "v2"},
    "inference_mode": {"inference_mode": True},
    "r": {"r": 4},
    "target_modules": {"target_modules": ["q_proj", "up_proj"]},
    "exclude_modules": {"target_modules": "all-linear", "exclude_modules": ["k_proj"]},
    "lora_alpha": {"lora_alpha": 32},
    "lora_dropout": {"lora_dropout": 0.25},
    "fan_in_fan_out": {"fan_in_fan_out": True},  # corrected to False on nn.Linear by both
    "bias": {"bias": "lora_only"},
    "use_rslora": {"use_rslora": True},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "init_lora_weights": {"init_lora_weights": "gaussian"},
    "layers_to_transform": {"layers_to_transform": [1]},
    "layers_pattern": {"layers_to_transform": [0], "layers_pattern": "layers"},
    "rank_pattern": {"rank_pattern": {"v_proj": 2}},
    "alpha_pattern": {"alpha_pattern": {"v_proj": 3}},
    "use_dora": {"use_dora": True},
    "loftq_config": {"init_lora_weights": "loftq", "loftq_config": {"loftq_iter": 2}},
    "eva_config": {"init_lora_weights": "eva", "eva_config": peft.EvaConfig(rho=1.5, whiten=True)},
    "corda_config": {
        "init_lora_weights": "corda",
        "corda_config": CordaConfig(corda_method="kpm", prune_temporary_fields=False),
    },
    "layer_replication": {"layer_replication": [[0, 2], [1, 2]]},
    "trainable_token_indices": {"trainable_token_indices": [0, 1]},
    "ensure_weight_tying": {"ensure_weight_tying": True},  # no tied weights: a warning only
    "target_parameters": {"target_parameters": ["mlp.up_proj.weight"]},
    "lora_bias": {"lora_bias": True},  # Llama's projections have no bias: a warning only
}
# Fields of PEFT features lorakit does not implement, each set to a value peft accepts.
REFUSED: dict[str, Any] = {
    "megatron_config": {"num_layers": 2},
    "megatron_core": "my.megatron",
    "lora_ga_config": peft.LoraGAConfig(),
    "velora_config": peft.VeloraConfig(),
    "alora_invocation_tokens": [1, 2],
    "use_qalora": True,
    "qalora_group_size": 32,
    "monteclora_config": peft.MontecloraConfig(),
    "runtime_config": peft.LoraRuntimeConfig(ephemeral_gpu_offload=True),
    "use_bdlora": peft.BdLoraConfig(),
    "arrow_config": peft.ArrowConfig(),
    "kasa_config": peft.KasaConfig(),
}
# peft's bookkeeping: which library version wrote the file, and its auto class.
BOOKKEEPING = {"peft_type", "peft_version", "auto_mapping"}


def _peft_config(**options: Any) -> peft.LoraConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on options it ignores or corrects
        return peft.LoraConfig(**options)


def _comparable(value: Any) -> Any:
    """A config value in one form for both libraries (sets as sorted lists, enums as str)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def test_every_peft_field_is_classified() -> None:
    names = {item.name for item in dataclasses.fields(peft.LoraConfig)}
    assert names == set(CARRIED) | set(REFUSED) | BOOKKEEPING


@pytest.mark.parametrize("name", sorted(CARRIED))
def test_carried_field_matches_peft(name: str) -> None:
    options = {"target_modules": ["q_proj", "v_proj"], **CARRIED[name]}
    if options.get("init_lora_weights") == "loftq":
        # peft's LoftQ init needs bitsandbytes' CUDA kernels: compare the configs only
        peft_config = _peft_config(**options)
        converted = LoraConfig.from_config(peft_config)
        assert converted.loftq_config == lorakit.LoftQConfig(loftq_bits=4, loftq_iter=2)
        assert converted.init_lora_weights == "loftq"
        return
    if options.get("init_lora_weights") == "corda":
        # CorDA's layers need preprocess_corda first (tests/parity/test_parity_eva_corda.py)
        expected_corda = _comparable(_peft_config(**options).corda_config)
        assert _comparable(LoraConfig.from_config(_peft_config(**options)).corda_config) == (
            expected_corda
        )
        assert _comparable(
            LoraConfig.from_dict(_peft_config(**options).to_dict()).corda_config
        ) == (expected_corda)
        return
    base = tiny_llama()
    torch.manual_seed(0)
    peft_config = _peft_config(**options)
    untouched = copy.deepcopy(peft_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(copy.deepcopy(base), _peft_config(**options))
    model = get_peft_model(copy.deepcopy(base), peft_config)
    assert peft_config == untouched  # the caller's object is never changed
    expected = _comparable(getattr(peft_model.peft_config["default"], name))
    if name == "base_model_name_or_path":  # peft puts the base's own name_or_path in its place
        expected = options[name]
    assert _comparable(getattr(model.peft_config["default"], name)) == expected
    assert trainable_names(model) == trainable_names(peft_model)
    from_dict = get_peft_model(copy.deepcopy(base), peft_config.to_dict())
    assert _comparable(getattr(from_dict.peft_config["default"], name)) == expected


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_field_raises_from_a_peft_config_and_a_dict(name: str) -> None:
    peft_config = _peft_config(target_modules=["q_proj"], **{name: REFUSED[name]})
    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ConfigError, match=rf"{name}"):
        get_peft_model(base, peft_config)
    assert not any(isinstance(module, LoraLayer) for module in base.modules())
    assert all(torch.equal(before[key], value) for key, value in base.state_dict().items())
    if name != "runtime_config":  # not part of peft's to_dict: a runtime option only
        with pytest.raises(ConfigError, match=rf"{name}"):
            LoraConfig.from_dict(peft_config.to_dict())


@pytest.mark.parametrize("name", sorted(set(REFUSED) - {"runtime_config"}))
def test_refused_field_in_a_peft_written_file_raises(name: str, tmp_path: Path) -> None:
    plain = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path)
    _peft_config(target_modules=["q_proj"], **{name: REFUSED[name]}).save_pretrained(tmp_path)
    assert name in json.loads((tmp_path / "adapter_config.json").read_text())
    base = tiny_llama()
    with pytest.raises(ConfigError, match=rf"adapter_config.json: {name}="):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(module, LoraLayer) for module in base.modules())


def test_refused_field_through_from_pretrained_config(tmp_path: Path) -> None:
    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = _peft_config(target_modules=["q_proj"], alora_invocation_tokens=[1, 2])
    with pytest.raises(ConfigError, match=r"alora_invocation_tokens"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config)


def test_from_pretrained_config_follows_is_trainable_as_in_peft(tmp_path: Path) -> None:
    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = _peft_config(target_modules=["q_proj"])  # inference_mode=False
    for is_trainable in (False, True):
        ours = PeftModel.from_pretrained(
            tiny_llama(), tmp_path, config=config, is_trainable=is_trainable
        )
        theirs = peft.PeftModel.from_pretrained(
            tiny_llama(), tmp_path, config=copy.deepcopy(config), is_trainable=is_trainable
        )
        assert trainable_names(ours) == trainable_names(theirs)
        assert bool(trainable_names(ours)) is is_trainable
    assert config.inference_mode is False  # the caller's config is not changed


def test_layers_pattern_without_layers_to_transform_raises_like_peft() -> None:
    with pytest.raises(ValueError, match=r"layers_to_transform"):
        peft.LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(ConfigError, match=r"layers_pattern='layers' without layers_to_transform"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")


@pytest.mark.parametrize(
    ("make_base", "target", "fan_in_fan_out"),
    [(tiny_gpt2, "c_attn", False), (tiny_llama, "q_proj", True)],
    ids=["conv1d-false", "linear-true"],
)
def test_fan_in_fan_out_is_corrected_and_saved_like_peft(
    make_base: Any,
    target: str,
    fan_in_fan_out: bool,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    options = {"target_modules": [target], "fan_in_fan_out": fan_in_fan_out}
    base = make_base()
    with pytest.warns(UserWarning, match=r"fan_in_fan_out"):
        peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options))
    with caplog.at_level(logging.WARNING):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**options))
    assert f"fan_in_fan_out is set to {fan_in_fan_out}" in caplog.text
    peft_model.save_pretrained(tmp_path / "peft")
    model.save_pretrained(tmp_path / "lorakit")
    saved = [
        json.loads((tmp_path / name / "adapter_config.json").read_text())["fan_in_fan_out"]
        for name in ("peft", "lorakit")
    ]
    assert saved == [not fan_in_fan_out, not fan_in_fan_out]


@pytest.mark.parametrize(
    ("model_type", "targets"),
    [
        ("distilbert", ["q_lin", "v_lin"]),
        ("bert", ["query", "value"]),
        ("llama", ["q_proj", "v_proj"]),
        ("gpt2", ["c_attn"]),
    ],
)
def test_sequence_classification_trains_the_heads_peft_trains(
    model_type: str, targets: list[str]
) -> None:
    base = tiny_sequence_classifier(model_type)
    options = {"task_type": "SEQ_CLS", "r": 4, "target_modules": targets}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options))
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**options))
    assert model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    assert trainable_names(model) == trainable_names(peft_model)
