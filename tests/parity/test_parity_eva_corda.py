"""EVA and CorDA against peft 0.21.2 on the same tiny models and the same batches.

EVA: the randomized SVD draws from a generator seeded as peft seeds it, and the components
get peft's sign convention, so components, redistributed ranks, config patterns and outputs
after init are compared directly (no sign freedom left). CorDA: the covariance pass and the
decomposition are deterministic, so adapters and residual base weights are compared as they
are. Then the files: each loads as the plain LoRA it is, in lorakit and in peft, and CorDA's
converted save is a plain LoRA for the original base.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import (
    CordaConfig,
    EvaConfig,
    LoraConfig,
    PeftModel,
    get_eva_state_dict,
    get_peft_model,
    initialize_lora_eva_weights,
    preprocess_corda,
)
from lorakit.errors import ConfigError, UnsupportedOptionError
from lorakit.layers import LoraLayer
from parity.parity_support import tiny_gpt2, tiny_llama

# EVA's float64 incremental SVDs in peft and lorakit differ in summation order only; the
# components are unit vectors, so this is a few hundred ulps of float32 at values <= 1.
EVA_TOL = 1e-5
# Same float32 operations in the same order (CorDA): equal but for library-internal fusing.
CORDA_TOL = 1e-6
# Outputs of a whole tiny model after init: rounding through a few layers of values <= 1.
OUTPUT_TOL = 1e-5
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
# GPT-2's Conv1D layers, none sharing an input: peft 0.21.2 whitens a shared SVD's components
# in place once per layer of the group (Llama's q, k, v would get S^-1/2, S^-1, S^-3/2);
# lorakit whitens each once.
GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]


def _batches(
    count: int = 4, batch: int = 2, length: int = 12, labels: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Token batches with some padding (and -100 labels) so the masks matter."""
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 128, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, -3:] = 0
        item = {"input_ids": ids, "attention_mask": mask}
        if labels:
            item["labels"] = torch.where(torch.arange(length) < 4, -100, ids)
        batches.append(item)
    return batches


def _quiet(function: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function()


def _logits(model: nn.Module) -> torch.Tensor:
    """Eval-mode logits (EVA leaves a PeftModel in train mode, as peft does: GPT-2's dropout)."""
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value for key, value in model.state_dict().items() if "lora_" in key}


# --- EVA ----------------------------------------------------------------------------------
EvaRun = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any, PeftModel]


def _eva_run(
    eva_options: dict[str, Any],
    batches: list[dict[str, torch.Tensor]],
    targets: list[str],
    make_base: Callable[[], nn.Module] = tiny_llama,
) -> EvaRun:
    """(peft's components, lorakit's, peft's model and lorakit's, both initialised)."""
    options = {"r": 4, "target_modules": targets, "init_lora_weights": "eva"}
    base = make_base()
    theirs = _quiet(
        lambda: peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(**options, eva_config=peft.EvaConfig(**eva_options)),
        )
    )
    their_components = _quiet(
        lambda: peft.get_eva_state_dict(theirs, batches, show_progress_bar=False)
    )
    _quiet(
        lambda: peft.initialize_lora_eva_weights(
            theirs, eva_state_dict={key: value.clone() for key, value in their_components.items()}
        )
    )
    ours = get_peft_model(base, LoraConfig(**options, eva_config=EvaConfig(**eva_options)))
    our_components = get_eva_state_dict(ours, batches, show_progress_bar=False)
    initialize_lora_eva_weights(ours, eva_state_dict=our_components)
    return their_components, our_components, theirs, ours


@pytest.fixture(scope="module")
def eva_run() -> EvaRun:
    return _eva_run({"tau": 0.7}, _batches(labels=True), LLAMA_TARGETS)


