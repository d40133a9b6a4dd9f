"""lorakit's PEFT key mapping against what `peft` itself writes and loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lorakit.io import (
    AdapterMismatchError,
    adapter_state_dict,
    embedding_prefixes_to_save,
    load_adapter_files,
    model_keys_for,
)

MODEL_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Case:
    model: str
    adapters: dict[str, dict[str, Any]]
    peft_save_embedding_layers: bool | str = "auto"
    is_vocab_resized: bool = False


SEQ_CLS = {"task_type": "SEQ_CLS", "r": 4}
CASES = {
    "llama_all_linear": Case("llama", {"default": {"r": 4, "target_modules": "all-linear"}}),
    "llama_embedding_target": Case(
        "llama", {"default": {"r": 4, "target_modules": ["embed_tokens", "q_proj"]}}
    ),
    "llama_embedding_regex": Case(
        "llama", {"default": {"r": 4, "target_modules": r".*\.(embed_tokens|v_proj)"}}
    ),
    "bert_seq_cls_lora_only": Case(
        "bert",
        {
            "default": {
                **SEQ_CLS,
                "target_modules": ["query", "value"],
                "modules_to_save": ["classifier"],
                "bias": "lora_only",
            }
        },
    ),
    "bert_seq_cls_bias_all": Case(
        "bert", {"default": {**SEQ_CLS, "target_modules": ["query", "dense"], "bias": "all"}}
    ),
    "roberta_nested_head_bias_all": Case(
        "roberta", {"default": {**SEQ_CLS, "target_modules": ["query"], "bias": "all"}}
    ),
    "gpt2_conv1d_resized_vocab": Case(
        "gpt2_resized",
        {"default": {"r": 4, "target_modules": ["c_attn"]}},
        peft_save_embedding_layers=True,
        is_vocab_resized=True,
    ),
    "llama_dora": Case(
        "llama", {"default": {"r": 4, "target_modules": ["q_proj", "v_proj"], "use_dora": True}}
    ),
    "vit_conv2d_and_linear": Case(
        "vit",
        {"default": {"r": 4, "target_modules": ["projection", "query"], "bias": "lora_only"}},
    ),
    "llama_three_adapters": Case(
        "llama",
        {
            "default": {"r": 4, "target_modules": "all-linear"},
            "second": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            "third_one": {"r": 3, "target_modules": ["embed_tokens", "o_proj"]},
        },
    ),
    "bert_two_heads": Case(
        "bert",
        {
            "default": {**SEQ_CLS, "target_modules": ["query"]},
            "other": {"task_type": "SEQ_CLS", "r": 2, "target_modules": ["value"], "bias": "all"},
        },
    ),
}


def _folder(directory: Path, adapter_name: str) -> Path:
    return directory if adapter_name == "default" else directory / adapter_name


def _saved_by_peft(case: Case, oracle: Any, directory: Path) -> Any:
    """A peft model with every parameter moved off its initial value, saved by peft.

    Moving all of them (heads, biases, embeddings too) means that a tensor a loader fails to
    take from the file keeps the fresh model's value and shows up as a difference.
    """
    model = oracle.model(case.model, case.adapters)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(directory, save_embedding_layers=case.peft_save_embedding_layers)
    return model


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_adapter_state_dict_equals_peft_file(case: Case, oracle: Any, tmp_path: Path) -> None:
    model = _saved_by_peft(case, oracle, tmp_path)
    state = model.state_dict()
    for adapter_name, config in model.peft_config.items():
        expected = oracle.read_files(tmp_path, adapter_name)
        prefixes = embedding_prefixes_to_save(
            "auto",
            target_modules=config.target_modules,
            embedding_paths=oracle.embedding_paths(model),
            model_state_keys=state.keys(),
            is_vocab_resized=case.is_vocab_resized,
        )
        ours = adapter_state_dict(
            state, adapter_name, bias=config.bias, embedding_prefixes=prefixes
        )
        assert sorted(ours) == sorted(expected), adapter_name
        for key, tensor in expected.items():
            assert ours[key].dtype == tensor.dtype
            assert torch.equal(ours[key], tensor), key


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_peft_files_load_like_peft(case: Case, oracle: Any, tmp_path: Path) -> None:
    """peft's files, mapped by lorakit under a new name, give exactly peft's loaded model."""
    peft = pytest.importorskip("peft")
    _saved_by_peft(case, oracle, tmp_path)
    for saved_name, options in case.adapters.items():
        subfolder = None if saved_name == "default" else saved_name
        tensors, _ = load_adapter_files(tmp_path, subfolder=subfolder)
        new_name = f"{saved_name}_loaded"
        ours = oracle.model(case.model, {new_name: options}, adapter_seed=7)
        mapped = model_keys_for(tensors, new_name, ours.state_dict())
        result = ours.load_state_dict(mapped, strict=False)
        assert result.unexpected_keys == []

        base = oracle.factories[case.model](0)
        torch.manual_seed(8)  # another init than ours: a key we failed to load would differ
        reference = peft.PeftModel.from_pretrained(
            base, _folder(tmp_path, saved_name), adapter_name=new_name
        )
        expected_state, our_state = reference.state_dict(), ours.state_dict()
        assert sorted(our_state) == sorted(expected_state)
        for key, tensor in expected_state.items():
            if not torch.equal(our_state[key], tensor):
                _assert_loaded_across_wrapper(key, our_state[key], tensors)


def _assert_loaded_across_wrapper(
    key: str, ours: torch.Tensor, tensors: dict[str, torch.Tensor]
) -> None:
    """The one place lorakit loads more than peft: a base bias saved under a LoRA wrapper.

    With bias="all"/"lora_only", peft saves `P.base_layer.bias` for modules wrapped by *other*
    adapters; loaded alone, P is not wrapped and peft drops the trained bias. lorakit puts it
    into `P.bias`, the same base parameter.
    """
    head, _, leaf = key.rpartition(".")
    wrapped_key = f"{head}.base_layer.{leaf}"
    assert leaf == "bias" and wrapped_key in tensors, key
    assert torch.equal(ours, tensors[wrapped_key]), key


def test_file_without_model_prefix_maps_the_same(oracle: Any, tmp_path: Path) -> None:
    case = CASES["bert_seq_cls_lora_only"]
    model = _saved_by_peft(case, oracle, tmp_path)
    tensors, _ = load_adapter_files(tmp_path)
    stripped = {key.removeprefix(MODEL_PREFIX): value for key, value in tensors.items()}
    state = model.state_dict()
    assert model_keys_for(stripped, "default", state).keys() == (
        model_keys_for(tensors, "default", state).keys()
    )


def _llama_adapter(oracle: Any, tmp_path: Path) -> tuple[dict[str, torch.Tensor], Any]:
    model = oracle.model("llama", {"default": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
    model.save_pretrained(tmp_path)
    tensors, _ = load_adapter_files(tmp_path)
    return tensors, model


def test_shape_mismatch_names_first_tensors_and_counts_rest(oracle: Any, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    tensors, _ = _llama_adapter(oracle, tmp_path)
    wider_base = oracle.factories["llama"](0, hidden=48)
    wider = peft.get_peft_model(
        wider_base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    with pytest.raises(AdapterMismatchError) as error:
        model_keys_for(tensors, "default", wider.state_dict(), source=str(tmp_path))
    message = str(error.value)
    # 2 layers x (q_proj, v_proj) x (lora_A, lora_B) = 8 mismatches: 5 shown, 3 counted.
    assert "8 shape mismatch(es)" in message
    assert "model.layers.0.self_attn.q_proj.lora_A: adapter [4, 32] vs base expects [4, 48]" in (
        message
    )
    assert message.count("vs base expects") == 5
    assert "and 3 more" in message
    assert str(tmp_path) in message
    assert len(error.value.mismatch.shapes) == 8
    assert error.value.mismatch.missing == []
    assert isinstance(error.value, ValueError)


def test_file_keys_matching_no_module_are_refused(oracle: Any, tmp_path: Path) -> None:
    tensors, model = _llama_adapter(oracle, tmp_path)
    stray = f"{MODEL_PREFIX}model.layers.0.self_attn.k_proj.lora_A.weight"
    tensors[stray] = torch.zeros(4, 32)
    with pytest.raises(
        AdapterMismatchError,
        match=r"1 tensor\(s\) in the file match no module of the model: "
        r"model\.layers\.0\.self_attn\.k_proj\.lora_A",
    ):
        model_keys_for(tensors, "default", model.state_dict())


def test_adapted_modules_without_weights_are_refused(oracle: Any, tmp_path: Path) -> None:
    tensors, model = _llama_adapter(oracle, tmp_path)
    del tensors[f"{MODEL_PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight"]
    with pytest.raises(
        AdapterMismatchError,
        match=r"1 adapted tensor\(s\) have no weights in the file: "
        r"model\.layers\.1\.self_attn\.v_proj\.lora_B",
    ) as error:
        model_keys_for(tensors, "default", model.state_dict())
    assert error.value.mismatch.unexpected == []


def test_a_whole_model_state_dict_is_not_an_adapter_file(oracle: Any, tmp_path: Path) -> None:
    """Keys still holding an adapter name (a raw state_dict) match nothing and are refused."""
    _, model = _llama_adapter(oracle, tmp_path)
    raw = {key: value for key, value in model.state_dict().items() if "lora_" in key}
    with pytest.raises(AdapterMismatchError, match=r"lora_A\.default") as error:
        model_keys_for(raw, "default", model.state_dict())
    assert len(error.value.mismatch.missing) == 8


def test_unknown_bias_mode_is_refused(oracle: Any, tmp_path: Path) -> None:
    _, model = _llama_adapter(oracle, tmp_path)
    with pytest.raises(ValueError, match=r"bias='some'.*'none', 'all', 'lora_only'"):
        adapter_state_dict(model.state_dict(), "default", bias="some")  # type: ignore[arg-type]
