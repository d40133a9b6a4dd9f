"""The fused nn.Linear path equals the generic base-then-update path, values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model

EXACT = 1e-10  # float64; the two paths only sum in a different order


class LinearWithHook(nn.Linear):
    """A Linear subclass: the fused path must not take it, so it runs the generic path."""


class Holder(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x)
        return out


def _pair(bias: str, p: float) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    fused_base = nn.Linear(6, 5).double()
    generic_base = LinearWithHook(6, 5).double()
    generic_base.load_state_dict(fused_base.state_dict())
    models = []
    for base in (fused_base, generic_base):
        torch.manual_seed(1)
        config = LoraConfig(
            r=3,
            lora_alpha=6,
            target_modules=["proj"],
            init_lora_weights=False,
            bias=bias,
            lora_dropout=p,  # type: ignore[arg-type]
        )
        models.append(get_peft_model(Holder(base), config).train())
    return models[0], models[1]


@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_equals_generic(bias: str, p: float) -> None:
    fused, generic = _pair(bias, p)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    results = []
    for model in (fused, generic):
        inputs = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        out = model(inputs)
        (out * torch.arange(out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach(), inputs.grad, grads))
    (out_f, gx_f, grads_f), (out_g, gx_g, grads_g) = results
    assert torch.allclose(out_f, out_g, atol=EXACT, rtol=0)
    assert torch.allclose(gx_f, gx_g, atol=EXACT, rtol=0)  # type: ignore[arg-type]
    assert grads_f.keys() == grads_g.keys()
    assert ("base_model.model.proj.base_layer.bias" in grads_f) == (bias == "all")
    for key in grads_f:
        assert torch.allclose(grads_f[key], grads_g[key], atol=EXACT, rtol=0), key


def test_fused_inference_equals_generic() -> None:
    fused, generic = _pair("none", 0.0)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(fused.eval()(x), generic.eval()(x), atol=EXACT, rtol=0)