def _assert_eva_matches(run: EvaRun, make_base: Callable[[], nn.Module] = tiny_llama) -> None:
    their_components, our_components, theirs, ours = run
    assert list(our_components) == list(their_components)
    for name, value in their_components.items():
        assert our_components[name].shape == value.shape, name  # the redistributed ranks
        torch.testing.assert_close(our_components[name], value.float(), atol=EVA_TOL, rtol=0)
    their_state, our_state = _lora_state(theirs), _lora_state(ours)
    assert set(our_state) == set(their_state)
    for key, value in their_state.items():
        torch.testing.assert_close(our_state[key], value, atol=EVA_TOL, rtol=0, msg=key)
    their_config, our_config = theirs.peft_config["default"], ours.peft_config["default"]
    for field in ("target_modules", "rank_pattern", "alpha_pattern"):
        assert getattr(our_config, field) == getattr(their_config, field), field
    assert our_config.rank_pattern  # the ranks did move
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=OUTPUT_TOL, rtol=0)
    torch.testing.assert_close(_logits(ours), _logits(make_base()), atol=OUTPUT_TOL, rtol=0)


def test_eva_components_ranks_and_init_equal_peft(eva_run: EvaRun) -> None:
    _assert_eva_matches(eva_run)
    assert {value.shape[0] for value in eva_run[1].values()} != {4}


def test_eva_whitened_without_rank_adjustment_on_conv1d_equals_peft() -> None:
    options = {"tau": 0.7, "whiten": True, "adjust_scaling_factors": False, "rho": 1.5}
    run = _eva_run(options, _batches(labels=True), GPT2_TARGETS, tiny_gpt2)
    _assert_eva_matches(run, tiny_gpt2)
    assert not run[3].peft_config["default"].alpha_pattern  # lora_alpha kept


def test_eva_on_a_plain_model_and_the_label_mask(eva_run: EvaRun) -> None:
    """A plain model with the config gives the PeftModel's components (equal to peft's);
    without the label mask the -100 positions count and the components change."""
    options = {"r": 4, "target_modules": LLAMA_TARGETS, "init_lora_weights": "eva"}
    batches = _batches(labels=True)
    config = LoraConfig(**options, eva_config=EvaConfig(tau=0.7))
    plain = get_eva_state_dict(tiny_llama(), batches, peft_config=config, show_progress_bar=False)
    expected = {key.removeprefix("base_model.model."): value for key, value in eva_run[1].items()}
    assert list(plain) == list(expected)
    for name, value in expected.items():
        assert torch.equal(plain[name], value), name
    unmasked = LoraConfig(**options, eva_config=EvaConfig(tau=0.7, use_label_mask=False))
    other = get_eva_state_dict(tiny_llama(), batches, peft_config=unmasked, show_progress_bar=False)
    name = "model.layers.0.mlp.up_proj"
    rows = min(len(other[name]), len(plain[name]))
    assert not torch.allclose(other[name][:rows], plain[name][:rows], atol=1e-3)


def test_eva_rank_zero_removes_the_layer_as_peft_does() -> None:
    options = {"r": 2, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": "eva"}
    base = tiny_llama()
    generator = torch.Generator().manual_seed(0)
    components = {
        "model.layers.0.self_attn.q_proj": torch.randn(3, 32, generator=generator),
        "model.layers.0.self_attn.v_proj": torch.zeros(0, 32),
        "model.layers.1.self_attn.q_proj": torch.randn(1, 32, generator=generator),
        "model.layers.1.self_attn.v_proj": torch.randn(2, 32, generator=generator),
    }
    theirs = _quiet(lambda: peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options)))
    their_dict = {f"base_model.model.{key}": value.clone() for key, value in components.items()}
    _quiet(lambda: peft.initialize_lora_eva_weights(theirs, eva_state_dict=their_dict))
    ours = get_peft_model(base, LoraConfig(**options))
    initialize_lora_eva_weights(ours, eva_state_dict=components)
    removed = ours.get_base_model().model.layers[0].self_attn.v_proj
    assert type(removed) is nn.Linear
    assert set(_lora_state(ours)) == set(_lora_state(theirs))
    for key, value in _lora_state(theirs).items():
        assert torch.equal(_lora_state(ours)[key], value), key
    for field in ("target_modules", "rank_pattern", "alpha_pattern"):
        assert getattr(ours.peft_config["default"], field) == getattr(
            theirs.peft_config["default"], field
        )


