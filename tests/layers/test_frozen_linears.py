"""layers.frozen: the frozen nn.Linear modules no adapter wraps run on oneDNN, and only while
lorakit holds the model; against F.linear in float64 and against peft on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tests.tiny_models import tiny_llama
from torch import nn

import lorakit
from lorakit.errors import TargetModuleError
from lorakit.layers.frozen import FrozenLinear
from lorakit.ops.frozen_linear import linear_with_frozen_weight

EPS32 = torch.finfo(torch.float32).eps
# Logits and adapter gradients of a 2-layer model through another float32 summation order of
# the LM head (and, with onednn_everywhere, of every base product): a few hundred eps.
MODEL_ATOL = 1e-5


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _classes(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


@pytest.mark.usefixtures("onednn_everywhere")
def test_constant_weight_forward_and_input_gradient_equal_the_float64_product() -> None:
    x = _randn(3, 7, 48, seed=0).requires_grad_(True)
    weight, bias, grad = _randn(40, 48, seed=1), _randn(40, seed=2), _randn(3, 7, 40, seed=3)
    y = linear_with_frozen_weight(x, weight, bias)
    assert y.grad_fn is not None and "FrozenWeightLinear" in type(y.grad_fn).__name__
    y.backward(grad)
    x64, w64 = x.detach().double(), weight.double()
    expected = x64 @ w64.t() + bias.double()
    assert (y.double() - expected).abs().max() <= 48 * EPS32 * (x64.abs() @ w64.abs().t()).max()
    expected_grad = grad.double() @ w64
    assert x.grad is not None
    bound = 40 * EPS32 * (grad.double().abs() @ w64.abs()).max()
    assert (x.grad.double() - expected_grad).abs().max() <= bound


@pytest.mark.usefixtures("onednn_everywhere")
def test_a_trainable_weight_or_autocast_or_double_backward_keeps_f_linear() -> None:
    x = _randn(5, 48, seed=0).requires_grad_(True)
    weight = _randn(40, 48, seed=1).requires_grad_(True)
    y = linear_with_frozen_weight(x, weight)
    y.square().sum().backward()
    assert weight.grad is not None  # F.linear's node: the weight gets its gradient
    expected_weight_grad = (2 * F.linear(x, weight)).t().detach() @ x.detach()
    assert torch.allclose(weight.grad, expected_weight_grad, rtol=1e-6, atol=0)
    frozen = weight.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear_with_frozen_weight(x, frozen).dtype == torch.bfloat16  # as F.linear
    (grad_x,) = torch.autograd.grad(
        linear_with_frozen_weight(x, frozen).square().sum(), x, create_graph=True
    )
    (second,) = torch.autograd.grad(grad_x.sum(), x)  # 2 Wᵀ W 1: differentiable backward
    expected = 2 * (frozen.double().t() @ (frozen.double() @ torch.ones(48, dtype=torch.float64)))
    assert torch.allclose(second.double(), expected.expand(5, 48), atol=1e-4)


def test_peft_model_freezes_only_the_unwrapped_linears_and_gives_them_back() -> None:
    base = tiny_llama()
    before = _classes(base)
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = lorakit.get_peft_model(base, config)
    frozen = {name for name, m in model.named_modules() if type(m) is FrozenLinear}
    assert "base_model.model.lm_head" in frozen
    assert "base_model.model.model.layers.0.self_attn.k_proj" in frozen
    assert all("q_proj" not in name and "v_proj" not in name for name in frozen)
    wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(wrapped.base_layer) is nn.Linear  # a wrapper runs its base itself
    model.add_adapter("second", lorakit.LoraConfig(r=2, target_modules=["k_proj"]))
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj
    assert type(k_proj.base_layer) is nn.Linear  # wrapped now: back to its own class
    model.delete_adapter("second")
    assert type(model.base_model.model.model.layers[0].self_attn.k_proj) is FrozenLinear
    with pytest.raises(TargetModuleError):
        model.add_adapter("bad", lorakit.LoraConfig(r=2, target_modules=["missing"]))
    assert {n for n, m in model.named_modules() if type(m) is FrozenLinear} == frozen
    assert _classes(copy.deepcopy(model).unload()) == before
    assert _classes(model.merge_and_unload()) == before


def test_modules_to_save_and_trainable_linears_keep_their_gradients() -> None:
    base = tiny_llama()
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = lorakit.get_peft_model(base, config)
    assert not any(type(m) is FrozenLinear for m in model.base_model.model.lm_head.modules())
    gate = model.base_model.model.model.layers[0].mlp.gate_proj
    assert type(gate) is FrozenLinear
    gate.weight.requires_grad_(True)  # unfrozen by the user: F.linear, with its gradient
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert gate.weight.grad is not None and bool(gate.weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.usefixtures("onednn_everywhere")
def test_training_step_equals_peft_with_the_frozen_head_on_onednn(use_dora: bool) -> None:
    peft = pytest.importorskip("peft")
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    ours = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**options, use_dora=use_dora))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**options, use_dora=use_dora))
    theirs.load_state_dict(ours.state_dict())
    assert type(ours.base_model.model.lm_head) is FrozenLinear
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (ours, theirs):
        torch.manual_seed(0)
        output = model(input_ids=ids, labels=ids)
        output.loss.backward()
        losses.append(output)
    assert torch.allclose(losses[0].logits, losses[1].logits, atol=MODEL_ATOL, rtol=0)
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, parameter in ours.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None
            assert torch.allclose(parameter.grad, grads[name], atol=MODEL_ATOL, rtol=0), name
