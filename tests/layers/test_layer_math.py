"""Each wrapped layer type equals W x + s · B(A(dropout(x))) computed by hand in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.layers import LoraConv, LoraEmbedding, LoraLinear
from lorakit.ops.dropout import draw_seed, drop_mask

EXACT = 1e-10  # float64; only the order of summation differs from the hand computation
SCALINGS = [
    pytest.param({"r": 3, "lora_alpha": 6}, 2.0, id="alpha/r"),
    pytest.param({"r": 4, "lora_alpha": 6, "use_rslora": True}, 3.0, id="rslora"),
    pytest.param(
        {"r": 2, "lora_alpha": 16, "rank_pattern": {"proj": 5}, "alpha_pattern": {"proj": 10}},
        2.0,
        id="patterns",
    ),
]


class Holder(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x)
        return out


def _wrap(module: nn.Module, options: dict[str, object], **extra: object) -> nn.Module:
    torch.manual_seed(0)
    config = LoraConfig(target_modules=["proj"], init_lora_weights=False, **options, **extra)  # type: ignore[arg-type]
    return get_peft_model(Holder(module.double()), config)


@pytest.mark.parametrize(("options", "scale"), SCALINGS)
def test_linear(options: dict[str, object], scale: float) -> None:
    model = _wrap(nn.Linear(7, 5), options)
    layer = model.base_model.model.proj
    assert isinstance(layer, LoraLinear) and layer.scaling["default"] == pytest.approx(scale)
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ W.t() + b + scale * (x @ A.t()) @ B.t()
    assert torch.allclose(model(x), expected, atol=EXACT, rtol=0)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_linear_with_dropout_uses_the_drawn_mask(p: float) -> None:
    model = _wrap(nn.Linear(7, 5), {"r": 3, "lora_alpha": 6, "lora_dropout": p}).train()
    layer = model.base_model.model.proj
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    torch.manual_seed(42)
    out = model(x)
    torch.manual_seed(42)
    mask = drop_mask((12, 7), p, draw_seed(), x.device).view(3, 4, 7)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ W.t() + b + 2.0 * ((x * ~mask / (1 - p)) @ A.t()) @ B.t()
    assert torch.allclose(out, expected, atol=EXACT, rtol=0)
    model.eval()  # no dropout outside training
    no_drop = x @ W.t() + b + 2.0 * (x @ A.t()) @ B.t()
    assert torch.allclose(model(x), no_drop, atol=EXACT, rtol=0)


@pytest.mark.parametrize(("options", "scale"), SCALINGS)
def test_transformers_conv1d(options: dict[str, object], scale: float) -> None:
    from transformers.pytorch_utils import Conv1D

    model = _wrap(Conv1D(5, 7), options)  # nf=5 outputs, nx=7 inputs, weight (7, 5)
    layer = model.base_model.model.proj
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    x = torch.randn(3, 7, dtype=torch.float64)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ W + b + scale * (x @ A.t()) @ B.t()
    assert torch.allclose(model(x), expected, atol=EXACT, rtol=0)


@pytest.mark.parametrize(("options", "scale"), SCALINGS)
def test_embedding(options: dict[str, object], scale: float) -> None:
    model = _wrap(nn.Embedding(11, 6), options)
    layer = model.base_model.model.proj
    assert isinstance(layer, LoraEmbedding)
    ids = torch.tensor([[0, 3, 10], [5, 5, 1]])
    W = layer.base_layer.weight
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    expected = W[ids] + scale * A.t()[ids] @ B.t()
    assert torch.allclose(model(ids), expected, atol=EXACT, rtol=0)


@pytest.mark.parametrize(("options", "scale"), SCALINGS)
def test_conv2d(options: dict[str, object], scale: float) -> None:
    model = _wrap(nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1), options)
    layer = model.base_model.model.proj
    assert isinstance(layer, LoraConv)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    low_rank = nn.functional.conv2d(x, A, stride=2, padding=1)
    expected = base(x) + scale * nn.functional.conv2d(low_rank, B)
    assert torch.allclose(model(x), expected, atol=EXACT, rtol=0)


@pytest.mark.parametrize(
    "module",
    [nn.Linear(7, 5), nn.Embedding(11, 6), nn.Conv2d(3, 4, 3), nn.Conv1d(3, 4, 3)],
    ids=["linear", "embedding", "conv2d", "conv1d"],
)
@pytest.mark.parametrize("init", [True, "gaussian"])
def test_default_inits_leave_outputs_unchanged(module: nn.Module, init: object) -> None:
    base = Holder(module.double())
    inputs = (
        torch.tensor([[1, 2, 3]])
        if isinstance(module, nn.Embedding)
        else torch.randn((2, 3, 8, 8) if isinstance(module, nn.Conv2d) else (2, 3, 8)).double()
        if isinstance(module, (nn.Conv2d, nn.Conv1d))
        else torch.randn(2, 7, dtype=torch.float64)
    )
    before = base(inputs)
    model = get_peft_model(
        base,
        LoraConfig(target_modules=["proj"], r=2, init_lora_weights=init),  # type: ignore[arg-type]
    )
    assert torch.equal(model(inputs), before)


def test_gaussian_init_has_std_one_over_r() -> None:
    torch.manual_seed(0)
    model = get_peft_model(
        Holder(nn.Linear(4000, 8)),
        LoraConfig(target_modules=["proj"], r=4, init_lora_weights="gaussian"),
    )
    A = model.base_model.model.proj.lora_A["default"].weight
    # 16k normal draws: the sample std is within 2 % of 1/r with overwhelming probability.
    assert A.std().item() == pytest.approx(1 / 4, rel=0.02)
    assert math.isclose(
        float(model.base_model.model.proj.lora_B["default"].weight.detach().abs().sum()), 0
    )


class TwoReaders(nn.Module):
    """Two projections of the same input, as q/k/v projections read one hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(7, 5)
        self.right = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.left(x), self.right(x)], dim=-1)


def test_layers_reading_one_input_share_one_mask_values_and_gradients() -> None:
    torch.manual_seed(0)
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        lora_dropout=0.4,
        target_modules=["left", "right"],
        init_lora_weights=False,
    )
    model = get_peft_model(TwoReaders().double(), config).train()
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(42)
    out = model(x)
    weights = torch.randn_like(out)
    got = torch.autograd.grad(
        (out * weights).sum(), [x, *[p for p in model.parameters() if p.requires_grad]]
    )
    torch.manual_seed(42)
    mask = drop_mask((12, 7), 0.4, draw_seed(), x.device).view(3, 4, 7)  # one draw for both
    x_dropped = x * ~mask / 0.6
    parts = []
    for name in ("left", "right"):
        layer = model.base_model.model.get_submodule(name)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        base = layer.base_layer
        parts.append(x @ base.weight.t() + base.bias + 2.0 * (x_dropped @ A.t()) @ B.t())
    expected = torch.cat(parts, dim=-1)
    assert torch.allclose(out, expected, atol=EXACT, rtol=0)
    want = torch.autograd.grad(
        (expected * weights).sum(), [x, *[p for p in model.parameters() if p.requires_grad]]
    )
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=EXACT, rtol=0)
