"""The options of EVA and CorDA that the peft comparisons in
tests/parity/test_parity_eva_corda.py leave out: each one changes what it says (or is checked
against peft where peft implements it the same way)."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import torch.distributed as dist
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda
from torch import nn

from lorakit import (
    CordaConfig,
    EvaConfig,
    LoraConfig,
    get_eva_state_dict,
    get_peft_model,
    initialize_lora_eva_weights,
    preprocess_corda,
)
from lorakit.init_data.eva import _rho
from tiny_models import tiny_llama

# EVA's float64 incremental SVDs summed in another order (see test_parity_eva_corda.py).
EVA_TOL = 1e-5
TARGETS = ["q_proj", "down_proj"]


def _batches(labels_value: int = -100) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 12), generator=generator)
        labels = torch.where(torch.arange(12) < 4, labels_value, ids)
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def _eva(model: nn.Module, batches: Any, eva: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    config = LoraConfig(
        r=2, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(**(eva or {}))
    )
    kwargs.setdefault("show_progress_bar", False)
    return get_eva_state_dict(model, batches, peft_config=config, **kwargs)


def _assert_same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert list(left) == list(right)
    for name, value in right.items():
        torch.testing.assert_close(left[name], value, atol=EVA_TOL, rtol=0, msg=name)


def test_label_mask_value_picks_the_ignored_label() -> None:
    # 200 is outside the vocabulary (no token collides with it), so the model runs on ids only
    run: dict[str, Any] = {"forward_fn": lambda model, batch: model(batch["input_ids"])}
    default = _eva(tiny_llama(), _batches(), **run)
    other_value = _eva(tiny_llama(), _batches(200), {"label_mask_value": 200}, **run)
    _assert_same(other_value, default)
    not_masked = _eva(tiny_llama(), _batches(200), **run)  # 200 is then a label like any other
    assert not all(
        value.shape == default[name].shape and torch.allclose(value, default[name], atol=1e-3)
        for name, value in not_masked.items()
    )


def test_tensor_batches_with_a_forward_fn_and_every_row_equal_peft() -> None:
    """No input functions: every row of every batch, as peft takes them."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (2, 10), generator=generator) for _ in range(3)]
    options: dict[str, Any] = {
        "forward_fn": lambda model, batch: model(batch),
        "prepare_model_inputs_fn": None,
        "prepare_layer_inputs_fn": None,
    }
    ours = _eva(tiny_llama(), batches, **options)
    config = peft.LoraConfig(
        r=2, target_modules=TARGETS, init_lora_weights="eva", eva_config=peft.EvaConfig()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_eva_state_dict(
            tiny_llama(), batches, peft_config=config, show_progress_bar=False, **options
        )
    _assert_same(ours, {name: value.float() for name, value in theirs.items()})


def test_progress_bar_counts_converged_layers(capsys: pytest.CaptureFixture[str]) -> None:
    _eva(tiny_llama(), _batches(), show_progress_bar=True)
    assert "4/4 layers have converged" in capsys.readouterr().err


def test_gathered_distributed_inputs_of_one_process_are_its_own(tmp_path: Path) -> None:
    expected = _eva(tiny_llama(), _batches())
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        gathered = _eva(tiny_llama(), _batches(), gather_distributed_inputs=True)
    finally:
        dist.destroy_process_group()
    _assert_same(gathered, expected)


def test_rho_above_the_threshold_is_capped_by_the_largest_dimension() -> None:
    model = tiny_llama()  # largest parameter dimension: the 128-token embedding
    assert _rho(model, 999.0, 4) == 999.0
    assert _rho(model, 5000.0, 4) == 128 // 4


def test_eva_on_meta_adapters_equals_eva_on_allocated_ones() -> None:
    config = LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="eva")
    allocated = get_peft_model(tiny_llama(), config)
    meta = get_peft_model(tiny_llama(), copy.deepcopy(config), low_cpu_mem_usage=True)
    assert any(parameter.is_meta for parameter in meta.parameters())
    for model in (allocated, meta):
        initialize_lora_eva_weights(model, _batches(), show_progress_bar=False)
    assert not any(parameter.is_meta for parameter in meta.parameters())
    for (name, value), (other, expected) in zip(
        meta.state_dict().items(), allocated.state_dict().items(), strict=True
    ):
        assert name == other
        assert torch.equal(value, expected), name


def _corda_config(**corda: Any) -> LoraConfig:
    return LoraConfig(
        r=2, target_modules=TARGETS, init_lora_weights="corda", corda_config=CordaConfig(**corda)
    )


def _samples() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return [torch.randint(0, 128, (1, 12), generator=generator) for _ in range(3)]


def _run(model: nn.Module) -> Callable[[], None]:
    def run() -> None:
        for sample in _samples():
            model(sample)

    return run


def test_corda_hooked_model_gives_its_covariances_to_the_model() -> None:
    direct = tiny_llama()
    preprocess_corda(direct, _corda_config(), _run(direct))
    model, hooked = tiny_llama(), tiny_llama()
    preprocess_corda(model, _corda_config(), _run(hooked), hooked_model=hooked)
    assert not any(hasattr(module, "eigens") for module in hooked.modules())
    expected = {name: m.eigens for name, m in direct.named_modules() if hasattr(m, "eigens")}
    found = {name: m.eigens for name, m in model.named_modules() if hasattr(m, "eigens")}
    assert list(found) == list(expected) and len(found) == 4
    for name, eigens in expected.items():
        for field in ("S_WC", "U_WC", "V_WC"):
            assert torch.equal(getattr(found[name], field), getattr(eigens, field)), name


def test_corda_pruned_fields_and_float16_covariance_as_peft() -> None:
    """By default no covariance is left on the layers; use_float16_for_covariance keeps the
    inputs' dtype (bfloat16 here), as peft does, instead of float32."""
    pruned = tiny_llama()
    preprocess_corda(pruned, _corda_config(), _run(pruned))
    assert not any(hasattr(module, "covariance_matrix") for module in pruned.modules())
    for keep_dtype, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        ours, theirs = tiny_llama().bfloat16(), tiny_llama().bfloat16()
        corda = {"prune_temporary_fields": False, "use_float16_for_covariance": keep_dtype}
        preprocess_corda(ours, _corda_config(**corda), _run(ours))
        config = peft.LoraConfig(
            r=2,
            target_modules=TARGETS,
            init_lora_weights="corda",
            corda_config=PeftCordaConfig(**corda),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_preprocess_corda(theirs, config, run_model=_run(theirs))
        pairs = [
            (mine, other)
            for mine, other in zip(ours.modules(), theirs.modules(), strict=True)
            if hasattr(other, "covariance_matrix")
        ]
        assert len(pairs) == 4
        for mine, other in pairs:
            assert mine.covariance_matrix.dtype == other.covariance_matrix.dtype == dtype
            assert torch.equal(mine.covariance_matrix, other.covariance_matrix)
            assert torch.equal(mine.eigens.U_WC, other.eigens.U_WC)


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_lorakit_train_refuses_the_data_inits_from_a_config_file(
    init: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lorakit train` would otherwise train a plain LoRA under an EVA / CorDA config."""
    from lorakit.cli import build_parser
    from lorakit.cli.train import run_train

    monkeypatch.chdir(tmp_path)
    run = {"model": "m", "train_data": "x", "lora": {"init_lora_weights": init}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert run_train(build_parser().parse_args(["train", "--config", "run.json"])) == 2
    assert f"init_lora_weights='{init}' needs a pass over data" in capsys.readouterr().err
