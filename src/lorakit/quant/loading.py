"""`load_quantized`: a transformers checkpoint loaded with its linear layers quantized on arrival.

`from_pretrained` followed by `quantize_model_linears` holds the whole model in full precision
before anything is quantized. Here the model is built with its parameters on the meta device
(no memory), the selected `nn.Linear` layers become empty `QuantLinear`s, and the safetensors
file is read one tensor at a time: a linear weight is quantized as soon as it is read and
dropped, every other tensor takes its place in the model. The peak is the quantized model
plus one full-precision tensor (and the quantizer's temporaries), not the fp32 model.

Each tensor is read through its own `safe_open` call: safetensors memory-maps the file, and
every page read through a map stays in the process's resident set until the map is closed,
so reading all tensors through one open file would count the whole file in the peak RSS.
A tensor kept in full precision in the file's own dtype stays backed by its map (as with
`from_pretrained`): its pages are read when first used.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..extras import import_optional
from ..ops.nf4 import FLOAT_DTYPES
from .linear import QuantConfig, QuantLinear, _is_skipped

logger = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
SHOWN_NAMES = 5  # names listed in an error message


def load_quantized(
    path: str | os.PathLike[str],
    quant_config: QuantConfig | None = None,
    *,
    skip_modules: Sequence[str] = ("lm_head",),
    model_class: Any = None,
    torch_dtype: torch.dtype | Literal["auto"] = "auto",
) -> nn.Module:
    """Load a transformers model saved with `save_pretrained`, its linear layers in 4 bits.

    The result equals `from_pretrained(path, dtype=torch_dtype)` followed by
    `quantize_model_linears(model, quant_config, skip_modules)` (the same codes, bit for
    bit, and the same tied weights), in eval mode, without ever holding the full-precision
    model: each linear weight is quantized as it is read from the file.

    Args:
        path: the model folder (`config.json` and `model.safetensors`, or sharded files
            with `model.safetensors.index.json`).
        quant_config: the quantization settings (default `QuantConfig()`).
        skip_modules: module names kept in full precision, matched as in
            `quantize_model_linears`.
        model_class: the transformers class to build (e.g. `LlamaForCausalLM` or
            `AutoModelForCausalLM`); default: the first of the config's `architectures`,
            else `AutoModel`.
        torch_dtype: dtype of every floating tensor that stays in full precision, and the
            dtype linear weights are cast to before quantization (as `from_pretrained` would
            load them); "auto" takes the config's `dtype`, else float32.

    Raises:
        FileNotFoundError: if `path` is not a folder with a config and safetensors weights.
        ValueError: if the folder holds only pickled weights, for an unsupported dtype, or
            if the file leaves model weights unset (names given).
    """
    transformers = import_optional("transformers", "transformers", "load_quantized")

    folder = Path(path)
    files = _safetensors_files(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    dtype = _resolve_dtype(torch_dtype, config)
    quant_config = quant_config if quant_config is not None else QuantConfig()
    if isinstance(skip_modules, str):
        raise TypeError(
            f"skip_modules must be a sequence of names, got the string {skip_modules!r}; "
            f"write ({skip_modules!r},)."
        )
    with _parameters_on_meta():
        model = _build(model_class, config, dtype, transformers)
    loader = _Loader(model, quant_config, skip_modules, dtype)
    for file in files:
        loader.load_file(file)
    loader.check_complete(folder)
    if (folder / GENERATION_CONFIG).is_file() and hasattr(model, "generation_config"):
        generation_config = transformers.GenerationConfig.from_pretrained(folder)
        model.generation_config = generation_config
    return model.eval()


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a `save_pretrained` folder, or an error saying what is there."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"load_quantized got {str(folder)!r}, which is not a folder; pass the folder that "
            "model.save_pretrained() wrote (config.json and model.safetensors)."
        )
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SAFETENSORS_FILE).is_file():
        return [folder / SAFETENSORS_FILE]
    pickled = [name for name in PICKLE_FILES if (folder / name).is_file()]
    if pickled:
        raise ValueError(
            f"{str(folder)!r} holds only pickled weights ({', '.join(pickled)}); "
            "load_quantized reads safetensors only (pickle files can run code). Load the "
            "model once with from_pretrained and save it with save_pretrained() (safetensors "
            "by default), or call quantize_model_linears on the loaded model."
        )
    present = sorted(entry.name for entry in folder.iterdir())[:10]
    raise FileNotFoundError(
        f"{str(folder)!r} has no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} (it holds "
        f"{present}); pass a folder written by save_pretrained()."
    )


def _resolve_dtype(torch_dtype: torch.dtype | str, config: Any) -> torch.dtype:
    dtype: Any = torch_dtype
    if torch_dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"torch_dtype={torch_dtype!r} is not supported; use 'auto' or one of {FLOAT_DTYPES}."
        )
    return dtype


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is moved to the meta device at once.

    Buffers stay where they are made: transformers computes some (rotary frequencies) at
    construction and never saves them. A parameter already on meta is kept as the same
    object, so weights tied by assigning one parameter to two modules stay tied. The patch is
    process-wide while the block runs: modules built meanwhile in other threads are affected.
    """
    register = nn.Module.register_parameter

    def register_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            self._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _build(model_class: Any, config: Any, dtype: torch.dtype, transformers: Any) -> nn.Module:
    """The model from its config, in `dtype`, as `from_pretrained` would build it."""
    if model_class is None:
        architectures = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        model_class = model_class or transformers.AutoModel
    build: Callable[..., nn.Module] | None = getattr(model_class, "_from_config", None)
    if build is None:  # the Auto classes
        build = model_class.from_config
    assert build is not None
    return build(config, dtype=dtype)


