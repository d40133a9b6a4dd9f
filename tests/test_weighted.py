"""add_weighted_adapter on a whole model: ΔW of each layer, and agreement with peft."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.errors import AdapterNameError, ConfigError
from lorakit.layers import LoraLayer
from tiny_models import tiny_llama, token_batch

TOLERANCE = 1e-6  # fp32 products of rank-4 factors


def _two_adapters() -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        adapter_name="a",
    )
    torch.manual_seed(1)
    model.add_adapter(
        "b",
        LoraConfig(
            r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj"], init_lora_weights=False
        ),
    )
    return model


def test_cat_reproduces_weighted_sum_in_every_layer() -> None:
    model = _two_adapters()
    model.add_weighted_adapter(["a", "b"], [0.7, -1.3], "ab", combination_type="cat")
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        expected = 0.7 * module.get_delta_weight("a")
        if "b" in module.r:
            expected = expected - 1.3 * module.get_delta_weight("b")
        assert torch.allclose(module.get_delta_weight("ab"), expected, atol=TOLERANCE, rtol=0)
        assert module.r["ab"] == 4 + (2 if "b" in module.r else 0)


def test_svd_gives_best_rank_k_fit() -> None:
    model = _two_adapters()
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "svd2", combination_type="svd", svd_rank=2)
    for module in model.modules():
        if isinstance(module, LoraLayer) and "b" in module.r:
            target = (module.get_delta_weight("a") + module.get_delta_weight("b")).double()
            singular = torch.linalg.svdvals(target)
            optimal = singular[2:].square().sum().sqrt()
            error = torch.linalg.matrix_norm(module.get_delta_weight("svd2").double() - target)
            assert error.item() == pytest.approx(optimal.item(), abs=1e-5)


def test_new_adapter_outputs_match_peft_for_cat() -> None:
    torch.manual_seed(0)
    config = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "init_lora_weights": False,
    }
    ours = get_peft_model(tiny_llama(), LoraConfig(**config), adapter_name="first")  # type: ignore[arg-type]
    ours.add_adapter("second", LoraConfig(**config))  # type: ignore[arg-type]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config), adapter_name="first")
    theirs.add_adapter("second", peft.LoraConfig(**config))
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        model.add_weighted_adapter(["first", "second"], [0.5, 2.0], "mix", combination_type="cat")
        model.set_adapter("mix")
    ids = token_batch()
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def test_bad_calls_change_nothing() -> None:
    model = _two_adapters()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterNameError, match="do not exist"):
        model.add_weighted_adapter(["a", "zzz"], [1, 1], "new")
    with pytest.raises(ConfigError, match="2 adapters and 1 weights"):
        model.add_weighted_adapter(["a", "b"], [1], "new")
    with pytest.raises(ValueError, match="combination_type"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "new", combination_type="blend")
    assert "new" not in model.peft_config
    assert model.state_dict().keys() == before.keys()
