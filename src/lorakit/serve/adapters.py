"""Reading a PEFT adapter folder into what the engine serves: per-layer factors and heads.

An adapter becomes, for every module it adapts, A (r, in) in the engine's dtype, B (out, r) in
float32 and its scale s = lora_alpha / r (or / sqrt(r) with rsLoRA; `rank_pattern` and
`alpha_pattern` per module), which the banks fold into B as they write it; and, for
classification adapters, the state of each module it saves whole (`modules_to_save`, e.g. the
classifier head). Features the engine does not serve are refused by name before anything is
loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ServeError
from lorakit.inject.matching import pattern_value
from lorakit.io.files import load_adapter_files
from lorakit.io.keys import MODEL_KEY_PREFIX, lora_module_paths
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
    for path in lora_module_paths(tensors):
        if path not in modules:
            raise ServeError(
                f"The adapter adapts {path!r}, which the base does not have. Fix: load it into "
                "an engine built on the base it was trained on."
            )
        A = tensors[f"{MODEL_KEY_PREFIX}{path}.lora_A.weight"].float()
        B = tensors[f"{MODEL_KEY_PREFIX}{path}.lora_B.weight"].float()
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
    tensors, config = load_adapter_files(folder)
    _check_options(config, folder, task)
    unserved = [k for k in tensors if ".lora_embedding_" in k or ".lora_magnitude_vector" in k]
    if unserved:
        raise ServeError(
            f"Adapter {folder} holds {unserved[0]!r}: LoRA on embeddings and DoRA are not "
            "served by the engine. Fix: merge the adapter with `lorakit merge` and serve that."
        )
    factors = _factors(tensors, config, modules, dtype, device)
    lora_keys = {
        f"{MODEL_KEY_PREFIX}{p}.{container}.weight"
        for p in factors
        for container in ("lora_A", "lora_B")
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
