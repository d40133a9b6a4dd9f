"""The adapter lifecycle on a tiny Llama: merge, unmerge, unload, delete, disable, mixed batches."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit import BASE_ADAPTER_NAME, LoraConfig, PeftModel, get_peft_model
from lorakit.errors import AdapterNameError, MergeError
from lorakit.layers import LoraLayer, ModulesToSaveWrapper
from tiny_models import tiny_llama, token_batch, train_causal_lm

MERGE_RTOL = 1e-5  # fp32: merged W + s·BA rounds differently from the two-matmul path
UNMERGE_ATOL = 1e-6  # fp32: (W + Δ) - Δ returns W up to one rounding of |W + Δ|


def _adapted(adapter_name: str = "default", seed: int = 0, **options: object) -> PeftModel:
    base = tiny_llama()
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        init_lora_weights=False,
        **options,  # type: ignore[arg-type]
    )
    return get_peft_model(base, config, adapter_name=adapter_name)


def _logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(ids, **kwargs).logits
    return out


def _base_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_merge_matches_unmerged_and_unmerge_restores() -> None:
    model = _adapted()
    ids = token_batch()
    unmerged = _logits(model, ids)
    before = _base_state(model)
    model.merge_adapter()
    merged = _logits(model, ids)
    assert torch.allclose(merged, unmerged, rtol=MERGE_RTOL, atol=1e-6)
    model.merge_adapter()  # idempotent: a second merge adds nothing
    assert torch.allclose(_logits(model, ids), merged, rtol=0, atol=0)
    model.unmerge_adapter()
    for key, value in _base_state(model).items():
        assert torch.allclose(value, before[key], rtol=0, atol=UNMERGE_ATOL), key
    assert torch.allclose(_logits(model, ids), unmerged, rtol=MERGE_RTOL, atol=1e-6)


def test_merge_and_unload_returns_plain_model_with_same_outputs() -> None:
    model = _adapted()
    ids = token_batch()
    expected = _logits(model, ids)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in plain.modules())
    assert not any("lora_" in key for key in plain.state_dict())
    assert torch.allclose(_logits(plain, ids), expected, rtol=MERGE_RTOL, atol=1e-6)


def test_unload_returns_the_original_modules_bit_for_bit() -> None:
    base = tiny_llama()
    originals = {name: module for name, module in base.named_modules()}
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    restored = model.unload()
    assert restored is base
    for name, module in restored.named_modules():
        assert module is originals[name], name
    for key, value in restored.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_delete_adapter_leaves_nothing_behind() -> None:
    model = _adapted()
    torch.manual_seed(3)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.delete_adapter("other")
    names = [k for k, _ in model.named_parameters()] + [k for k, _ in model.named_buffers()]
    assert not any("other" in name for name in names)
    assert "other" not in model.peft_config
    assert all("other" not in layer.r for layer in model.modules() if isinstance(layer, LoraLayer))
    model.delete_adapter("default")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in tiny_llama().parameters()
    )


def test_disable_adapter_gives_base_outputs_even_when_merged() -> None:
    base = tiny_llama()
    ids = token_batch()
    expected = _logits(base, ids)
    model = _adapted()
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), expected)
    model.merge_adapter()
    merged = _logits(model, ids)
    with model.disable_adapter():
        assert torch.allclose(_logits(model, ids), expected, rtol=MERGE_RTOL, atol=1e-6)
    assert torch.allclose(_logits(model, ids), merged, rtol=MERGE_RTOL, atol=1e-6)


def test_set_adapter_switches_outputs_and_trainability() -> None:
    model = _adapted("a", seed=1)
    torch.manual_seed(2)
    model.add_adapter(
        "b", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    ids = token_batch()
    out_a = _logits(model, ids)
    model.set_adapter("b")
    out_b = _logits(model, ids)
    assert not torch.allclose(out_a, out_b)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in k for k in trainable)
    reference = copy.deepcopy(model)
    reference.delete_adapter("a")
    assert torch.equal(_logits(reference, ids), out_b)


def test_mixed_batch_rows_equal_single_adapter_runs() -> None:
    model = _adapted("a", seed=1)
    torch.manual_seed(2)
    model.add_adapter(
        "b",
        LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    ids = token_batch(batch=3)
    names = ["b", BASE_ADAPTER_NAME, "a"]
    mixed = _logits(model, ids, adapter_names=names)
    model.set_adapter("a")
    row_a = _logits(model, ids[2:3])
    model.set_adapter("b")
    row_b = _logits(model, ids[0:1])
    with model.disable_adapter():
        row_base = _logits(model, ids[1:2])
    tolerance = {"rtol": 1e-5, "atol": 1e-6}  # rows computed in a batch of 1 vs 3
    assert torch.allclose(mixed[0:1], row_b, **tolerance)
    assert torch.allclose(mixed[1:2], row_base, **tolerance)
    assert torch.allclose(mixed[2:3], row_a, **tolerance)


def test_training_changes_only_trainable_tensors() -> None:
    model = _adapted(lora_dropout=0.1)
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    trainable = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    losses = train_causal_lm(model, steps=8)
    assert losses[-1] < losses[0]
    for key, value in model.named_parameters():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
        else:
            assert not torch.equal(value, trainable[key]), key


def test_gradient_checkpointing_reaches_adapters() -> None:
    model = _adapted()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = token_batch(batch=2, length=8)
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for k, p in model.named_parameters() if "lora_A" in k]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_trainable_parameter_count_is_exact() -> None:
    model = _adapted()
    trainable, total = model.get_nb_trainable_parameters()
    # 2 layers x (q,k,v,o: 32->32,32->16,32->16,32->32; gate/up 32->64, down 64->32), r=4
    per_layer = sum(
        4 * (i + o)
        for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
    )
    assert trainable == 2 * per_layer
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable


def test_print_trainable_parameters_format(capsys: pytest.CaptureFixture[str]) -> None:
    model = _adapted()
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert line == (
        f"trainable params: {trainable:,d} || all params: {total:,d} "
        f"|| trainable%: {100 * trainable / total:.4f}"
    )


def test_safe_merge_refuses_nan_and_leaves_model_untouched() -> None:
    model = _adapted()
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    before = _base_state(model)
    with pytest.raises(MergeError, match="NaN/inf"):
        model.merge_and_unload(safe_merge=True)
    for key, value in _base_state(model).items():
        assert torch.equal(value, before[key]) or torch.isnan(value).any(), key
    assert not any(m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))


def test_adapter_name_errors() -> None:
    model = _adapted()
    with pytest.raises(
        AdapterNameError, match="does not exist; existing adapters: \\['default'\\]"
    ):
        model.set_adapter("nope")
    with pytest.raises(AdapterNameError, match="already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterNameError, match="unknown adapters \\['x'\\]"):
        model(token_batch(batch=2), adapter_names=["x", "default"])
    with pytest.raises(ValueError, match="2 entries but the batch has 3 rows"):
        model(token_batch(batch=3), adapter_names=["default", "default"])


def test_non_reentrant_gradient_checkpointing_matches_plain_gradients() -> None:
    ids = token_batch(batch=2, length=8)
    grads = []
    for checkpointing in (False, True):
        model = _adapted(lora_dropout=0.0)
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    for key, value in grads[0].items():
        assert torch.allclose(grads[1][key], value, rtol=1e-5, atol=1e-7), key
