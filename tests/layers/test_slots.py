"""Adapter slots: what a layer's forward reads follows every change of the routing and layer.

Each layer resolves the active adapters into `AdapterSlot`s when they change (see
`lorakit.layers.routing`); a slot left stale would run the wrong adapter silently, so every
path that changes the choice is checked against a model built fresh for it.
"""

from __future__ import annotations

import copy
import io
import pickle

import torch

import lorakit
from lorakit.layers import LoraLayer
from tiny_models import tiny_llama, token_batch

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def _model() -> lorakit.PeftModel:
    torch.manual_seed(0)
    options = {"r": 4, "target_modules": TARGETS, "init_lora_weights": False}
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(lora_alpha=8, **options))
    model.add_adapter("other", lorakit.LoraConfig(lora_alpha=16, **options))
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batch()).logits


def _reference(active: str) -> torch.Tensor:
    model = _model()
    model.set_adapter(active)
    return _logits(model)


def _layers(model: torch.nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_slots_follow_set_adapter_and_hold_the_layer_tensors() -> None:
    model = _model()
    assert (_reference("default") - _reference("other")).abs().max() > 1e-3
    model.set_adapter("other")
    assert torch.equal(_logits(model), _reference("other"))
    for layer in _layers(model):
        (slot,) = layer.active_slots
        A, B = slot.pair()
        assert layer._adapter_pair("other") == (A, B)  # the very parameters, not copies
        assert slot.scale == layer.scaling["other"] == slot.scale_tensor.item()


def test_deep_copies_and_pickles_switch_on_their_own() -> None:
    model = _model()
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    for clone in (copied, unpickled, pickle.loads(pickle.dumps(model))):
        clone.set_adapter("other")
        assert torch.equal(_logits(clone), _reference("other"))
        for layer in _layers(clone):  # the clone's slots hold the clone's own tensors
            assert layer.active_slots[0].pair() == layer._adapter_pair("other")
    assert torch.equal(_logits(model), _reference("default"))  # the original is untouched


def test_merge_delete_and_moves_refresh_the_slots() -> None:
    model = _model()
    model.merge_adapter()
    assert all(layer.active_slots == () for layer in _layers(model))
    assert (_logits(model) - _reference("default")).abs().max() <= 1e-5
    model.unmerge_adapter()
    assert all(len(layer.active_slots) == 1 for layer in _layers(model))
    model.set_adapter(["default", "other"])
    model.delete_adapter("default")
    assert [s.adapter_name for s in _layers(model)[0].active_slots] == ["other"]
    assert torch.equal(_logits(model), _reference("other"))
    model.to(torch.float64)
    for layer in _layers(model):
        slot = layer.active_slots[0]
        assert slot.pair()[0].dtype == torch.float64 and slot.scale_tensor.dtype == torch.float32
    reference = _model().to(torch.float64)
    reference.set_adapter("other")
    assert torch.equal(_logits(model), _logits(reference))


def test_parameters_replaced_in_their_modules_are_read() -> None:
    """A load with assign (and FSDP's sharding) puts new parameters in the same modules."""
    model = _model()
    other = _model()
    other.set_adapter("other")
    state = {k: v for k, v in other.state_dict().items() if ".default" in k}
    renamed = {k.replace(".default", ".other"): v.clone() for k, v in state.items()}
    model.load_state_dict(renamed, strict=False, assign=True)  # new parameter objects
    copied = _model()
    copied.load_state_dict(renamed, strict=False)  # the same values copied in place
    for peft_model in (model, copied):
        peft_model.set_adapter("other")
    assert torch.equal(_logits(model), _logits(copied))
    assert (_logits(model) - _reference("other")).abs().max() > 1e-3  # the values changed
