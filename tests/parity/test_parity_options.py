"""lorakit against peft option by option: targets, exclusions, layers, patterns, scaling, bias,
modules_to_save, initialisation, Embedding and Conv2d targets, and combinations (hypothesis).

Each case wraps one base with both libraries and requires the same adapted modules, the same
per-module `r` and `scaling`, the same trainable parameters and state-dict keys and, with peft's
A/B values copied into lorakit, the same outputs.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit
from lorakit.constants import DEFAULT_TARGET_MODULES
from parity.parity_support import (
    Pair,
    adapted_names,
    assert_forward_matches_peft,
    build_pair,
    changes_output,
    image_batch,
    layer_settings,
    run,
    tiny_bert_classifier,
    tiny_cnn,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    tiny_vit,
    token_batch,
    trainable_names,
)

Inputs = dict[str, torch.Tensor] | torch.Tensor
LLAMA_LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _inputs_for(make_base: Callable[[], nn.Module]) -> Inputs:
    if make_base is tiny_cnn:
        return image_batch()
    if make_base is tiny_vit:
        return {"pixel_values": image_batch()}
    ids = token_batch()
    if make_base is tiny_t5:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def check_same_structure(pair: Pair) -> None:
    peft_model, lorakit_model = pair.peft_model, pair.lorakit_model
    assert adapted_names(lorakit_model) == adapted_names(peft_model)
    assert layer_settings(lorakit_model) == layer_settings(peft_model)
    assert trainable_names(lorakit_model) == trainable_names(peft_model)
    assert lorakit_model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    assert set(lorakit_model.state_dict()) == set(peft_model.state_dict())


def check_same_forward(pair: Pair, inputs: Inputs) -> None:
    pair.copy_peft_weights()
    assert changes_output(run(pair.peft_model, inputs), run(pair.base, inputs))
    assert_forward_matches_peft(run(pair.lorakit_model, inputs), pair.peft_model, inputs)


def check_parity(make_base: Callable[[], nn.Module], **config: Any) -> Pair:
    """Structure and (with `init_lora_weights=False`) forward parity for one config."""
    pair = build_pair(make_base, init_lora_weights=False, **config)
    check_same_structure(pair)
    check_same_forward(pair, _inputs_for(make_base))
    return pair


# --- target_modules ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target_modules",
    [
        ["q_proj", "v_proj"],
        ["self_attn.k_proj", "model.layers.1.mlp.down_proj"],  # last dotted parts / whole path
        r".*\.(q_proj|up_proj)",
        r"model\.layers\.1\..*_proj",
        "all-linear",
        None,
    ],
    ids=["names", "dotted-names", "regex", "regex-layer", "all-linear", "default"],
)
def test_target_modules_forms_match_peft(target_modules: Any) -> None:
    check_parity(tiny_llama, target_modules=target_modules)


@pytest.mark.parametrize("make_base", [tiny_gpt2, tiny_bert_classifier, tiny_t5])
def test_default_targets_match_peft(make_base: Callable[[], nn.Module]) -> None:
    pair = check_parity(make_base)
    assert adapted_names(pair.peft_model)  # the default selected something


def test_default_target_table_agrees_with_peft_where_both_have_one() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

    shared = sorted(set(peft_map) & set(DEFAULT_TARGET_MODULES))
    assert len(shared) >= 15
    for model_type in shared:
        ours, theirs = DEFAULT_TARGET_MODULES[model_type], peft_map[model_type]
        assert sorted(ours) == sorted(theirs), model_type


def test_vit_default_targets_the_attention_query_and_value() -> None:
    base = tiny_vit()
    lorakit_model = lorakit.get_peft_model(base, lorakit.LoraConfig())
    oracle = peft.get_peft_model(tiny_vit(), peft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert adapted_names(lorakit_model) == adapted_names(oracle)


# --- exclude_modules --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target_modules", "exclude_modules"),
    [
        ("all-linear", ["k_proj", "down_proj"]),
        ("all-linear", r".*layers\.0\..*"),
        (["q_proj", "v_proj", "up_proj"], ["model.layers.1.self_attn.v_proj"]),
    ],
    ids=["names", "regex", "whole-path"],
)
def test_exclude_modules_match_peft(target_modules: Any, exclude_modules: Any) -> None:
    pair = check_parity(tiny_llama, target_modules=target_modules, exclude_modules=exclude_modules)
    names = adapted_names(pair.lorakit_model)
    assert names
    for name in names:
        if isinstance(exclude_modules, str):
            assert re.fullmatch(exclude_modules, name) is None
        else:
            assert not any(name == key or name.endswith("." + key) for key in exclude_modules)


# --- layers_to_transform / layers_pattern -----------------------------------------------------


@pytest.mark.parametrize(
    ("make_base", "targets", "layers", "pattern"),
    [
        (tiny_llama, ["q_proj", "v_proj"], 1, None),
        (tiny_llama, ["q_proj", "v_proj"], 1, "layers"),
        (tiny_llama, LLAMA_LINEAR_NAMES, [0], "layers"),
        (tiny_llama, ["q_proj", "down_proj"], [0, 1], ["layers"]),
        (tiny_gpt2, ["c_attn", "c_fc"], [1], "h"),
        (tiny_bert_classifier, ["query", "dense"], [0], "layer"),
        (tiny_t5, ["q", "v"], [1], "block"),
        pytest.param(tiny_t5, ["q", "v"], [1], None),
    ],
    ids=[
        "llama-int",
        "llama-int-pattern",
        "llama-all-names",
        "llama-list",
        "gpt2-h",
        "bert-layer",
        "t5-block",
        "t5-no-pattern",
    ],
)
def test_layers_to_transform_match_peft(
    make_base: Callable[[], nn.Module], targets: Any, layers: Any, pattern: Any
) -> None:
    pair = check_parity(
        make_base, target_modules=targets, layers_to_transform=layers, layers_pattern=pattern
    )
    assert len(adapted_names(pair.lorakit_model)) > 0


# --- rank_pattern, alpha_pattern, use_rslora --------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize(
    ("rank_pattern", "alpha_pattern"),
    [
        ({"q_proj": 2, "down_proj": 6}, {"v_proj": 3, "up_proj": 12}),
        (
            {r"model\.layers\.1\.self_attn\.v_proj": 6, r".*mlp\..*_proj": 3},
            {r"layers\.0\..*": 5, "model.layers.1.self_attn.q_proj": 7},
        ),
        ({"q_proj": 2, r".*_proj": 5}, {r".*\.1\..*": 2}),  # first matching key wins
    ],
    ids=["names", "regexes", "first-wins"],
)
def test_rank_and_alpha_patterns_match_peft(
    rank_pattern: dict[str, int], alpha_pattern: dict[str, float], use_rslora: bool
) -> None:
    pair = check_parity(
        tiny_llama,
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=use_rslora,
    )
    ranks = {r["default"] for r, _ in layer_settings(pair.lorakit_model).values()}
    assert len(ranks) > 1  # the patterns really changed some ranks


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_option_matches_peft(use_rslora: bool) -> None:
    pair = check_parity(tiny_llama, r=4, lora_alpha=8, use_rslora=use_rslora)
    expected = 8 / math.sqrt(4) if use_rslora else 8 / 4
    for _, scaling in layer_settings(pair.lorakit_model).values():
        assert scaling["default"] == expected


# --- bias -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_base", "config", "bias"),
    [
        (tiny_gpt2, {"target_modules": ["c_attn"]}, "none"),
        (tiny_gpt2, {"target_modules": ["c_attn"]}, "all"),
        (tiny_gpt2, {"target_modules": ["c_attn"]}, "lora_only"),
        (tiny_bert_classifier, {"task_type": "SEQ_CLS"}, "none"),
        pytest.param(tiny_bert_classifier, {"task_type": "SEQ_CLS"}, "all"),
        (tiny_bert_classifier, {"task_type": "SEQ_CLS"}, "lora_only"),
        (tiny_t5, {"target_modules": ["q", "wo"]}, "all"),
    ],
    ids=[
        "gpt2-none",
        "gpt2-all",
        "gpt2-lora_only",
        "bert-none",
        "bert-all",
        "bert-lora_only",
        "t5",
    ],
)
def test_bias_modes_match_peft(
    make_base: Callable[[], nn.Module], config: dict[str, Any], bias: str
) -> None:
    pair = build_pair(make_base, bias=bias, **config)
    check_same_structure(pair)


# --- modules_to_save --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_base", "config"),
    [
        (tiny_llama, {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
        (tiny_bert_classifier, {"target_modules": ["query"], "modules_to_save": ["classifier"]}),
        (tiny_cnn, {"target_modules": ["0", "2"], "modules_to_save": ["4"]}),
        (tiny_vit, {"target_modules": "all-linear", "modules_to_save": ["classifier"]}),
        pytest.param(
            tiny_bert_classifier, {"target_modules": "all-linear", "modules_to_save": ["pooler"]}
        ),
    ],
    ids=["llama-lm_head", "bert-classifier", "cnn-head", "vit-all-linear", "bert-nested"],
)
def test_modules_to_save_match_peft(make_base: Callable[[], nn.Module], config: Any) -> None:
    check_parity(make_base, **config)


def test_inference_mode_trains_nothing_as_in_peft() -> None:
    pair = build_pair(
        tiny_bert_classifier, task_type="SEQ_CLS", inference_mode=True, init_lora_weights=False
    )
    check_same_structure(pair)
    assert pair.lorakit_model.get_nb_trainable_parameters()[0] == 0


# --- init_lora_weights, Embedding and Conv2d targets ------------------------------------------
LAYER_TARGETS: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "linear": (tiny_llama, ["q_proj", "v_proj"]),
    "conv1d-transformers": (tiny_gpt2, ["c_attn"]),
    "embedding": (tiny_llama, ["embed_tokens"]),
    "conv2d": (tiny_cnn, ["0", "2"]),
}


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("layer", sorted(LAYER_TARGETS))
def test_identity_inits_leave_the_base_output_unchanged(layer: str, init: Any) -> None:
    make_base, targets = LAYER_TARGETS[layer]
    pair = build_pair(make_base, target_modules=targets, init_lora_weights=init)
    check_same_structure(pair)
    inputs = _inputs_for(make_base)
    expected = run(pair.base, inputs)
    assert torch.equal(run(pair.peft_model, inputs), expected)
    assert torch.equal(run(pair.lorakit_model, inputs), expected)


@pytest.mark.parametrize("init", [True, "gaussian", False])
@pytest.mark.parametrize("layer", sorted(LAYER_TARGETS))
def test_outputs_match_peft_for_every_init(layer: str, init: Any) -> None:
    make_base, targets = LAYER_TARGETS[layer]
    pair = build_pair(make_base, target_modules=targets, init_lora_weights=init, r=4, lora_alpha=6)
    check_same_structure(pair)
    inputs = _inputs_for(make_base)
    # With B = 0 (or embedding A = 0) copying would compare nothing: perturb peft's factors.
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, parameter in pair.peft_model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    check_same_forward(pair, inputs)


def _factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    factors = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
            factors[name] = (module.lora_embedding_A["default"], module.lora_embedding_B["default"])
        elif hasattr(module, "lora_A") and "default" in module.lora_A:
            factors[name] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return factors


@pytest.mark.parametrize(
    "init",
    [
        True,
        False,
        pytest.param("gaussian"),
    ],
)
def test_embedding_init_draws_like_peft(init: Any) -> None:
    make_base, targets = LAYER_TARGETS["embedding"]
    pair = build_pair(make_base, target_modules=targets, init_lora_weights=init, r=4)
    _check_init_statistics(pair)


@pytest.mark.parametrize("init", [True, "gaussian", False])
@pytest.mark.parametrize("layer", ["linear", "conv1d-transformers", "conv2d"])
def test_init_draws_like_peft(layer: str, init: Any) -> None:
    make_base, targets = LAYER_TARGETS[layer]
    pair = build_pair(make_base, target_modules=targets, init_lora_weights=init, r=4)
    _check_init_statistics(pair)


def _check_init_statistics(pair: Pair) -> None:
    """Same factor is zero, and each non-zero factor has peft's spread (within sampling noise)."""
    expected, got = _factors(pair.peft_model), _factors(pair.lorakit_model)
    assert set(got) == set(expected)
    for name, (peft_A, peft_B) in expected.items():
        A, B = got[name]
        for ours, theirs in ((A, peft_A), (B, peft_B)):
            assert ours.shape == theirs.shape
            assert bool((ours == 0).all()) == bool((theirs == 0).all()), name
    # Pool every layer's values so the standard deviations are estimated from many samples.
    for index in (0, 1):
        ours = torch.cat([pair_[index].detach().flatten() for pair_ in got.values()])
        theirs = torch.cat([pair_[index].detach().flatten() for pair_ in expected.values()])
        if bool((theirs == 0).all()):
            continue
        assert float(ours.std()) == pytest.approx(float(theirs.std()), rel=0.25)


