"""PiSSA, OLoRA and orthogonal initialisation, and the conversion on save, against peft.

peft is the oracle on the same base weights: adapter factors and rewritten base weights, the
rank-2r file `path_initial_model_for_weight_conversion` writes, and what that file gives when
peft loads it onto the ORIGINAL base.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import ConfigError, UnsupportedModuleError, UnsupportedOptionError
from lorakit.layers import LoraLayer
from parity.parity_support import STATE_TOL, build_pair, tiny_cnn, tiny_gpt2, tiny_llama

# A residual base plus s·B·A in fp32 gives back W to a few ulps of the weights (|W| < 0.2)
# at each layer; the logits (|y| < 1) carry those roundings through two blocks.
RESTORED_TOL = 1e-5
LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj"]


def _ids() -> torch.Tensor:
    return torch.arange(14).reshape(2, 7) % 128


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _assert_states_match(peft_model: Any, model: PeftModel) -> None:
    """Every tensor, adapters and (rewritten) base weights alike, equal to peft's."""
    theirs, ours = peft_model.state_dict(), model.state_dict()
    assert set(theirs) == set(ours)
    for key, value in theirs.items():
        assert torch.allclose(ours[key], value, atol=STATE_TOL, rtol=0), key


@pytest.mark.parametrize(
    ("make_base", "targets", "init"),
    [
        (tiny_llama, LLAMA_TARGETS, "pissa"),
        (tiny_llama, LLAMA_TARGETS, "olora"),
        (tiny_gpt2, ["c_attn", "c_fc"], "pissa"),  # Conv1D: weight (in, out), fan_in_fan_out
    ],
)
def test_base_changing_init_matches_peft_and_keeps_the_output(
    make_base: Any, targets: list[str], init: str
) -> None:
    pair = build_pair(make_base, r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init)
    _assert_states_match(pair.peft_model, pair.lorakit_model)
    base_weight = pair.base.state_dict()
    changed = [
        key
        for key, value in pair.lorakit_model.get_base_model().state_dict().items()
        if key.endswith("base_layer.weight")
        and not torch.equal(value, base_weight[key.replace("base_layer.", "")])
    ]
    assert len(changed) == 2 * len(targets)  # two layers: every targeted base weight rewritten
    expected = _logits(pair.base)
    assert torch.allclose(_logits(pair.lorakit_model), expected, atol=RESTORED_TOL, rtol=0)


def test_olora_on_conv1d_is_the_qr_of_the_out_by_in_weight() -> None:
    # peft 0.21.2 takes the QR of Conv1D's stored (in, out) weight and gives lora_A and lora_B
    # the wrong shapes ((r, out) and (in, r)); lorakit decomposes the (out, in) map it adapts.
    base = tiny_gpt2()
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="olora")
    )
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (4, 32) and B.shape == (96, 4)
    assert torch.allclose(B.t() @ B, torch.eye(4), atol=STATE_TOL, rtol=0)
    original = base.transformer.h[0].attn.c_attn.weight  # (in, out)
    restored = layer.base_layer.weight + layer.scaling["default"] * (B @ A).t()
    assert torch.allclose(restored, original, atol=STATE_TOL, rtol=0)
    assert torch.allclose(_logits(model), _logits(base), atol=RESTORED_TOL, rtol=0)