class _Loader:
    """Puts each tensor read from the files into the model, quantizing the selected linears."""

    def __init__(
        self,
        model: nn.Module,
        config: QuantConfig,
        skip_modules: Sequence[str],
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.prefix = str(getattr(model, "base_model_prefix", "") or "")
        # Every name of each parameter: tied weights are one parameter under several names.
        aliases: dict[int, list[str]] = {}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(parameter), []).append(name)
        self.aliases = {name: names for names in aliases.values() for name in names}
        self.buffers = {name for name, _ in model.named_buffers()}
        self.quantized: dict[str, QuantLinear] = {}  # weight name -> its empty QuantLinear
        for name, module in list(model.named_modules()):
            if name and type(module) is nn.Linear and not _is_skipped(name, skip_modules):
                self.quantized[f"{name}.weight"] = self._replace_linear(name, module, config)
        self.unexpected: list[str] = []

    def _replace_linear(self, name: str, linear: nn.Linear, config: QuantConfig) -> QuantLinear:
        quant = QuantLinear(
            linear.in_features,
            linear.out_features,
            bias=False,
            config=config,
            device="meta",  # set_weight fills every buffer
            weight_dtype=self.dtype,
        )
        quant.bias = linear.bias  # the meta parameter, filled when its tensor is read
        parent_name, _, child_name = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child_name, quant)
        return quant

    def load_file(self, file: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as opened:
            keys = list(opened.keys())
        for key in keys:
            with safe_open(str(file), framework="pt") as opened:  # see the module docstring
                tensor = opened.get_tensor(key)
            self._place(key, tensor)

    def _model_name(self, key: str) -> str | None:
        """The model's name for a file key, allowing for a missing or extra base prefix."""
        known = self.aliases.keys() | self.buffers
        candidates = [key, f"{self.prefix}.{key}"]
        if self.prefix and key.startswith(f"{self.prefix}."):
            candidates.append(key[len(self.prefix) + 1 :])
        return next((name for name in candidates if name in known), None)

    def _place(self, key: str, tensor: torch.Tensor) -> None:
        name = self._model_name(key)
        if name is None:
            self.unexpected.append(key)
            return
        if name in self.buffers:
            owner, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(owner)
            current = module._buffers[leaf]
            dtype = current.dtype if current is not None else tensor.dtype
            module._buffers[leaf] = tensor.to(dtype)
            return
        if tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        names = self.aliases[name]
        dense = [alias for alias in names if alias not in self.quantized]
        for alias in names:
            if alias in self.quantized:
                self.quantized[alias].set_weight(tensor)
        if dense:
            old = self.model.get_parameter(dense[0])
            parameter = nn.Parameter(tensor, requires_grad=old.requires_grad)
            for alias in dense:  # one parameter under every name, so ties hold
                owner, _, leaf = alias.rpartition(".")
                self.model.get_submodule(owner)._parameters[leaf] = parameter

    def check_complete(self, folder: Path) -> None:
        """Raise if a weight is still unset; log the file's tensors the model has no place for."""
        missing = [name for name, p in self.model.named_parameters() if p.is_meta]
        missing += [name for name, module in self.quantized.items() if module.weight_packed.is_meta]
        quantized_modules = {name.rpartition(".")[0] for name in self.quantized}
        missing += [
            name
            for name, buffer in self.model.named_buffers()
            if buffer.is_meta and name.rpartition(".")[0] not in quantized_modules
        ]
        if missing:
            raise ValueError(
                f"The checkpoint in {str(folder)!r} sets no value for {len(missing)} weights of "
                f"{type(self.model).__name__}, e.g. {missing[:SHOWN_NAMES]}. Check that "
                "model_class fits the checkpoint, or load it with from_pretrained and call "
                "quantize_model_linears."
            )
        if self.unexpected:
            logger.warning(
                "%d tensors in %s have no place in %s and were ignored, e.g. %s",
                len(self.unexpected),
                folder,
                type(self.model).__name__,
                self.unexpected[:SHOWN_NAMES],
            )
