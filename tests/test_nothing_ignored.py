"""Options and files lorakit used to accept and then ignore: each is implemented or refused.

peft is the oracle where it implements the option (pickle files, key_mapping); its signatures
list the keywords every method must handle.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import huggingface_hub
import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import ConfigError, LorakitError, UnsupportedOptionError
from lorakit.io import AdapterFileError
from lorakit.layers import LoraLayer
from tiny_models import tiny_llama, token_batch

# The same fp32 products in the same order: the outputs agree to a few ulps.
FORWARD_TOL = 1e-6


def _trained_adapter(folder: Path, **options: Any) -> PeftModel:
    """A saved adapter with non-zero A and B on q/v of the tiny Llama."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_llama(), config)
    model.save_pretrained(folder, **options)
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        torch.equal(after[key], value) for key, value in before.items()
    )


# --- adapter files using features lorakit does not implement ------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("alora_invocation_tokens", [5, 6]), ("use_qalora", True)],
)
def test_adapter_file_with_unimplemented_feature_raises_and_leaves_model(
    field: str, value: Any, tmp_path: Path
) -> None:
    _trained_adapter(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))

    base = tiny_llama()
    before = _state(base)
    with pytest.raises(ConfigError, match=rf"{tmp_path}/adapter_config.json: {field}="):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(module, LoraLayer) for module in base.modules())
    assert _same_state(base, before)

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    before = _state(model)
    with pytest.raises(ConfigError, match=rf"{field}="):
        model.load_adapter(tmp_path, "other")
    assert list(model.peft_config) == ["default"]
    assert _same_state(model, before)


# --- save_pretrained keywords -------------------------------------------------------------


def test_save_not_on_the_main_process_writes_nothing(tmp_path: Path) -> None:
    _trained_adapter(tmp_path / "out", is_main_process=False)
    assert not (tmp_path / "out").exists()


def test_safe_serialization_false_writes_a_pickle_peft_reads(tmp_path: Path) -> None:
    model = _trained_adapter(tmp_path / "adapter")  # an older safetensors save, then a .bin
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.5)
    model.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert sorted(path.name for path in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.bin",
    ]
    ids = token_batch()
    with torch.no_grad():
        expected = model(ids).logits
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
        ours = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter", allow_pickle=True)
        assert torch.allclose(theirs(ids).logits, expected, atol=FORWARD_TOL, rtol=0)
        assert torch.allclose(ours(ids).logits, expected, atol=FORWARD_TOL, rtol=0)


def test_safe_serialization_replaces_an_older_pickle(tmp_path: Path) -> None:
    _trained_adapter(tmp_path, safe_serialization=False)
    _trained_adapter(tmp_path)
    assert not (tmp_path / "adapter_model.bin").exists()
    assert (tmp_path / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"path_initial_model_for_weight_conversion": "init"}, "path_initial_model"),
        ({"push_to_hub": True}, "push_to_hub"),
        ({"max_shard_size": "1GB"}, "max_shard_size"),
    ],
)
def test_save_keywords_lorakit_does_not_implement_raise(
    options: dict[str, Any], named: str, tmp_path: Path
) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(UnsupportedOptionError, match=named):
        model.save_pretrained(tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


# --- from_pretrained / load_adapter keywords ----------------------------------------------

HUB_VALUES: dict[str, Any] = {
    "force_download": True,
    "local_files_only": True,
    "dry_run": True,
    "etag_timeout": 3.0,
    "headers": {"a": "b"},
}
# peft's keywords read from **kwargs besides hf_hub_download's, with a value that asks for
# something.
OTHER_VALUES: dict[str, Any] = {
    "device_map": "auto",
    "max_memory": {0: "1GB"},
    "offload_folder": "offload",
    "offload_dir": "offload",
    "offload_index": {},
    "use_safetensors": False,
    "ignore_mismatched_sizes": True,
    "adapters": {"a": "b"},
    "use_auth_token": "secret",
    "ephemeral_gpu_offload": True,
    "not_a_keyword": 1,
    "r": 16,  # a LoraConfig field: peft would keep the file's value
}
# With a local folder, each Hub keyword would do nothing and is refused (lorakit.hub), except
# local_files_only=True, which holds for a folder (tests/test_hub.py loads with it).
HUB_KEYWORDS = sorted(
    set(inspect.signature(huggingface_hub.hf_hub_download).parameters)
    - {"repo_id", "filename", "subfolder", "local_files_only"}
)


@pytest.mark.parametrize("method", ["from_pretrained", "load_adapter"])
@pytest.mark.parametrize("keyword", HUB_KEYWORDS + sorted(OTHER_VALUES))
def test_loading_keywords_lorakit_does_not_implement_raise(
    method: str, keyword: str, tmp_path: Path
) -> None:
    _trained_adapter(tmp_path)
    value = {**HUB_VALUES, **OTHER_VALUES}.get(keyword, "x")
    base = tiny_llama()
    before = _state(base)
    with pytest.raises(UnsupportedOptionError, match=rf"{method}\(.*{keyword}="):
        if method == "from_pretrained":
            PeftModel.from_pretrained(base, tmp_path, **{keyword: value})
        else:
            model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
            before = _state(model)
            model.load_adapter(tmp_path, "other", **{keyword: value})
    if method == "from_pretrained":
        assert not any(isinstance(module, LoraLayer) for module in base.modules())
        assert _same_state(base, before)
    else:
        assert list(model.peft_config) == ["default"] and _same_state(model, before)


@pytest.mark.parametrize(
    "method", ["save_pretrained", "from_pretrained", "load_adapter", "get_peft_model"]
)
def test_every_named_peft_keyword_is_a_named_lorakit_keyword(method: str) -> None:
    def named(function: Any) -> list[str]:
        parameters = inspect.signature(function).parameters.values()
        return [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]

    if method == "get_peft_model":
        theirs, ours = named(peft.get_peft_model), named(lorakit.get_peft_model)
    else:
        theirs = named(getattr(peft.PeftModel, method))
        ours = named(getattr(PeftModel, method))
    assert ours[: len(theirs)] == theirs  # same names, same positions


def test_get_peft_model_revision_is_saved_and_mixed_is_refused(tmp_path: Path) -> None:
    config = LoraConfig(target_modules=["q_proj"], revision="v1")
    get_peft_model(tiny_llama(), config, revision="v2").save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note that it overwrites the revision
        peft.get_peft_model(
            tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], revision="v1"), revision="v2"
        ).save_pretrained(tmp_path / "theirs")
    saved = [
        json.loads((tmp_path / name / "adapter_config.json").read_text())["revision"]
        for name in ("ours", "theirs")
    ]
    assert saved == ["v2", "v2"] and config.revision == "v1"
    with pytest.raises(UnsupportedOptionError, match=r"mixed=True"):
        get_peft_model(tiny_llama(), config, mixed=True)