@pytest.mark.parametrize(
    ("make_base", "target", "init"),
    [
        (tiny_llama, "q_proj", "orthogonal"),
        (tiny_gpt2, "c_attn", "orthogonal"),
        (tiny_llama, "q_proj", "pissa_niter_2"),
        (tiny_gpt2, "c_attn", "pissa_niter_2"),
    ],
)
def test_random_init_equals_peft_from_the_same_generator(
    make_base: Any, target: str, init: str
) -> None:
    # One target layer. peft first creates lora_A and lora_B as nn.Linear, whose
    # kaiming_uniform_ draws (r·in, then out·r uniforms) come before its init's normal
    # draws; lorakit allocates them without drawing. The same two draws made here put the
    # global generator where peft's is when the init starts.
    base = make_base()
    config: dict[str, Any] = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": [target],
        "layers_to_transform": [0],
        "init_lora_weights": init,
    }
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note on fan_in_fan_out for Conv1D
        peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    torch.manual_seed(7)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    (layer,) = [module for module in model.modules() if isinstance(module, LoraLayer)]
    torch.manual_seed(7)
    torch.empty(4, layer.in_features).uniform_()
    torch.empty(layer.out_features, 4).uniform_()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    _assert_states_match(peft_model, model)
    assert torch.allclose(_logits(model), _logits(base), atol=RESTORED_TOL, rtol=0)


def _train_and_convert(library: Any, folder: Path, init: str) -> torch.Tensor:
    """Init, save the initial adapter, move A and B as training would, save converted."""
    model = library.get_peft_model(
        tiny_llama(),
        library.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=init),
    )
    model.save_pretrained(folder / "initial")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                steps = torch.arange(parameter.numel(), dtype=torch.float32)
                parameter.add_(0.05 * torch.sin(steps).reshape(parameter.shape))
    trained = _logits(model)
    model.save_pretrained(
        folder / "converted", path_initial_model_for_weight_conversion=str(folder / "initial")
    )
    return trained


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_on_save_equals_peft_and_loads_on_the_original_base(
    init: str, tmp_path: Path
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train_and_convert(peft, tmp_path / "peft", init)
    trained = _train_and_convert(__import__("lorakit"), tmp_path / "lorakit", init)
    theirs = load_file(tmp_path / "peft" / "converted" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "lorakit" / "converted" / "adapter_model.safetensors")
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape
        assert torch.allclose(ours[key], value, atol=STATE_TOL, rtol=0), key
    for folder in ("converted", "initial"):
        their_config, our_config = (
            json.loads((tmp_path / lib / folder / "adapter_config.json").read_text())
            for lib in ("peft", "lorakit")
        )
        for field in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
            assert our_config[field] == their_config[field], (folder, field)
    assert our_config["init_lora_weights"] is True
    converted = tmp_path / "lorakit" / "converted"
    assert json.loads((converted / "adapter_config.json").read_text())["r"] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(tiny_llama(), converted)
    assert torch.allclose(_logits(peft_loaded), trained, atol=RESTORED_TOL, rtol=0)
    ours_loaded = PeftModel.from_pretrained(tiny_llama(), converted)
    assert torch.allclose(_logits(ours_loaded), trained, atol=RESTORED_TOL, rtol=0)


def test_conversion_with_rslora_keeps_the_scale(tmp_path: Path) -> None:
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True,
                   init_lora_weights="pissa"),
    )  # fmt: skip
    model.save_pretrained(tmp_path / "initial")
    model.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["r"] == 8
    assert config["lora_alpha"] == pytest.approx(8 * math.sqrt(2), rel=1e-15)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "converted")
    assert torch.allclose(_logits(loaded), _logits(tiny_llama()), atol=RESTORED_TOL, rtol=0)