def test_eva_adapter_saved_loads_as_plain_lora_in_lorakit_and_peft(
    eva_run: EvaRun, tmp_path: Path
) -> None:
    ours = copy.deepcopy(eva_run[3])
    with torch.no_grad():  # a trained B, so the file changes outputs
        for name, parameter in ours.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.sin(torch.arange(parameter.numel())).view_as(parameter))
    trained = _logits(ours)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["tau"] == 0.7
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(loaded), trained, atol=OUTPUT_TOL, rtol=0)
    their_loaded = _quiet(lambda: peft.PeftModel.from_pretrained(tiny_llama(), tmp_path))
    torch.testing.assert_close(_logits(their_loaded), trained, atol=OUTPUT_TOL, rtol=0)
    # and peft's EVA file (rank_pattern, alpha_pattern, eva_config) loads in lorakit
    _quiet(lambda: eva_run[2].save_pretrained(tmp_path / "peft"))
    ours_from_peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(_lora_state(ours_from_peft), _lora_state(eva_run[2]), atol=0, rtol=0)


def test_eva_refusals_name_the_problem() -> None:
    plain = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"init_lora_weights=True\. Fix"):
        initialize_lora_eva_weights(plain, _batches())
    with pytest.raises(ConfigError, match=r"eva_config with init_lora_weights=True"):
        LoraConfig(eva_config=EvaConfig())
    with pytest.raises(ConfigError, match=r"eva_config.rho=0.5"):
        EvaConfig(rho=0.5)
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="eva")
    )
    before = _lora_state(model)
    with pytest.raises(UnsupportedOptionError, match=r"eva_state_dict and \['dataloader'\]"):
        initialize_lora_eva_weights(model, _batches(), eva_state_dict={})
    with pytest.raises(UnsupportedOptionError, match=r"not LoRA layers of adapter"):
        initialize_lora_eva_weights(model, eva_state_dict={"lm_head": torch.zeros(1, 32)})
    with pytest.raises(ConfigError, match=r"No adapter 'other'; adapters: \['default'\]"):
        get_eva_state_dict(model, _batches(), adapter_name="other")
    with pytest.raises(UnsupportedOptionError, match=r"one-shot iterator"):
        initialize_lora_eva_weights(model, iter(_batches()))
    with pytest.raises(UnsupportedOptionError, match=r"prepare_layer_inputs_fn names \['nope'\]"):
        get_eva_state_dict(model, _batches(), prepare_layer_inputs_fn={"nope": lambda *a: a[0]})
    assert all(torch.equal(value, before[key]) for key, value in _lora_state(model).items())


# --- CorDA --------------------------------------------------------------------------------
def _samples() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return [torch.randint(0, 128, (1, 12), generator=generator) for _ in range(4)]


def _corda_models(
    make_base: Callable[[], nn.Module], targets: list[str], corda: dict[str, Any], r: int = 4
) -> tuple[Any, PeftModel]:
    options = {"r": r, "target_modules": targets, "init_lora_weights": "corda"}
    their_base, our_base = make_base(), make_base()
    their_config = peft.LoraConfig(**options, corda_config=PeftCordaConfig(**corda))
    _quiet(
        lambda: peft_preprocess_corda(
            their_base, their_config, run_model=lambda: [their_base(s) for s in _samples()]
        )
    )
    theirs = _quiet(lambda: peft.get_peft_model(their_base, their_config))
    our_config = LoraConfig(**options, corda_config=CordaConfig(**corda))
    preprocess_corda(our_base, our_config, run_model=lambda: [our_base(s) for s in _samples()])
    ours = get_peft_model(our_base, our_config)
    return theirs, ours


def _assert_same_states(theirs: nn.Module, ours: nn.Module) -> None:
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    assert set(our_state) == set(their_state)
    for key, value in their_state.items():
        torch.testing.assert_close(our_state[key], value, atol=CORDA_TOL, rtol=0, msg=key)


