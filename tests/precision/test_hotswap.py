"""`hotswap_adapter`: in-place replacement of an adapter's weights, checked before writing.

The reference is a fresh `PeftModel.from_pretrained` of the swapped-in file on the same base.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import lorakit
import lorakit.utils.hotswap
from lorakit import PeftModel, hotswap_adapter
from lorakit.errors import AdapterNameError, HotswapError
from precision.precision_support import logits
from tiny_models import tiny_llama, token_batch

TARGETS = ["q_proj", "v_proj", "down_proj"]
BACKEND = "aot_eager"  # as in test_compile.py: dynamo + AOT autograd without inductor's build
# A different scale is folded into B (one fp32 rounding of B, relative 6e-8), so logits of
# size ~1 agree with a fresh load to a few 1e-7; equal scales copy the file bit for bit.
FOLDED_SCALE_TOL = 1e-6
COMPILE_TOL = 1e-5  # compiled vs eager fp32, as in test_compile.py


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


def _save(folder: Path, seed: int, **options: object) -> Path:
    """An adapter with non-trivial A and B (seeded) saved in `folder`."""
    settings: dict[str, object] = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}
    settings.update(options)
    config = lorakit.LoraConfig(init_lora_weights=False, **settings)  # type: ignore[arg-type]
    base = tiny_llama()  # seeds its own construction
    torch.manual_seed(seed)
    lorakit.get_peft_model(base, config).save_pretrained(folder)
    return folder


def _fresh(folder: Path) -> PeftModel:
    return PeftModel.from_pretrained(tiny_llama(), folder).eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)


def test_public_import_paths() -> None:
    assert lorakit.hotswap_adapter is lorakit.utils.hotswap.hotswap_adapter


def test_hotswap_gives_the_fresh_load_bit_for_bit(tmp_path: Path) -> None:
    first, second = _save(tmp_path / "a", seed=1), _save(tmp_path / "b", seed=2)
    model = _fresh(first)
    parameters_before = dict(model.named_parameters())
    before = logits(model)
    hotswap_adapter(model, second, "default")
    expected = _fresh(second)
    assert torch.equal(logits(model), logits(expected))
    assert (logits(model) - before).abs().max() > 1e-3  # the swap changed the output
    # The same parameter objects now hold the file's values exactly.
    assert all(parameters_before[k] is p for k, p in model.named_parameters())
    expected_state = expected.state_dict()
    assert all(torch.equal(t, expected_state[k]) for k, t in model.state_dict().items())


def test_hotswap_into_an_inactive_adapter_leaves_the_active_one(tmp_path: Path) -> None:
    first, second = _save(tmp_path / "a", seed=1), _save(tmp_path / "b", seed=2)
    model = _fresh(first)
    model.load_adapter(first, "other")
    before = logits(model)
    hotswap_adapter(model, second, "other")
    assert torch.equal(logits(model), before)  # "default" is active and untouched
    model.set_adapter("other")
    assert torch.equal(logits(model), logits(_fresh(second)))


@pytest.mark.parametrize(
    "options",
    [
        {"lora_alpha": 32},
        {"lora_alpha": 5, "use_rslora": True},
        {"alpha_pattern": {"v_proj": 2.0}},
    ],
    ids=["alpha", "rslora", "alpha_pattern"],
)
def test_another_scale_is_folded_into_b(tmp_path: Path, options: dict[str, object]) -> None:
    first, second = _save(tmp_path / "a", seed=1), _save(tmp_path / "b", seed=2, **options)
    model = _fresh(first)
    layers = [m for m in model.modules() if isinstance(m, lorakit.layers.LoraLayer)]
    scalings_before = [dict(layer.scaling) for layer in layers]
    hotswap_adapter(model, second, "default")
    expected = _fresh(second)
    assert (logits(model) - logits(expected)).abs().max() <= FOLDED_SCALE_TOL
    # Nothing a compiled graph reads as a Python number changed.
    assert [dict(layer.scaling) for layer in layers] == scalings_before
    # Per layer: the stored B times the old scale is the file's B times the new scale.
    fresh_layers = dict(expected.named_modules())
    for name, layer in model.named_modules():
        if isinstance(layer, lorakit.layers.LoraLayer):
            fresh = fresh_layers[name]
            assert isinstance(fresh, lorakit.layers.LoraLayer)
            (_, B), (_, B_file) = layer._adapter_pair("default"), fresh._adapter_pair("default")
            stored = B.double() * layer.scaling["default"]
            wanted = B_file.double() * fresh.scaling["default"]
            assert torch.allclose(stored, wanted, rtol=1e-7, atol=0)


def test_compiled_model_does_not_recompile_on_hotswap(tmp_path: Path) -> None:
    first = _save(tmp_path / "a", seed=1)
    second = _save(tmp_path / "b", seed=2, lora_alpha=32)  # another scale too
    expected = {path: logits(_fresh(path)) for path in (first, second)}
    model = _fresh(first)
    compiled = torch.compile(model, backend=BACKEND)
    x = token_batch()
    with torch.no_grad():
        compiled(input_ids=x)  # warm-up
        frames_after_warm_up = counters["frames"]["total"]
        for step in range(4):
            path = (second, first)[step % 2]
            hotswap_adapter(compiled, path, "default")  # the compiled module is accepted
            output = compiled(input_ids=x).logits.double()
            assert (output - expected[path]).abs().max() <= COMPILE_TOL
    assert (expected[first] - expected[second]).abs().max() > 100 * COMPILE_TOL
    assert frames_after_warm_up == 1
    assert counters["frames"]["total"] == frames_after_warm_up  # no recompilation


def test_other_ranks_are_refused_and_the_model_is_untouched(tmp_path: Path) -> None:
    first = _save(tmp_path / "a", seed=1)
    second = _save(tmp_path / "b", seed=2, r=8, rank_pattern={"v_proj": 4})
    model = _fresh(first)
    before = _snapshot(model)
    config_before = copy.deepcopy(model.peft_config)
    with pytest.raises(HotswapError, match=r"ranks differ") as caught:
        hotswap_adapter(model, second, "default")
    message = str(caught.value)
    assert "model.layers.0.self_attn.q_proj: 4 vs 8" in message
    assert "v_proj" not in message  # its rank matches: only the mismatches are listed
    assert "load_adapter" in message and "Nothing was changed" in message
    assert "prepare_model_for_compiled_hotswap(model, target_rank=<highest rank>)" in message
    _assert_unchanged(model, before)
    assert model.peft_config == config_before


def test_a_lower_rank_is_padded_with_zeros(tmp_path: Path) -> None:
    first = _save(tmp_path / "a", seed=1, r=8)
    second = _save(tmp_path / "b", seed=2, lora_alpha=32, rank_pattern={"v_proj": 2})
    model = _fresh(first)
    hotswap_adapter(model, second, "default")
    assert (logits(model) - logits(_fresh(second))).abs().max() <= FOLDED_SCALE_TOL
    for name, layer in model.named_modules():
        if isinstance(layer, lorakit.layers.LoraLayer):
            A, B = layer._adapter_pair("default")
            rank = 2 if name.endswith("v_proj") else 4
            assert A.shape[0] == B.shape[1] == layer.r["default"] == 8
            assert not A[rank:].any() and not B[:, rank:].any()  # the padding is zeros


def test_other_target_modules_are_refused_and_listed(tmp_path: Path) -> None:
    first = _save(tmp_path / "a", seed=1)
    second = _save(tmp_path / "b", seed=2, target_modules=["q_proj", "k_proj", "v_proj"])
    model = _fresh(first)
    before = _snapshot(model)
    with pytest.raises(HotswapError, match=r"load_adapter") as caught:
        hotswap_adapter(model, second, "default")
    message = str(caught.value)
    assert "2 modules adapted in the file but not by this adapter" in message
    assert "model.layers.0.self_attn.k_proj" in message
    assert "2 modules adapted by 'default' with no weights in the file" in message
    assert "model.layers.1.mlp.down_proj" in message
    _assert_unchanged(model, before)


def test_base_tensors_in_the_file_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    first, second = _save(tmp_path / "a", seed=1), _save(tmp_path / "b", seed=2)
    weights = second / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.model.norm.weight"] = torch.full((32,), 2.0)  # as bias="all" does
    save_file(tensors, weights, metadata={"format": "pt"})
    model = _fresh(first)
    before = _snapshot(model)
    with pytest.raises(HotswapError, match=r"1 base-model tensors in the file.*norm.weight"):
        hotswap_adapter(model, second, "default")
    _assert_unchanged(model, before)


def test_merged_unknown_and_unloaded_adapters_are_refused(tmp_path: Path) -> None:
    first, second = _save(tmp_path / "a", seed=1), _save(tmp_path / "b", seed=2)
    model = _fresh(first)
    with pytest.raises(AdapterNameError, match=r"'missing' does not exist"):
        hotswap_adapter(model, second, "missing")
    model.merge_adapter()
    before = _snapshot(model)
    with pytest.raises(HotswapError, match=r"unmerge_adapter\(\)"):
        hotswap_adapter(model, second, "default")
    _assert_unchanged(model, before)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    empty = lorakit.get_peft_model(tiny_llama(), config, low_cpu_mem_usage=True)
    with pytest.raises(HotswapError, match=r"meta tensors"):
        hotswap_adapter(empty, second, "default")
    with pytest.raises(TypeError, match=r"needs a lorakit PeftModel .*, got LlamaForCausalLM"):
        hotswap_adapter(tiny_llama(), second, "default")
