"""Reading a PEFT adapter folder into what the engine serves: per-layer factors and heads.

An adapter becomes, for every module it adapts, A (r, in) in the engine's dtype, B (out, r) in
float32 and its scale s = lora_alpha / r (or / sqrt(r) with rsLoRA; `rank_pattern` and
`alpha_pattern` per module), which the banks fold into B as they write it; and, for
classification adapters, the state of each module it saves whole (`modules_to_save`, e.g. the
classifier head). Features the engine does not serve are refused by name before anything is
loaded.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ServeError
from lorakit.inject.matching import pattern_value
from lorakit.io.files import SAFETENSORS_WEIGHTS_NAME, load_adapter_files, read_adapter_config
from lorakit.io.keys import MODEL_KEY_PREFIX
from lorakit.ops.lora import lora_scale
from lorakit.serve.types import AdapterInfo

TASK_CAUSAL_LM = "causal_lm"
TASK_SEQ_CLS = "seq_cls"
# PEFT task types each engine task serves; None: a config written without one.
TASK_TYPES: dict[str, tuple[str | None, ...]] = {
    TASK_CAUSAL_LM: (None, "CAUSAL_LM"),
    TASK_SEQ_CLS: (None, "SEQ_CLS"),
}
# Config options whose non-default values change the forward in ways the engine does not serve.
UNSERVED_OPTIONS: dict[str, tuple[object, ...]] = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "trainable_token_indices": (None,),
    "layer_replication": (None,),  # the file's layer paths name the replicated layers
    "bias": ("none", None),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None, []),
    "arrow_config": (None,),
}

LORA_A_KEY, LORA_B_KEY = ".lora_A.weight", ".lora_B.weight"  # file keys' suffixes
# safetensors dtypes read in place; a file with others is read by lorakit.io instead.
MAPPED_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


@dataclass(frozen=True)
class LoadedAdapter:
    """What the engine keeps about a loaded adapter besides its tensors in the banks."""

    info: AdapterInfo
    tensor_bytes: int


@dataclass
class AdapterWeights:
    """One adapter ready for the banks.

    Attributes:
        info: What `Engine.adapters()` reports.
        factors: Module path -> (A (r, in) in the engine's dtype, B (out, r) in float32, s).
        heads: Module path -> the state dict of the module it replaces (modules_to_save).
    """

    info: AdapterInfo
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    heads: dict[str, dict[str, torch.Tensor]]

    def tensor_bytes(self) -> int:
        """Bytes of the adapter's tensors as the banks hold them (A's dtype for s·B too)."""
        total = sum((A.numel() + B.numel()) * A.element_size() for A, B, _ in self.factors.values())
        heads = [t for state in self.heads.values() for t in state.values()]
        return total + sum(t.numel() * t.element_size() for t in heads)


def module_features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear, a 4-bit QuantLinear or a transformers Conv1D."""
    in_features, out_features = (
        getattr(module, "in_features", None),
        getattr(module, "out_features", None),
    )
    if isinstance(in_features, int) and isinstance(out_features, int):
        return in_features, out_features
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    if type(module).__name__ == "Conv1D" and isinstance(nx, int) and isinstance(nf, int):
        return nx, nf
    return None


def _check_options(config: dict[str, Any], path: Path, task: str) -> None:
    for option, allowed in UNSERVED_OPTIONS.items():
        if config.get(option) not in allowed:
            raise ServeError(
                f"Adapter {path} sets {option}={config[option]!r}, which the serving engine "
                f"does not serve (it serves plain LoRA: {option} must be {allowed[0]!r}). Fix: "
                "merge this adapter into the base with `lorakit merge` and serve the result."
            )
    task_type = config.get("task_type")
    if task_type not in TASK_TYPES[task]:
        raise ServeError(
            f"Adapter {path} has task_type={task_type!r}, but this engine's base is a {task} "
            f"model (task types it serves: {[t for t in TASK_TYPES[task] if t]}). Fix: load it "
            "into an engine built on a base of its task."
        )