@pytest.mark.parametrize(
    ("make_base", "targets", "method"),
    [
        (tiny_llama, ["q_proj", "v_proj", "down_proj"], "ipm"),
        (tiny_llama, ["q_proj", "v_proj", "down_proj"], "kpm"),
        (tiny_gpt2, ["c_attn", "c_proj"], "ipm"),
    ],
    ids=["llama-ipm", "llama-kpm", "gpt2-conv1d-ipm"],
)
def test_corda_adapters_and_residual_bases_equal_peft(
    make_base: Callable[[], nn.Module], targets: list[str], method: str
) -> None:
    theirs, ours = _corda_models(make_base, targets, {"corda_method": method})
    _assert_same_states(theirs, ours)  # A, B and the residual base weights
    original = make_base()
    changed = ours.get_base_model().state_dict()
    assert any(
        not torch.equal(changed[key.replace(".weight", ".base_layer.weight")], value)
        for key, value in original.state_dict().items()
        if key.replace(".weight", ".base_layer.weight") in changed
    )
    torch.testing.assert_close(_logits(ours), _logits(original), atol=OUTPUT_TOL, rtol=0)
    assert not any(hasattr(module, "eigens") for module in ours.modules())


def test_corda_files_are_peft_files_both_ways(tmp_path: Path) -> None:
    """lorakit's covariance file serves peft at another rank, and peft's cache serves lorakit."""
    targets = ["q_proj", "v_proj"]
    covariance = str(tmp_path / "ours" / "covariance.pt")
    _, ours = _corda_models(tiny_llama, targets, {"covariance_file": covariance})
    base = tiny_llama()  # no run_model: the covariances come from lorakit's file
    config = peft.LoraConfig(
        r=2,
        target_modules=targets,
        init_lora_weights="corda",
        corda_config=PeftCordaConfig(covariance_file=covariance),
    )
    _quiet(lambda: peft_preprocess_corda(base, config))
    theirs = _quiet(lambda: peft.get_peft_model(base, config))
    again = tiny_llama()
    our_config = LoraConfig(
        r=2,
        target_modules=targets,
        init_lora_weights="corda",
        corda_config=CordaConfig(covariance_file=covariance),
    )
    preprocess_corda(again, our_config)
    _assert_same_states(theirs, get_peft_model(again, our_config))
    cache = str(tmp_path / "peft" / "cache.pt")
    _quiet(lambda: _corda_models(tiny_llama, targets, {"cache_file": cache}))
    cached = tiny_llama()
    cache_config = LoraConfig(
        r=4, target_modules=targets, init_lora_weights="corda", corda_config={"cache_file": cache}
    )
    preprocess_corda(cached, cache_config)
    _assert_same_states(get_peft_model(cached, cache_config), ours)


def test_corda_temporary_fields_and_verbose(caplog: pytest.LogCaptureFixture) -> None:
    corda = {"prune_temporary_fields": False, "verbose": True}
    with caplog.at_level(logging.INFO, logger="lorakit"):
        theirs, ours = _corda_models(tiny_llama, ["q_proj"], corda)
    assert "CorDA: decomposing model.layers.1.self_attn.q_proj (r=4, ipm)" in caplog.text
    pairs = zip(
        (m for m in theirs.modules() if hasattr(m, "covariance_matrix")),
        (m for m in ours.modules() if hasattr(m, "covariance_matrix")),
        strict=True,
    )
    count = 0
    for their_module, our_module in pairs:
        torch.testing.assert_close(
            our_module.covariance_matrix, their_module.covariance_matrix, atol=CORDA_TOL, rtol=0
        )
        assert (our_module.sample_count, our_module.rank) == (their_module.sample_count, 4)
        count += 1
    assert count == 2