def test_unused_values_of_loading_keywords_are_accepted(tmp_path: Path) -> None:
    expected = _trained_adapter(tmp_path)
    model = PeftModel.from_pretrained(
        tiny_llama(),
        tmp_path,
        revision=None,
        token=None,
        device_map=None,
        force_download=False,
        use_safetensors=True,
        ignore_mismatched_sizes=False,
        ephemeral_gpu_offload=False,
    )
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)


def test_key_mapping_renames_file_keys_as_peft_does(tmp_path: Path) -> None:
    _trained_adapter(tmp_path)
    swap = {r"layers\.0\.": "layers.1.", r"layers\.1\.": "layers.0."}  # first match wins
    ours = PeftModel.from_pretrained(tiny_llama(), tmp_path, key_mapping=swap)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, key_mapping=swap)
    saved = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    key = "base_model.model.model.layers.{}.self_attn.q_proj.lora_A.default.weight"
    assert torch.equal(ours.state_dict()[key.format(0)], saved.state_dict()[key.format(1)])
    assert not torch.equal(ours.state_dict()[key.format(0)], saved.state_dict()[key.format(0)])
    ids = token_batch()
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=FORWARD_TOL, rtol=0)
    other = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    other.load_adapter(tmp_path, "swapped", key_mapping=swap)
    swapped = key.format(0).replace("default", "swapped")
    assert torch.equal(other.state_dict()[swapped], saved.state_dict()[key.format(1)])


# --- merge_and_unload(progressbar=True) ---------------------------------------------------


def test_merge_and_unload_progressbar_shows_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    config = LoraConfig(target_modules=["q_proj", "v_proj"])
    get_peft_model(tiny_llama(), config).merge_and_unload(progressbar=True)
    shown = capsys.readouterr().err
    assert "Unloading and merging model" in shown and "4/4" in shown  # 2 layers x q, v
    get_peft_model(tiny_llama(), config).merge_and_unload()
    assert capsys.readouterr().err == ""


# --- one error hierarchy; the CLI prints errors, never tracebacks --------------------------


def _lorakit_exception_classes() -> list[type[BaseException]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in pkgutil.walk_packages(lorakit.__path__, "lorakit."):
            if not module.name.endswith("__main__"):  # running it would start the CLI
                importlib.import_module(module.name)
    found = []
    for name, module in list(sys.modules.items()):
        if name == "lorakit" or name.startswith("lorakit."):
            for value in vars(module).values():
                is_own = isinstance(value, type) and value.__module__.startswith("lorakit")
                if is_own and issubclass(value, BaseException):
                    found.append(value)
    return found


def test_every_lorakit_error_is_a_lorakit_error() -> None:
    classes = _lorakit_exception_classes()
    assert AdapterFileError in classes and len(classes) > 20
    assert [error for error in classes if not issubclass(error, LorakitError)] == []


def test_merge_cli_reports_a_corrupt_adapter_without_traceback(tmp_path: Path) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    get_peft_model(base, LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by an interrupted copy
    folders = ["--base", tmp_path / "base", "--adapter", tmp_path / "ad", "--out", tmp_path / "out"]
    result = subprocess.run(
        [sys.executable, "-m", "lorakit", "merge", *map(str, folders)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{weights} is not a readable safetensors file" in result.stderr
    assert not (tmp_path / "out").exists()
