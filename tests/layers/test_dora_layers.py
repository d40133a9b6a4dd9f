"""DoRA in the layers: the fused node against the reference path, the cached norm, loading."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.layers.linear import LoraLinear
from tiny_models import tiny_llama, token_batch

# fp32, the same products in another order (node: in place into the base output; reference:
# plain autograd), relative to the largest entry.
RTOL = 1e-6
# m's gradient sums N products of either sign (Σ grad ⊙ t / n): measured 2.1e-6 of its largest
# entry between the two routes; a wrong factor or mask is off by O(1).
GRAD_RTOL = 1e-5


def _dora_llama(dropout: float = 0.0) -> nn.Module:
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=["q_proj", "v_proj", "up_proj"],
        use_dora=True,
        init_lora_weights=False,
    )
    torch.manual_seed(0)
    return get_peft_model(tiny_llama(), config)


def _close(got: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> bool:
    return float((got - expected).abs().max()) <= rtol * float(expected.abs().max())


def _step(model: nn.Module, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    torch.manual_seed(seed)  # the same dropout masks on both routes
    logits = model(input_ids=token_batch()).logits
    logits.square().mean().backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_dropout_training_through_the_node_equals_the_reference_path() -> None:
    node_model = _dora_llama(dropout=0.25)
    reference_model = copy.deepcopy(node_model)
    layers = [m for m in reference_model.modules() if isinstance(m, LoraLinear)]
    for layer in layers:  # a hook on the base sends the layer down the reference path
        layer.base_layer.register_forward_hook(lambda module, args, output: None)
    layer = next(m for m in node_model.modules() if isinstance(m, LoraLinear))
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ == "_LoraNodeBackward"
    assert type(layers[0](x).grad_fn).__name__ != "_LoraNodeBackward"
    out, grads = _step(node_model, seed=7)
    expected, expected_grads = _step(reference_model, seed=7)
    assert _close(out, expected)
    assert sorted(grads) == sorted(expected_grads)
    assert sum("lora_magnitude_vector" in key for key in grads) == 6
    for key, grad in expected_grads.items():
        assert _close(grads[key], grad, GRAD_RTOL), key
    torch.manual_seed(7)
    without_dropout = node_model.eval()(input_ids=token_batch()).logits
    assert not _close(out, without_dropout.detach())  # the masks did act


def test_the_cached_row_norms_follow_a_base_weight_written_in_place() -> None:
    model = _dora_llama().eval()
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        layer(x)  # fills the cache of ||W_o||²
        layer.base_layer.weight.mul_(1.5)  # as a load or a merge writes it
        got = layer(x)
    fresh = copy.deepcopy(layer)  # a copy starts with an empty cache
    with torch.no_grad():
        assert torch.equal(got, fresh(x))


def test_a_dora_file_loads_with_low_cpu_mem_usage(tmp_path: Path) -> None:
    model = _dora_llama().eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(p.is_meta for p in loaded.parameters())
    with torch.no_grad():
        expected = model(input_ids=token_batch()).logits
        assert torch.equal(loaded(input_ids=token_batch()).logits, expected)