def test_corda_saved_file_and_converted_save_as_peft(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    theirs, ours = _corda_models(tiny_llama, ["q_proj", "v_proj"], {})
    for library, model in (("peft", theirs), ("lorakit", ours)):
        _quiet(lambda model=model, library=library: model.save_pretrained(tmp_path / library / "0"))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    steps = torch.arange(parameter.numel(), dtype=torch.float32)
                    parameter.add_(0.05 * torch.sin(steps).view_as(parameter))
        _quiet(
            lambda model=model, library=library: model.save_pretrained(
                tmp_path / library / "converted",
                path_initial_model_for_weight_conversion=str(tmp_path / library / "0"),
            )
        )
    trained = _logits(ours)
    torch.testing.assert_close(_logits(theirs), trained, atol=OUTPUT_TOL, rtol=0)
    ours.save_pretrained(tmp_path / "raw")  # the trained adapter, for the residual base
    their_file = load_file(tmp_path / "peft" / "converted" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "lorakit" / "converted" / "adapter_model.safetensors")
    assert set(our_file) == set(their_file)
    for key, value in their_file.items():
        torch.testing.assert_close(our_file[key], value, atol=CORDA_TOL, rtol=0, msg=key)
    our_json = json.loads((tmp_path / "lorakit" / "converted" / "adapter_config.json").read_text())
    assert (our_json["r"], our_json["init_lora_weights"]) == (8, True)
    for folder in (tmp_path / "lorakit" / "converted", tmp_path / "peft" / "converted"):
        loaded = PeftModel.from_pretrained(tiny_llama(), folder)  # on the ORIGINAL base
        torch.testing.assert_close(_logits(loaded), trained, atol=OUTPUT_TOL, rtol=0)
        their_loaded = _quiet(lambda f=folder: peft.PeftModel.from_pretrained(tiny_llama(), f))
        torch.testing.assert_close(_logits(their_loaded), trained, atol=OUTPUT_TOL, rtol=0)
    # A file with init_lora_weights="corda" holds A and B for the residual base: lorakit loads
    # it as plain LoRA there; peft re-runs the init on load (it needs preprocess_corda), so it
    # loads the file as plain LoRA only with init_lora_weights=True in the config.
    residual = ours.unload()
    raw = PeftModel.from_pretrained(copy.deepcopy(residual), tmp_path / "raw")
    assert raw.peft_config["default"].init_lora_weights == "corda"
    torch.testing.assert_close(_logits(raw), trained, atol=OUTPUT_TOL, rtol=0)
    with pytest.raises(ValueError, match=r"`eigens` attribute not found"):
        _quiet(lambda: peft.PeftModel.from_pretrained(copy.deepcopy(residual), tmp_path / "raw"))
    plain = peft.LoraConfig.from_pretrained(tmp_path / "raw")
    plain.init_lora_weights, plain.corda_config = True, None
    their_raw = _quiet(
        lambda: peft.PeftModel.from_pretrained(
            copy.deepcopy(residual), tmp_path / "raw", config=plain
        )
    )
    torch.testing.assert_close(_logits(their_raw), trained, atol=OUTPUT_TOL, rtol=0)
    # the conversion rewrote the initial folder's config as peft does: init_lora_weights=True,
    # corda_config kept (by both); lorakit drops that record on load, with a warning
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        initial = PeftModel.from_pretrained(residual, tmp_path / "lorakit" / "0")
    assert "corda_config dropped: init_lora_weights=True does not use it" in caplog.text
    assert initial.peft_config["default"].corda_config is None
    torch.testing.assert_close(_logits(initial), _logits(tiny_llama()), atol=OUTPUT_TOL, rtol=0)


def test_corda_refusals_name_the_problem(tmp_path: Path) -> None:
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="corda")
    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ConfigError, match=r"has no CorDA triplets\. Fix: run lorakit"):
        get_peft_model(base, config)
    assert not any(isinstance(module, LoraLayer) for module in base.modules())
    assert all(torch.equal(before[key], value) for key, value in base.state_dict().items())
    with pytest.raises(UnsupportedOptionError, match=r"needs run_model"):
        preprocess_corda(base, config)
    preprocess_corda(base, config, run_model=lambda: base(_samples()[0]))
    with pytest.raises(ConfigError, match=r"S_WC of shape \(2,\), expected \(3,\) for r=3"):
        get_peft_model(base, LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights="corda"))
    with pytest.raises(ConfigError, match=r"corda_config.corda_method='svd'"):
        CordaConfig(corda_method="svd")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"corda_config with init_lora_weights='pissa'"):
        LoraConfig(init_lora_weights="pissa", corda_config=CordaConfig())
    with pytest.raises(ConfigError, match=r"corda_config has fields \['nope'\]"):
        LoraConfig(init_lora_weights="corda", corda_config={"nope": 1})
    assert lorakit.CordaConfig is CordaConfig