def test_embedding_and_linear_targets_together_match_peft() -> None:
    pair = check_parity(
        tiny_llama,
        target_modules=["embed_tokens", "q_proj", "lm_head"],
        rank_pattern={"embed_tokens": 2},
        alpha_pattern={"lm_head": 5},
    )
    assert "model.embed_tokens" in adapted_names(pair.lorakit_model)


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["0", "2"]},
        {"target_modules": "all-linear"},
        {"target_modules": ["0", "2", "4"], "rank_pattern": {"2": 2}, "alpha_pattern": {"0": 3}},
        {"target_modules": r"[02]", "use_rslora": True},
    ],
    ids=["convs", "all-linear", "patterns", "regex-rslora"],
)
def test_conv2d_cnn_matches_peft(config: dict[str, Any]) -> None:
    check_parity(tiny_cnn, **config)


# --- combinations -----------------------------------------------------------------------------
PATTERN_KEYS = [*LLAMA_LINEAR_NAMES, r"model\.layers\.0\..*", r".*mlp\.(up|down)_proj"]


@st.composite
def llama_configs(draw: st.DrawFn) -> dict[str, Any]:
    targets = draw(st.lists(st.sampled_from(LLAMA_LINEAR_NAMES), min_size=1, unique=True))
    layers = draw(st.sampled_from([None, 0, 1, [0], [0, 1]]))
    config: dict[str, Any] = {
        "target_modules": draw(st.sampled_from([targets, "all-linear"])),
        "r": draw(st.sampled_from([1, 2, 4, 8])),
        "lora_alpha": draw(st.sampled_from([1, 4, 8, 16])),
        "use_rslora": draw(st.booleans()),
        "bias": draw(st.sampled_from(["none", "all", "lora_only"])),
        "rank_pattern": draw(
            st.dictionaries(st.sampled_from(PATTERN_KEYS), st.integers(1, 6), max_size=3)
        ),
        "alpha_pattern": draw(
            st.dictionaries(st.sampled_from(PATTERN_KEYS), st.integers(1, 20), max_size=3)
        ),
        "exclude_modules": draw(
            st.none() | st.lists(st.sampled_from(LLAMA_LINEAR_NAMES), max_size=2, unique=True)
        ),
    }
    if layers is not None and isinstance(config["target_modules"], list):
        config["layers_to_transform"] = layers
        config["layers_pattern"] = draw(st.sampled_from([None, "layers"]))
    return config


