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


def _node_and_reference_runs(
    model: nn.Module, layers: list[nn.Module], inputs: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(output, gradients) of one training step through the node, then through the reference
    path (a no-op forward hook on every base makes each layer take it), same dropout masks."""
    runs = []
    for use_reference in (False, True):
        handles = [
            layer.base_layer.register_forward_hook(lambda module, args, out: None)
            for layer in layers
            if use_reference
        ]
        model.zero_grad()
        torch.manual_seed(11)
        out = model(**inputs).logits
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        runs.append((out.detach(), grads))
        for handle in handles:
            handle.remove()
    return runs


NODE_VS_REFERENCE = 1e-5  # fp32, the same products summed in another order


def test_two_active_adapters_and_conv1d_run_in_the_node_as_in_the_reference() -> None:
    """GPT-2 (transformers' Conv1D, weight (in, out)) with two adapters active at once: one
    node per layer (both branches in it), equal to the plain-autograd reference path."""
    from lorakit.layers.linear import LoraLinear
    from tiny_models import tiny_gpt2, token_batch

    torch.manual_seed(0)
    options = {
        "target_modules": ["c_attn", "c_fc"],
        "init_lora_weights": False,
        "lora_dropout": 0.2,
    }
    model = get_peft_model(
        tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, **options)
    )
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=3, fan_in_fan_out=True, **options))
    model.set_adapter(["default", "other"])  # both active and trainable
    model.train()
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(layer.fan_in_fan_out for layer in layers)
    x = layers[0].base_layer.weight.new_empty(3, layers[0].in_features).normal_()
    x.requires_grad_(True)
    assert type(layers[0](x).grad_fn).__name__ == "_LoraNodeBackward"
    inputs = {"input_ids": token_batch()}
    (node_out, node_grads), (ref_out, ref_grads) = _node_and_reference_runs(model, layers, inputs)
    assert torch.allclose(node_out, ref_out, atol=NODE_VS_REFERENCE, rtol=NODE_VS_REFERENCE)
    assert node_grads.keys() == ref_grads.keys()
    assert any(".other." in key for key in node_grads)
    for key, grad in node_grads.items():
        assert torch.allclose(grad, ref_grads[key], atol=NODE_VS_REFERENCE, rtol=1e-4), key