def test_a_saved_pissa_file_loads_as_plain_lora_without_touching_the_base(tmp_path: Path) -> None:
    # The file holds A and B and init_lora_weights="pissa". Loading does not run the init
    # again (peft 0.21.2 does, and rewrites the base it loads into): lorakit's base keeps
    # its weights and the adapter adds s·B·A to them, as any LoRA file does.
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    )
    model.save_pretrained(tmp_path)
    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert loaded.peft_config["default"].init_lora_weights == "pissa"
    for key, value in loaded.get_base_model().state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, before[key.replace("base_layer.", "")]), key
    merged = loaded.merge_and_unload()
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    delta = (
        layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    expected = before["model.layers.0.self_attn.q_proj.weight"] + delta
    q_weight = merged.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(q_weight, expected, atol=STATE_TOL, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora", "orthogonal"])
def test_init_value_is_carried_from_a_peft_config_and_a_dict(init: str) -> None:
    peft_config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init)
    assert LoraConfig.from_config(peft_config).init_lora_weights == init
    assert LoraConfig.from_dict(peft_config.to_dict()).init_lora_weights == init


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_conv_layer_is_refused_before_anything_changes(init: str) -> None:
    base = tiny_cnn()
    before = copy.deepcopy(base.state_dict())
    conv_name = next(name for name, module in base.named_modules() if isinstance(module, nn.Conv2d))
    with pytest.raises(UnsupportedModuleError, match=rf"init_lora_weights='{init}'.*Conv2d"):
        get_peft_model(base, LoraConfig(r=2, target_modules=[conv_name], init_lora_weights=init))
    assert not any(isinstance(module, LoraLayer) for module in base.modules())
    assert all(torch.equal(before[key], value) for key, value in base.state_dict().items())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"init_lora_weights": "orthogonal", "r": 3}, "even"),
        ({"init_lora_weights": "orthogonal", "rank_pattern": {"q_proj": 5}}, "even"),
        ({"init_lora_weights": "pissa_niter_x"}, "pissa_niter_<N>"),
        ({"init_lora_weights": "pissa_niter_"}, "pissa_niter_<N>"),
    ],
)
def test_bad_init_values_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoraConfig(target_modules=["q_proj"], **options)


def test_embedding_target_is_refused() -> None:
    with pytest.raises(UnsupportedModuleError, match=r"'pissa'.*Embedding"):
        get_peft_model(
            tiny_llama(),
            LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights="pissa"),
        )


def test_conversion_refuses_an_adapter_whose_base_did_not_change(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "initial")
    with pytest.raises(UnsupportedOptionError, match="path_initial_model_for_weight_conversion"):
        model.save_pretrained(
            tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_a_4bit_base_is_refused_before_anything_changes(init: str) -> None:
    from lorakit.quant import QuantConfig, QuantLinear

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    base[0] = QuantLinear.from_linear(base[0], QuantConfig())
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(UnsupportedModuleError, match=rf"'{init}'.*QuantLinear"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["0"], init_lora_weights=init))
    assert not any(isinstance(module, LoraLayer) for module in base.modules())
    assert all(torch.equal(before[key], value) for key, value in base.state_dict().items())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merge_unmerge_and_unload_after_a_base_changing_init(init: str) -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=init)
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.mul_(1.5)  # move off the init: the output now differs from the base
    adapted = _logits(model)
    assert not torch.allclose(adapted, _logits(tiny_llama()), atol=1e-3)
    residuals = {
        key: value.clone() for key, value in model.state_dict().items() if "base_layer" in key
    }
    model.merge_adapter()
    assert torch.allclose(_logits(model), adapted, atol=RESTORED_TOL, rtol=0)
    model.unmerge_adapter()
    for key, value in residuals.items():
        assert torch.allclose(model.state_dict()[key], value, atol=STATE_TOL, rtol=0), key
    # unload gives back the base as the init left it: the residual weights
    unloaded = model.unload()
    q_weight = unloaded.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(
        q_weight, residuals["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    )


def test_inject_adapter_in_model_runs_pissa_as_peft() -> None:
    from lorakit import inject_adapter_in_model

    options: dict[str, Any] = {"r": 4, "target_modules": ["q_proj"], "init_lora_weights": "pissa"}
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**options), tiny_llama())
    ours = inject_adapter_in_model(LoraConfig(**options), tiny_llama())
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    assert set(our_state) == set(their_state)
    for key, value in their_state.items():
        assert torch.allclose(our_state[key], value, atol=STATE_TOL, rtol=0), key
    assert torch.allclose(_logits(ours), _logits(tiny_llama()), atol=RESTORED_TOL, rtol=0)
