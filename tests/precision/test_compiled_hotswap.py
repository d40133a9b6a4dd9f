"""`prepare_model_for_compiled_hotswap`: adapters of other ranks hotswapped under one graph.

References: a fresh `PeftModel.from_pretrained` of each file on the same base (eager), and
peft's own model for the peft-saved file.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import peft
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import lorakit
import lorakit.utils
from lorakit import PeftModel, hotswap_adapter, prepare_model_for_compiled_hotswap
from lorakit.errors import HotswapError
from precision.precision_support import logits
from tiny_models import tiny_llama, token_batch

TARGETS = ["q_proj", "v_proj", "down_proj"]
BACKEND = "aot_eager"  # as in test_compile.py: dynamo + AOT autograd without inductor's build
COMPILE_TOL = 1e-5  # compiled vs eager fp32, as in test_compile.py
# Zero padding adds exact zeros to each sum; only the matmul's blocking may reorder it.
PADDING_TOL = 1e-6
# A different scale is folded into B (one fp32 rounding of B), as in test_hotswap.py.
FOLDED_SCALE_TOL = 1e-6


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


def _save_lorakit(folder: Path, seed: int, **options: object) -> Path:
    settings: dict[str, object] = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}
    settings.update(options)
    config = lorakit.LoraConfig(init_lora_weights=False, **settings)  # type: ignore[arg-type]
    base = tiny_llama()
    torch.manual_seed(seed)
    lorakit.get_peft_model(base, config).save_pretrained(folder)
    return folder


def _save_peft(folder: Path, seed: int, **options: object) -> torch.Tensor:
    """Save a peft adapter; return peft's own logits for it."""
    settings: dict[str, object] = {"r": 8, "lora_alpha": 16, "target_modules": TARGETS}
    settings.update(options)
    base = tiny_llama()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **settings))  # type: ignore[arg-type]
    model.save_pretrained(folder)
    return logits(model.eval())


def _fresh(folder: Path) -> PeftModel:
    return PeftModel.from_pretrained(tiny_llama(), folder).eval()


def test_public_import_paths() -> None:
    assert lorakit.prepare_model_for_compiled_hotswap is prepare_model_for_compiled_hotswap
    assert lorakit.utils.prepare_model_for_compiled_hotswap is prepare_model_for_compiled_hotswap


def test_hotswapping_ranks_4_and_8_under_one_graph(tmp_path: Path) -> None:
    first = _save_lorakit(tmp_path / "first", seed=1)  # rank 4, the adapter compiled with
    peft_rank8 = tmp_path / "peft8"
    peft_logits = _save_peft(peft_rank8, seed=2)  # rank 8, alpha 16, saved by peft
    lorakit_rank8 = _save_lorakit(tmp_path / "r8", seed=3, r=8, lora_alpha=4, use_rslora=True)
    rank4 = _save_lorakit(tmp_path / "r4", seed=4, lora_alpha=32)
    folders = (peft_rank8, rank4, lorakit_rank8, first)
    expected = {folder: logits(_fresh(folder)) for folder in folders}
    assert (expected[peft_rank8] - peft_logits).abs().max() <= 1e-5  # lorakit reads peft's file
    model = _fresh(first)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    compiled = torch.compile(model, backend=BACKEND)
    x = token_batch()
    with torch.no_grad():
        assert (compiled(input_ids=x).logits - expected[first]).abs().max() <= COMPILE_TOL
        for folder in folders:
            hotswap_adapter(compiled, folder, "default")
            output = compiled(input_ids=x).logits
            assert (output - expected[folder]).abs().max() <= COMPILE_TOL + FOLDED_SCALE_TOL
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["frames"]["total"] == 1
    for folder in folders[1:]:
        assert (expected[folder] - expected[peft_rank8]).abs().max() > 100 * COMPILE_TOL


def test_without_preparing_a_higher_rank_is_refused_with_the_fix(tmp_path: Path) -> None:
    first = _save_lorakit(tmp_path / "first", seed=1)
    model = _fresh(first)
    with pytest.raises(HotswapError, match=r"prepare_model_for_compiled_hotswap\(model, target"):
        hotswap_adapter(model, _save_lorakit(tmp_path / "r8", seed=2, r=8), "default")


def test_padding_keeps_outputs_and_saves_a_file_peft_and_lorakit_read(tmp_path: Path) -> None:
    first = _save_lorakit(
        tmp_path / "first",
        seed=1,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3.0},
        use_rslora=True,
    )
    model = _fresh(first)
    before = logits(model)
    scalings = {k: dict(m.scaling) for k, m in model._lora_layers()}
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert (logits(model) - before).abs().max() <= PADDING_TOL
    assert {k: dict(m.scaling) for k, m in model._lora_layers()} == scalings
    for _, layer in model._lora_layers():
        A, B = layer._adapter_pair("default")
        assert A.shape[0] == 8 and B.shape[1] == 8 and layer.r["default"] == 8
    assert model.peft_config["default"].r == 8 and not model.peft_config["default"].rank_pattern
    model.save_pretrained(tmp_path / "padded")
    assert (logits(_fresh(tmp_path / "padded")) - before).abs().max() <= PADDING_TOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "padded").eval()
    assert (logits(by_peft) - before).abs().max() <= 1e-5


def test_configs_passed_get_the_target_rank_as_in_peft() -> None:
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=TARGETS))
    config = lorakit.LoraConfig(r=2, rank_pattern={"v_proj": 4}, target_modules=TARGETS)
    configs = {"next": lorakit.LoraConfig(r=6, target_modules=TARGETS)}
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=config)
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=configs)
    assert (config.r, config.rank_pattern, configs["next"].r) == (8, {"v_proj": 8}, 8)


def test_refusals_leave_the_model_untouched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _fresh(_save_lorakit(tmp_path / "first", seed=1, rank_pattern={"v_proj": 16}))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(HotswapError, match=r"target_rank=8 is lower .*v_proj \('default': 16\)"):
        prepare_model_for_compiled_hotswap(model, target_rank=8)
    with pytest.raises(HotswapError, match=r"target_rank must be a positive integer, got 0"):
        prepare_model_for_compiled_hotswap(model, target_rank=0)
    with pytest.raises(HotswapError, match=r"check_compiled='never' is not one of"):
        prepare_model_for_compiled_hotswap(model, target_rank=16, check_compiled="never")  # type: ignore[arg-type]
    compiled = torch.compile(model, backend=BACKEND)
    with pytest.raises(HotswapError, match=r"got a compiled model.*before torch.compile"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=16)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=16, check_compiled="warn")
    assert "got a compiled model" in caplog.text
    assert all(layer.r["default"] == 16 for _, layer in model._lora_layers())
    with pytest.raises(TypeError, match=r"needs a lorakit PeftModel, got LlamaForCausalLM"):
        prepare_model_for_compiled_hotswap(tiny_llama(), target_rank=8)