_LLAMA: list[nn.Module] = []


def _shared_llama() -> nn.Module:
    if not _LLAMA:
        _LLAMA.append(tiny_llama())
    return _LLAMA[0]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=llama_configs())
def test_option_combinations_match_peft(config: dict[str, Any]) -> None:
    base = _shared_llama()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    except ValueError:
        # peft finds nothing to adapt (everything excluded): lorakit must refuse as well.
        with pytest.raises(ValueError, match="matches no module"):
            lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
        return
    pair = build_pair(base, init_lora_weights=False, **config)
    check_same_structure(pair)
    # init False draws B ~ U(-1/sqrt(r), 1/sqrt(r)): with r = 1 and scales up to 20, s·BA is
    # ~70 times the base weights (std 0.02) and the network amplifies 1-ulp differences past
    # 1e-5. Factors of std 0.05 keep s·BA of the base weights' order, as in a trained adapter.
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, parameter in pair.peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    pair.copy_peft_weights()
    inputs = {"input_ids": token_batch()}
    expected = run(pair.peft_model, inputs)
    # A weak draw (one small projection, s = 1/4) can move the logits by less than 100 x the
    # tolerance; agreement then says nothing about the adapters, so the example is discarded.
    assume(changes_output(expected, run(pair.base, inputs)))
    assert_forward_matches_peft(run(pair.lorakit_model, inputs), pair.peft_model, inputs)
