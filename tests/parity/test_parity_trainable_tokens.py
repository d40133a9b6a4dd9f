"""`trainable_token_indices` (and `ensure_weight_tying`) against peft 0.21.2 on the same weights.

A tiny Llama with tied embeddings is the main model: its logits are small, so fp32 outputs and
gradients agree with peft's to 1e-6. GPT-2 (Conv1D layers, tied `lm_head`) is judged against
peft's own float64 output (`assert_forward_matches_peft`), its logits being 80 times larger.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import ConfigError, LorakitError, MergeError
from lorakit.layers.trainable_tokens import TrainableTokensWrapper
from parity.parity_support import (
    assert_forward_matches_peft,
    tiny_gpt2,
    token_batch,
    trainable_names,
)
from tiny_models import tiny_llama

# The same fp32 sums of values below 1: agreement to a few ulps.
TOL = 1e-6
IDS = [3, 5, 7]
TIED_DELTA = "base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"


def _options(**overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "r": 2,
        "target_modules": ["q_proj", "v_proj"],
        "trainable_token_indices": IDS,
        "init_lora_weights": False,  # random A and B
    }
    return {**options, **overrides}


def _peft_model(base: nn.Module, **options: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options))


def _pair(base: nn.Module | None = None, **overrides: Any) -> tuple[nn.Module, PeftModel]:
    """peft's model with moved token rows, and lorakit's holding the same tensors."""
    base = tiny_llama(tie_word_embeddings=True) if base is None else base
    options = _options(**overrides)
    torch.manual_seed(0)
    theirs = _peft_model(base, **options)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "trainable_tokens_delta" in name:  # new rows unlike the base's
                parameter.add_(0.05 * torch.randn_like(parameter))
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**options))
    state = theirs.state_dict()
    # peft's tied lm_head lists the embedding's table a second time; lorakit does not
    assert set(state) - set(ours.state_dict()) <= {TIED_DELTA}
    ours.load_state_dict({key: state[key] for key in ours.state_dict()})
    return theirs, ours


def _backward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    output = model(ids, labels=ids)
    output.loss.backward()
    logits: torch.Tensor = output.logits
    return logits


def test_tied_llama_outputs_gradients_and_counts_equal_peft() -> None:
    theirs, ours = _pair()
    embedding = ours.get_base_model().model.embed_tokens
    head = ours.get_base_model().lm_head
    assert isinstance(embedding, TrainableTokensWrapper) and isinstance(
        head, TrainableTokensWrapper
    )
    assert head.original_module.weight is embedding.original_module.weight  # still tied
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert trainable_names(ours) == trainable_names(theirs)
    ids = token_batch(length=12)
    ids[0, :3] = torch.tensor(IDS)  # the new tokens are in the batch
    expected, got = _backward(theirs, ids), _backward(ours, ids)
    assert torch.allclose(got, expected, atol=TOL, rtol=0)
    gradients = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, parameter in ours.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None
            assert torch.allclose(parameter.grad, gradients[name], atol=TOL, rtol=0), name
    delta = embedding.token_adapter.trainable_tokens_delta["default"]
    assert delta.grad is not None and delta.grad.shape == (3, 32)
    assert embedding.original_module.weight.grad is None  # no (V, d) gradient anywhere
    with ours.disable_adapter():
        bare = ours(ids).logits
    assert not torch.allclose(bare[..., IDS], got[..., IDS], atol=1e-3)  # the head's columns


def test_only_the_chosen_rows_train() -> None:
    model = get_peft_model(tiny_llama(tie_word_embeddings=True), LoraConfig(**_options()))
    weight = model.get_base_model().model.embed_tokens.original_module.weight
    before = weight.detach().clone()
    table = model.get_base_model().model.embed_tokens.token_adapter.trainable_tokens_delta
    start = table["default"].detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch(batch=4, length=12)
    ids[:, 0] = torch.tensor([*IDS, IDS[0]])
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(weight, before)
    assert (table["default"] - start).abs().amin(dim=1).gt(0).all()  # each new row moved


def test_untied_llama_wraps_only_the_embedding_like_peft() -> None:
    theirs, ours = _pair(tiny_llama())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert not isinstance(ours.get_base_model().lm_head, TrainableTokensWrapper)
    ids = token_batch()
    ids[0, 0] = IDS[1]
    assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=TOL, rtol=0)


def test_gpt2_conv1d_and_tied_head_match_peft() -> None:
    theirs, ours = _pair(tiny_gpt2(), target_modules=["c_attn"])
    ids = token_batch()
    ids[1, 2] = IDS[2]
    ours.eval()
    assert_forward_matches_peft(ours(ids).logits, theirs, ids)


def test_files_load_both_ways(tmp_path: Path) -> None:
    theirs, ours = _pair()
    ours.save_pretrained(tmp_path / "lorakit")
    theirs.save_pretrained(tmp_path / "peft")
    shapes = [
        {k: v.shape for k, v in load_file(tmp_path / f / "adapter_model.safetensors").items()}
        for f in ("lorakit", "peft")
    ]
    assert shapes[0] == shapes[1]
    assert shapes[0][
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    ] == (
        3,
        32,
    )
    ids = token_batch()
    ids[0, 1] = IDS[0]
    expected = ours(ids).logits
    base = tiny_llama(tie_word_embeddings=True)
    loaded = [
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft"),
        peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lorakit"),
    ]
    assert loaded[0].peft_config["default"].trainable_token_indices == IDS
    for model in loaded:
        assert torch.allclose(model(ids).logits, expected, atol=TOL, rtol=0)


def test_merge_and_unload_writes_the_rows_and_keeps_the_tie() -> None:
    theirs, ours = _pair()
    ids = token_batch()
    ids[1, 0] = IDS[2]
    expected = ours(ids).logits
    table = ours.get_base_model().model.embed_tokens.token_adapter.trainable_tokens_delta
    rows = table["default"].detach().clone()
    merged = ours.merge_and_unload()
    theirs_merged = theirs.merge_and_unload()
    assert type(merged.model.embed_tokens) is nn.Embedding
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert torch.equal(merged.model.embed_tokens.weight[IDS], rows)
    assert torch.allclose(merged(ids).logits, expected, atol=TOL, rtol=0)
    assert torch.equal(merged.model.embed_tokens.weight, theirs_merged.model.embed_tokens.weight)


def test_merge_unmerge_restores_the_weight_bit_for_bit() -> None:
    _, ours = _pair()
    weight = ours.get_base_model().model.embed_tokens.original_module.weight
    before = weight.detach().clone()
    ids = token_batch()
    ids[0, 0] = IDS[0]
    expected = ours(ids).logits
    ours.merge_adapter()
    assert torch.equal(
        weight[IDS],
        ours.get_base_model()
        .model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
        .detach(),
    )
    assert torch.allclose(ours(ids).logits, expected, atol=TOL, rtol=0)
    with ours.disable_adapter():
        assert torch.equal(weight, before)
    assert not torch.equal(weight, before)  # merged back after the block
    ours.unmerge_adapter()
    assert torch.equal(weight, before)
    assert torch.allclose(ours(ids).logits, expected, atol=TOL, rtol=0)


def test_several_adapters_switch_disable_and_mix_like_peft() -> None:
    base = tiny_llama(tie_word_embeddings=True)
    theirs, ours = _pair(base)
    other = _options(trainable_token_indices=[9, 11], target_modules=["k_proj"])
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_adapter("other", peft.LoraConfig(**other))
    ours.add_adapter("other", LoraConfig(**other))
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "trainable_tokens_delta.other" in name:
                parameter.add_(0.05)
    state = theirs.state_dict()
    ours.load_state_dict({key: state[key] for key in ours.state_dict()})
    ids = token_batch()
    ids[:, 0] = torch.tensor([IDS[0], 9])
    for name in ("other", "default"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=TOL, rtol=0)
    rows = ["other", "default"]
    theirs.eval()
    ours.eval()
    mixed = ours(ids, adapter_names=rows).logits
    assert torch.allclose(mixed, theirs(ids, adapter_names=rows).logits, atol=TOL, rtol=0)
    with ours.disable_adapter():
        assert torch.equal(ours(ids).logits, base(ids).logits)
    ours.delete_adapter("other")
    assert ours.get_base_model().lm_head.adapter_names == ["default"]


def test_tied_layers_with_other_ids_train_apart_or_raise_with_ensure_weight_tying() -> None:
    spec = {"embed_tokens": IDS, "lm_head": [4, 6]}
    theirs, ours = _pair(trainable_token_indices=spec)
    head = ours.get_base_model().lm_head
    assert not head.is_tied and head.adapter_names == ["default"]
    ids = token_batch()
    assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match=r"Cannot ensure weight tying"):
        _peft_model(
            tiny_llama(tie_word_embeddings=True),
            **_options(trainable_token_indices=spec, ensure_weight_tying=True),
        )
    base = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(ConfigError, match=r"ensure_weight_tying=True, but trainable_token_indices"):
        get_peft_model(
            base, LoraConfig(**_options(trainable_token_indices=spec, ensure_weight_tying=True))
        )
    assert not isinstance(base.model.embed_tokens, TrainableTokensWrapper)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"modules_to_save": ["embed_tokens"]}, r"modules_to_save"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, r"also adapts with LoRA"),
        ({"trainable_token_indices": [3, 128]}, r"in \[0, 128\); got \[128\]"),
        ({"trainable_token_indices": {"no_such": [1]}}, r"'no_such', which matches no module"),
        (
            {
                "target_modules": ["q_proj", "embed_tokens"],
                "trainable_token_indices": None,
                "ensure_weight_tying": True,
            },
            r"ensure_weight_tying=True with an embedding layer",
        ),
    ],
    ids=["modules-to-save", "lora-target", "id-past-vocab", "no-module", "ensure-lora-embedding"],
)
def test_bad_combinations_raise_and_leave_the_model(
    overrides: dict[str, Any], message: str
) -> None:
    base = tiny_llama(tie_word_embeddings=True)
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ConfigError, match=message):
        get_peft_model(base, LoraConfig(**_options(**overrides)))
    assert not any(isinstance(m, TrainableTokensWrapper) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_ensure_weight_tying_on_an_untied_model_only_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        theirs, ours = _pair(tiny_llama(), ensure_weight_tying=True)
    assert "ensure_weight_tying=True, but the model has no tied weights" in caplog.text
    assert trainable_names(ours) == trainable_names(theirs)


def test_weighted_adapters_with_token_rows_are_refused() -> None:
    _, ours = _pair()
    with pytest.raises(ConfigError, match=r"trainable_token_indices"):
        ours.add_weighted_adapter(["default"], [1.0], "blend", combination_type="linear")


def test_layer_status_lists_the_token_layers_like_peft() -> None:
    theirs, ours = _pair()

    def summary(model: Any) -> list[tuple[str, str, list[str]]]:
        return [(s.name, s.module_type, s.active_adapters) for s in model.get_layer_status()]

    assert summary(ours) == summary(theirs)
    assert ("model.lm_head.token_adapter", "TrainableTokensLayer", ["default"]) in summary(ours)


def _vocab_sized_copies(model: nn.Module, weight: torch.Tensor, ids: torch.Tensor) -> int:
    """How many (V, d) or (d, V) tensors not stored in the weight autograd keeps for backward."""
    saved: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(ids, labels=ids)
    storage = weight.untyped_storage().data_ptr()
    return sum(
        sorted(t.shape) == sorted(weight.shape) and t.untyped_storage().data_ptr() != storage
        for t in saved
    )


def test_no_copy_of_the_embedding_is_kept_for_backward() -> None:
    theirs, ours = _pair()
    ids = token_batch()
    weight = ours.get_base_model().model.embed_tokens.original_module.weight
    assert _vocab_sized_copies(ours, weight, ids) == 0
    # peft builds W with the rows replaced each forward; its tied head keeps that copy
    peft_weight = theirs.get_base_model().model.embed_tokens.token_adapter.base_layer.weight
    assert _vocab_sized_copies(theirs, peft_weight, ids) >= 1


def test_a_merge_that_cannot_be_done_raises_before_any_weight_changes() -> None:
    _, ours = _pair()
    ours.add_adapter("overlap", LoraConfig(**_options(trainable_token_indices=[7, 8])))
    before = {name: tensor.clone() for name, tensor in ours.get_base_model().state_dict().items()}
    with pytest.raises(LorakitError, match=r"same token ids \[7\]"):
        ours.merge_adapter(["default", "overlap"])
    table = ours.get_base_model().model.embed_tokens.token_adapter.trainable_tokens_delta
    with torch.no_grad():
        table["default"][0, 0] = float("nan")
    with pytest.raises(MergeError, match=r"adapter 'default' hold NaN/inf"):
        ours.merge_adapter(["default"], safe_merge=True)
    after = ours.get_base_model().state_dict()
    base_keys = [key for key in before if "trainable_tokens_delta" not in key]
    assert all(torch.equal(before[key], after[key]) for key in base_keys)
