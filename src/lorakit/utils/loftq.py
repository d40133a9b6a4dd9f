"""`replace_lora_weights_loftq`: LoftQ factors for an adapter on an already 4-bit base.

Why: a model loaded in 4 bits (bitsandbytes' `Linear4bit`, or lorakit's `QuantLinear`) has
lost the quantization error W − dequant(Q). Reading each original weight W from the
checkpoint's safetensors, one at a time, the adapter's A and B are set to the best rank-r fit
of that error (`ops.loftq.low_rank_fit`), so the 4-bit model with its adapter starts close to
the full-precision one. The 4-bit weights do not change (one LoftQ step on fixed codes).

Against peft: peft stores the fit's factors without the LoRA scale, so its adapter adds
s · (the fit), which is the fit only when s = lora_alpha / r = 1. lorakit divides s out of A
and B (√s from each), so s · B A is the fit for any scale; with s = 1 both give the same A and
B.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterStateError, ConfigError
from ..extras import import_optional
from ..layers.packed import LoraPackedLinear
from ..model import PeftModel
from ..ops.loftq import low_rank_fit

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
Callback = Callable[[nn.Module, str], bool]


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: nn.Module,
    model_path: str | os.PathLike[str] | None = None,
    adapter_name: str = "default",
    callback: Callback | None = None,
) -> None:
    """Set an adapter's A and B on each 4-bit layer to the LoftQ fit of its quantization error.

    Every layer and tensor is checked before any adapter changes. Layers are then done one at
    a time, reading only that layer's weight from the file.

    Args:
        peft_model: A `PeftModel` whose LoRA layers wrap 4-bit bases (bitsandbytes
            `Linear4bit` or lorakit `QuantLinear`).
        model_path: The base checkpoint: a folder holding `model.safetensors` (or the
            sharded `model.safetensors.index.json`), or the `.safetensors` file itself.
            None: the base model's `config._name_or_path`, a local folder or a repo id found
            in the Hugging Face cache (nothing is downloaded).
        adapter_name: The adapter whose weights are replaced.
        callback: Called as `callback(peft_model, module_name)` after each layer's
            replacement (`module_name` without the `base_model.model.` prefix, as in peft);
            returning False puts that layer's previous A and B back. Use it to keep a
            layer only when it brings the model's output closer to the original.

    Raises:
        TypeError: `peft_model` is not a lorakit `PeftModel`.
        AdapterNameError: `adapter_name` does not exist.
        AdapterStateError: No 4-bit LoRA layer holds the adapter, or its tensors are on the
            meta device.
        ConfigError: The checkpoint cannot be found, lacks a layer's weight, or holds one of
            another shape; or a layer's scale is 0.
    """
    model = getattr(peft_model, "_orig_mod", peft_model)
    if not isinstance(model, PeftModel):
        raise TypeError(
            "replace_lora_weights_loftq needs a lorakit PeftModel, got "
            f"{type(model).__name__}. Fix: wrap the 4-bit model with lorakit.get_peft_model."
        )
    model._check_exist([adapter_name])
    layers = _quantized_layers(model, adapter_name)
    reader = _WeightReader(_checkpoint_files(model, model_path), model.get_base_model())
    for key, layer in layers:
        reader.check(key, (layer.out_features, layer.in_features))
        if layer.scaling[adapter_name] <= 0:
            raise ConfigError(
                f"{key}: adapter {adapter_name!r} has scale {layer.scaling[adapter_name]} "
                "(lora_alpha <= 0), so no A and B can carry the fit. Fix: a lora_alpha > 0."
            )
    for key, layer in layers:
        A, B = layer._adapter_pair(adapter_name)
        residual = reader.read(key).to(torch.float32) - layer.dequantized_weight()
        A_fit, B_fit, _ = low_rank_fit(residual, layer.r[adapter_name], layer.scaling[adapter_name])
        del residual
        previous = (A.clone(), B.clone()) if callback is not None else None
        A.copy_(A_fit)
        B.copy_(B_fit)
        if previous is not None and callback is not None and not callback(peft_model, key):
            A.copy_(previous[0])
            B.copy_(previous[1])


def _quantized_layers(model: PeftModel, adapter_name: str) -> list[tuple[str, LoraPackedLinear]]:
    layers = [
        (key, layer)
        for key, layer in model._lora_layers()
        if isinstance(layer, LoraPackedLinear) and adapter_name in layer.r
    ]
    if not layers:
        raise AdapterStateError(
            f"replace_lora_weights_loftq found no 4-bit LoRA layer holding adapter "
            f"{adapter_name!r}. Fix: load the base in 4 bits (bitsandbytes' "
            "BitsAndBytesConfig(load_in_4bit=True) or lorakit.quant.load_quantized) before "
            "get_peft_model."
        )
    for key, layer in layers:
        if any(tensor.is_meta for tensor in layer._adapter_pair(adapter_name)):
            raise AdapterStateError(
                f"Adapter {adapter_name!r} in {key!r} has no weights yet (meta tensors from "
                "low_cpu_mem_usage=True). Fix: create it with low_cpu_mem_usage=False."
            )
    return layers


def _checkpoint_files(
    model: PeftModel, model_path: str | os.PathLike[str] | None
) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (every name, for a sharded checkpoint)."""
    if model_path is None:
        model_path = _cached_checkpoint(model.get_base_model())
    path = Path(model_path)
    if path.is_file() and path.suffix == ".safetensors":
        return _names_in(path)
    if (path / SAFETENSORS_FILE).is_file():
        return _names_in(path / SAFETENSORS_FILE)
    if (path / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    raise ConfigError(
        f"model_path={str(model_path)!r} holds no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}; "
        "LoftQ reads the original weights from safetensors (pickle files cannot be read one "
        "tensor at a time). Fix: pass the folder of the safetensors checkpoint."
    )


def _cached_checkpoint(base: nn.Module) -> str:
    name = getattr(getattr(base, "config", None), "_name_or_path", None)
    if not name:
        raise ConfigError(
            "replace_lora_weights_loftq cannot tell where the base model was loaded from (no "
            "config._name_or_path). Fix: pass model_path, the checkpoint folder."
        )
    if os.path.isdir(name):
        return str(name)
    hub = import_optional("huggingface_hub", "transformers", "replace_lora_weights_loftq")
    try:
        return str(hub.snapshot_download(name, local_files_only=True))
    except Exception as error:  # not a repo id, or not in the cache
        raise ConfigError(
            f"The base model {name!r} is neither a folder nor in the Hugging Face cache "
            f"({error}). Fix: pass model_path, the checkpoint folder."
        ) from error


def _names_in(file: Path) -> dict[str, Path]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as opened:
        return dict.fromkeys(opened.keys(), file)


class _WeightReader:
    """Reads a layer's weight by its module path, with or without the base model's prefix."""

    def __init__(self, files: dict[str, Path], base: nn.Module) -> None:
        self.files = files
        self.prefix: str = getattr(base, "base_model_prefix", "") or ""

    def _name(self, key: str) -> str | None:
        for name in (f"{key}.weight", f"{key.removeprefix(self.prefix + '.')}.weight"):
            if name in self.files:
                return name
        return None

    def check(self, key: str, shape: tuple[int, int]) -> None:
        from safetensors import safe_open

        name = self._name(key)
        if name is None:
            raise ConfigError(
                f"The checkpoint holds no weight for {key!r} (looked for {key}.weight). Fix: "
                "pass model_path of the checkpoint this 4-bit model was loaded from."
            )
        with safe_open(str(self.files[name]), framework="pt") as opened:
            found = tuple(opened.get_slice(name).get_shape())
        if found != shape:
            raise ConfigError(
                f"The checkpoint's {name} has shape {found}, but the layer is {shape}. Fix: "
                "pass model_path of the checkpoint this 4-bit model was loaded from."
            )

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        name = self._name(key)
        assert name is not None, "check() ran first"
        with safe_open(str(self.files[name]), framework="pt") as opened:
            tensor: torch.Tensor = opened.get_tensor(name)
        return tensor