def _head_paths(keys: list[str], modules: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Group non-LoRA file keys by the base module they belong to (the longest prefix)."""
    heads: dict[str, list[str]] = {}
    for key in keys:
        path = key.removeprefix(MODEL_KEY_PREFIX)
        owner = max((m for m in modules if m and path.startswith(m + ".")), key=len, default=None)
        if owner is None:
            raise ServeError(
                f"The adapter file holds {key!r}, which belongs to no module of the base. "
                "Fix: load the adapter into an engine built on the base it was trained on."
            )
        heads.setdefault(owner, []).append(path)
    return heads


def _factors(
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    modules: dict[str, nn.Module],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    factors = {}
    # The modules' paths from their lora_A keys (a scan of suffixes: faster than parsing keys).
    paths = [
        key[len(MODEL_KEY_PREFIX) : -len(LORA_A_KEY)]
        for key in tensors
        if key.startswith(MODEL_KEY_PREFIX) and key.endswith(LORA_A_KEY)
    ]
    for path in paths:
        if path not in modules:
            raise ServeError(
                f"The adapter adapts {path!r}, which the base does not have. Fix: load it into "
                "an engine built on the base it was trained on."
            )
        A = tensors[f"{MODEL_KEY_PREFIX}{path}{LORA_A_KEY}"].float()
        B = tensors.get(f"{MODEL_KEY_PREFIX}{path}{LORA_B_KEY}")
        if B is None:
            raise ServeError(
                f"The adapter file holds lora_A of {path!r} but no lora_B. Fix: save the "
                "adapter again (its file is incomplete)."
            )
        B = B.float()
        features = module_features(modules[path])
        if features is None or A.dim() != 2 or B.dim() != 2:
            raise ServeError(
                f"The adapter adapts {path!r}, a {type(modules[path]).__name__}; the engine "
                "serves LoRA on Linear, transformers Conv1D and 4-bit QuantLinear layers only. "
                "Fix: merge the adapter with `lorakit merge` and serve the merged model."
            )
        if (A.shape[1], B.shape[0]) != features or A.shape[0] != B.shape[1]:
            raise ServeError(
                f"The adapter's factors of {path!r} have shapes {tuple(A.shape)} and "
                f"{tuple(B.shape)}, which do not fit the base's layer (in, out) = {features}. "
                "Fix: load the adapter into an engine built on the base it was trained on."
            )
        r = A.shape[0]
        alpha = pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
        scale = lora_scale(alpha, r, bool(config.get("use_rslora", False)))
        # B stays in float32: the bank scales it and casts to the engine's dtype as it writes.
        factors[path] = (A.to(device, dtype), B.to(device), scale)
    return factors


def _check_head(path: str, state: dict[str, torch.Tensor], module: nn.Module) -> None:
    expected = {key: tuple(t.shape) for key, t in module.state_dict().items()}
    got = {key: tuple(t.shape) for key, t in state.items()}
    if got != expected:
        raise ServeError(
            f"The adapter saves the module {path!r} with tensors {got}, but the base's module "
            f"has {expected}. Fix: load the adapter into an engine built on its own base (the "
            "same number of labels)."
        )


def _mapped_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """The safetensors file's tensors as views of a private memory map of it, no copy.

    The banks copy each tensor once, straight from the file's pages into their stacks (the
    map is copy-on-write, so the file never changes; it closes with the last view). None when
    the file is not one this reads in place (too short, not mappable, a header that does not
    parse or fit, a dtype outside MAPPED_DTYPES, an empty or unaligned tensor): lorakit.io
    then reads it, or says what is wrong with it and the fix.
    """
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < 8:
                return None
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError:  # e.g. a file system that cannot map files
        return None
    start = 8 + int.from_bytes(mapped[:8], "little")  # the data follow the JSON header
    try:
        header = json.loads(mapped[8:start]) if start <= size else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    flat: dict[torch.dtype, torch.Tensor] = {}  # the file's bytes seen as each dtype used
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = MAPPED_DTYPES[entry["dtype"]]
            shape = [int(n) for n in entry["shape"]]
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return None
        numel = math.prod(shape)
        offset = start + begin
        if (
            numel == 0
            or begin < 0
            or end - begin != numel * dtype.itemsize
            or start + end > size
            or offset % dtype.itemsize  # reinterpreting the bytes needs aligned elements
        ):
            return None
        if dtype not in flat:
            flat[dtype] = torch.frombuffer(mapped, dtype=dtype, count=size // dtype.itemsize)
        strides = [math.prod(shape[axis + 1 :]) for axis in range(len(shape))]
        tensors[key] = flat[dtype].as_strided(shape, strides, offset // dtype.itemsize)
    return tensors


def _read_files(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(file key -> tensor, config) of an adapter folder, its weights read in place if they can."""
    weights = folder / SAFETENSORS_WEIGHTS_NAME
    if weights.is_file():
        config = read_adapter_config(folder)
        tensors = _mapped_tensors(weights)
        if tensors is not None:
            return tensors, config
    # No safetensors file (lorakit.io names what is missing) or one read by its parser.
    return load_adapter_files(folder)


def read_adapter(
    name: str,
    path: str | os.PathLike[str],
    task: str,
    modules: dict[str, nn.Module],
    dtype: torch.dtype,
    device: torch.device,
) -> AdapterWeights:
    """Read the PEFT folder `path` for the base whose modules are `modules` (name -> module).

    Raises:
        ServeError: The adapter uses a feature the engine does not serve, is for another
            task, or does not fit the base.
        AdapterFileError: The folder or its files are missing or corrupt (from lorakit.io).
    """
    folder = Path(path)
    tensors, config = _read_files(folder)
    _check_options(config, folder, task)
    unserved = [k for k in tensors if ".lora_embedding_" in k or ".lora_magnitude_vector" in k]
    if unserved:
        raise ServeError(
            f"Adapter {folder} holds {unserved[0]!r}: LoRA on embeddings and DoRA are not "
            "served by the engine. Fix: merge the adapter with `lorakit merge` and serve that."
        )
    factors = _factors(tensors, config, modules, dtype, device)
    lora_keys = {
        f"{MODEL_KEY_PREFIX}{p}{suffix}" for p in factors for suffix in (LORA_A_KEY, LORA_B_KEY)
    }
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for owner, paths in _head_paths([k for k in tensors if k not in lora_keys], modules).items():
        if task != TASK_SEQ_CLS:
            raise ServeError(
                f"Adapter {folder} saves the whole module {owner!r} (modules_to_save); the "
                "engine serves saved modules for sequence classification only. Fix: merge it "
                "with `lorakit merge` and serve the merged model as a base."
            )
        heads[owner] = {
            p.removeprefix(owner + "."): tensors[MODEL_KEY_PREFIX + p].to(device, dtype)
            for p in paths
        }
        _check_head(owner, heads[owner], modules[owner])
    ranks = [A.shape[0] for A, _, _ in factors.values()]
    info = AdapterInfo(
        name=name,
        path=str(folder),
        r=max(ranks, default=int(config.get("r", 0))),
        lora_alpha=float(config["lora_alpha"]),
        target_modules=tuple(factors),
        task=task,
    )
    return AdapterWeights(info=info, factors=factors, heads=heads)
