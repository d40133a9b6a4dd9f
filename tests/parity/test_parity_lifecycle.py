"""lorakit against peft through the adapter lifecycle: merge, unmerge, merge_and_unload, unload,
a second adapter with set_adapter, disable_adapter, mixed-adapter batches and delete_adapter.

Each case holds two adapters, "a" and "b", with different targets, ranks and alphas; peft's
values of both are copied into lorakit before anything is compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
from torch import nn

import lorakit
from parity.parity_support import (
    FORWARD_TOL,
    MERGE_TOL,
    STATE_TOL,
    Pair,
    adapted_names,
    assert_forward_matches_peft,
    build_pair,
    changes_output,
    image_batch,
    max_abs_diff,
    run,
    tiny_bert_classifier,
    tiny_cnn,
    tiny_gpt2,
    tiny_llama,
    token_batch,
    trainable_names,
)

# peft notes when disable_adapter() unmerges adapters that a later call finds unmerged.
pytestmark = pytest.mark.filterwarnings("ignore:Already unmerged")


@dataclass(frozen=True)
class Case:
    make_base: Callable[[], nn.Module]
    first: dict[str, Any]
    second: dict[str, Any]

    def inputs(self, batch: int = 2) -> dict[str, torch.Tensor] | torch.Tensor:
        if self.make_base is tiny_cnn:
            return image_batch(batch)
        return {"input_ids": token_batch(batch=batch)}


CASES: dict[str, Case] = {
    # Linear and Embedding layers.
    "llama": Case(
        tiny_llama,
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "r": 4, "lora_alpha": 8},
        {"target_modules": ["k_proj", "v_proj"], "r": 2, "lora_alpha": 3},
    ),
    # transformers' Conv1D (fan_in_fan_out weights).
    "gpt2": Case(
        tiny_gpt2,
        {"target_modules": ["c_attn", "c_proj"], "r": 4, "lora_alpha": 8, "fan_in_fan_out": True},
        {
            "target_modules": ["c_fc"],
            "r": 2,
            "lora_alpha": 5,
            "use_rslora": True,
            "fan_in_fan_out": True,
        },
    ),
    # Sequence classification: each adapter has its own copy of the classifier head.
    "bert": Case(
        tiny_bert_classifier,
        {"task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8},
        {"task_type": "SEQ_CLS", "target_modules": ["key", "dense"], "r": 2, "lora_alpha": 3},
    ),
    # torch Conv2d layers and a Linear head.
    "cnn": Case(
        tiny_cnn,
        {"target_modules": ["0", "2"], "r": 4, "lora_alpha": 8},
        {"target_modules": ["2", "4"], "r": 2, "lora_alpha": 3},
    ),
}

CASE_NAMES = sorted(CASES)


def two_adapter_pair(case: Case) -> Pair:
    """Adapters "a" (active) and "b" in both libraries, with peft's values copied to lorakit."""
    pair = build_pair(case.make_base, adapter_name="a", init_lora_weights=False, **case.first)
    second = {"init_lora_weights": False, **case.second}
    pair.peft_model.add_adapter("b", peft.LoraConfig(**second))
    pair.lorakit_model.add_adapter("b", lorakit.LoraConfig(**second))
    pair.copy_peft_weights()
    return pair


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors by their plain path (wrapper path parts removed)."""
    weights = {}
    for key, value in model.state_dict().items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        plain = key.removeprefix("base_model.model.")
        plain = plain.replace(".base_layer.", ".").replace(".original_module.", ".")
        weights[plain] = value
    return weights


@pytest.mark.parametrize("name", CASE_NAMES)
def test_second_adapter_and_set_adapter_match_peft(name: str) -> None:
    case = CASES[name]
    pair = two_adapter_pair(case)
    peft_model, lorakit_model = pair.peft_model, pair.lorakit_model
    assert set(lorakit_model.state_dict()) == set(peft_model.state_dict())
    # A new adapter is added inactive and frozen in both.
    assert trainable_names(lorakit_model) == trainable_names(peft_model)
    inputs = case.inputs()
    output_a = run(peft_model, inputs)
    assert_forward_matches_peft(run(lorakit_model, inputs), peft_model, inputs)
    peft_model.set_adapter("b")
    lorakit_model.set_adapter("b")
    assert lorakit_model.active_adapter == peft_model.active_adapter == "b"
    assert trainable_names(lorakit_model) == trainable_names(peft_model)
    assert lorakit_model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    output_b = run(peft_model, inputs)
    assert changes_output(output_b, output_a)
    assert_forward_matches_peft(run(lorakit_model, inputs), peft_model, inputs)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_merge_and_unmerge_match_peft(name: str) -> None:
    case = CASES[name]
    pair = two_adapter_pair(case)
    peft_model, lorakit_model = pair.peft_model, pair.lorakit_model
    inputs = case.inputs()
    unmerged = run(peft_model, inputs)
    peft_model.merge_adapter()
    lorakit_model.merge_adapter()
    merged = run(peft_model, inputs)
    assert max_abs_diff(run(lorakit_model, inputs), merged) <= MERGE_TOL
    assert max_abs_diff(merged, unmerged) <= MERGE_TOL  # peft itself: merging keeps outputs
    expected_weights, got_weights = base_weights(peft_model), base_weights(lorakit_model)
    assert set(got_weights) == set(expected_weights)
    for key, value in expected_weights.items():
        assert max_abs_diff(got_weights[key], value) <= STATE_TOL, key
    peft_model.unmerge_adapter()
    lorakit_model.unmerge_adapter()
    for key, value in base_weights(pair.base).items():
        assert max_abs_diff(base_weights(lorakit_model)[key], value) <= STATE_TOL, key
    assert max_abs_diff(run(lorakit_model, inputs), run(peft_model, inputs)) <= MERGE_TOL


@pytest.mark.parametrize(
    "options",
    [{}, {"adapter_names": ["a", "b"], "safe_merge": True}],
    ids=["active", "both-safe"],
)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_merge_and_unload_state_dicts_match_peft(name: str, options: dict[str, Any]) -> None:
    case = CASES[name]
    pair = two_adapter_pair(case)
    pair.peft_model.set_adapter("b")
    pair.lorakit_model.set_adapter("b")
    expected_model = pair.peft_model.merge_and_unload(**options)
    got_model = pair.lorakit_model.merge_and_unload(**options)
    assert type(got_model) is type(expected_model) is type(pair.base)
    assert adapted_names(got_model) == adapted_names(expected_model) == []
    expected, got = expected_model.state_dict(), got_model.state_dict()
    assert set(got) == set(expected) == set(pair.base.state_dict())
    for key, value in expected.items():
        assert max_abs_diff(got[key], value) <= STATE_TOL, key
    inputs = case.inputs()
    assert max_abs_diff(run(got_model, inputs), run(expected_model, inputs)) <= MERGE_TOL


@pytest.mark.parametrize("name", CASE_NAMES)
def test_unload_gives_the_base_back_like_peft(name: str) -> None:
    """Known, deliberate differences: peft's unload() keeps merged weights merged and puts the
    active adapter's copy of each modules_to_save module in place; lorakit's unmerges first and
    puts the original modules back. So: unmerged adapters, and heads compared to the base only.
    """
    case = CASES[name]
    pair = two_adapter_pair(case)
    heads = {
        module_name.removeprefix("base_model.model.") + "."
        for module_name, module in pair.peft_model.named_modules()
        if hasattr(module, "original_module")
    }
    expected = pair.peft_model.unload().state_dict()
    got = pair.lorakit_model.unload().state_dict()
    assert set(got) == set(expected) == set(pair.base.state_dict())
    for key, value in pair.base.state_dict().items():
        assert torch.equal(got[key], value), key
        if not key.startswith(tuple(heads)):
            assert torch.equal(expected[key], value), key


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_disable_adapter_runs_the_base_like_peft(name: str, merged: bool) -> None:
    case = CASES[name]
    pair = two_adapter_pair(case)
    peft_model, lorakit_model = pair.peft_model, pair.lorakit_model
    inputs = case.inputs()
    base_output = run(pair.base, inputs)
    if merged:
        peft_model.merge_adapter()
        lorakit_model.merge_adapter()
    with peft_model.disable_adapter(), lorakit_model.disable_adapter():
        expected = run(peft_model, inputs)
        got = run(lorakit_model, inputs)
    if merged:  # the adapters were unmerged for the block: the base to rounding
        assert max_abs_diff(expected, base_output) <= MERGE_TOL
        assert max_abs_diff(got, base_output) <= MERGE_TOL
    else:
        assert torch.equal(expected, base_output)
        assert torch.equal(got, base_output)
    # After the block both run the adapter again.
    assert changes_output(run(peft_model, inputs), base_output)
    assert max_abs_diff(run(lorakit_model, inputs), run(peft_model, inputs)) <= MERGE_TOL


@pytest.mark.parametrize("name", CASE_NAMES)
def test_mixed_adapter_batch_matches_peft(name: str) -> None:
    case = CASES[name]
    pair = two_adapter_pair(case)
    inputs = case.inputs(batch=3)
    rows = ["a", lorakit.BASE_ADAPTER_NAME, "b"]
    got = run(pair.lorakit_model, inputs, adapter_names=rows)
    assert_forward_matches_peft(got, pair.peft_model, inputs, adapter_names=rows)
    # Each row really used its own adapter: row 1 is the base's, rows 0 and 2 differ from it.
    base_output = run(pair.base, inputs)
    assert max_abs_diff(got[1], base_output[1]) <= FORWARD_TOL
    assert changes_output(got[0], base_output[0])
    assert changes_output(got[2], base_output[2])


def _without_wrapper_parts(keys: set[str]) -> set[str]:
    return {key.replace(".base_layer.", ".") for key in keys}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_delete_adapter_matches_peft(name: str) -> None:
    case = CASES[name]
    pair = two_adapter_pair(case)
    peft_model, lorakit_model = pair.peft_model, pair.lorakit_model
    peft_model.delete_adapter("b")
    lorakit_model.delete_adapter("b")
    assert lorakit_model.active_adapter == peft_model.active_adapter == "a"
    assert list(lorakit_model.peft_config) == list(peft_model.peft_config) == ["a"]
    expected_keys, got_keys = set(peft_model.state_dict()), set(lorakit_model.state_dict())
    assert not any(".b." in key or key.endswith(".b") for key in got_keys)
    # peft keeps a wrapper whose every adapter was deleted (keys `<path>.base_layer.weight`);
    # lorakit puts the plain module back (`<path>.weight`). Apart from that the keys agree.
    assert _without_wrapper_parts(got_keys) == _without_wrapper_parts(expected_keys)
    assert trainable_names(lorakit_model) == trainable_names(peft_model)
    inputs = case.inputs()
    assert_forward_matches_peft(run(lorakit_model, inputs), peft_model, inputs)


def test_print_trainable_parameters_matches_peft(capsys: pytest.CaptureFixture[str]) -> None:
    pair = two_adapter_pair(CASES["bert"])
    pair.peft_model.print_trainable_parameters()
    expected = capsys.readouterr().out
    pair.lorakit_model.print_trainable_parameters()
    got = capsys.readouterr().out
    assert expected.startswith("trainable params: ")
    assert got == expected
