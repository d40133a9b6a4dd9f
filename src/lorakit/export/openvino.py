"""A copy of a PEFT LoRA adapter for OpenVINO GenAI, with its scale folded into B.

OpenVINO GenAI (`openvino_genai.Adapter`, `AdapterConfig`) reads only the tensors of
`adapter_model.safetensors` and adds alpha · B A to each adapted layer, alpha being the number
the caller passes: it ignores `lora_alpha`, `r`, `use_rslora` and the patterns of
`adapter_config.json`. lorakit and PEFT add s · B A, with s = lora_alpha / r (lora_alpha /
sqrt(r) with rsLoRA), per module under `rank_pattern` and `alpha_pattern`. The copy holds
B' = s · B, so alpha 1.0 gives the trained model, and exported adapters blend in OpenVINO as
lorakit blends them: a blend {name: w} is alpha_i = w_i.

Its `adapter_config.json` says the same to PEFT and lorakit: lora_alpha = r for every module
(the alpha pattern repeats the rank pattern, rsLoRA off), so s = 1 and the copy loads back as
the original adapter, up to the rounding of s · B in the file's dtype. `lorakit_export.json`
beside it records the source folder and each module's folded scale.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ExportError
from lorakit.inject.matching import pattern_value
from lorakit.io.atomic import replace_folder, write_text
from lorakit.io.files import DEFAULT_ADAPTER_NAME, load_adapter_files, save_adapter_files
from lorakit.io.keys import MODEL_KEY_PREFIX
from lorakit.ops.lora import lora_scale

PathLike = str | os.PathLike[str]
EXPORT_NOTE = "lorakit_export.json"
RUNTIME = "openvino_genai"
FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# Element types OpenVINO GenAI reads from a safetensors adapter.
READABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Task types whose adapters OpenVINO GenAI's LLM and VLM pipelines apply (tensor names under
# `base_model.model.`); None: a config written without one.
TASK_TYPES: tuple[str | None, ...] = (None, "CAUSAL_LM")
# Tensors of PEFT features OpenVINO GenAI skips: key marker -> what the tensor is.
SKIPPED_TENSORS = (
    (".lora_embedding_", "LoRA on an embedding layer"),
    (".lora_magnitude_vector", "a DoRA magnitude vector"),
    (".trainable_tokens_delta", "trained token rows"),
)
# adapter_config.json options whose non-default values OpenVINO GenAI would not apply:
# option -> (values that change nothing, what the adapter would lose).
UNEXPORTABLE_OPTIONS: dict[str, tuple[tuple[object, ...], str]] = {
    "use_dora": ((False, None), "DoRA's magnitude vectors"),
    "lora_bias": ((False, None), "the bias of lora_B"),
    "bias": (("none", None), "the trained biases of the base layers"),
    "trainable_token_indices": ((None, [], {}), "the trained token rows"),
    "target_parameters": ((None, []), "LoRA on parameters (e.g. MoE experts)"),
    "layer_replication": ((None, []), "the replicated layers"),
    "alora_invocation_tokens": ((None, []), "aLoRA's activation on its invocation tokens"),
    "arrow_config": ((None,), "Arrow's routing between adapters"),
    "use_qalora": ((False, None), "QALoRA's pooled inputs"),
}
# Options OpenVINO GenAI may run in part, but this export is not tested with:
# option -> (values that change nothing, what the adapter holds).
UNCHECKED_OPTIONS: dict[str, tuple[tuple[object, ...], str]] = {
    "fan_in_fan_out": ((False, None), "transformers Conv1D layers (as in GPT-2)"),
    "modules_to_save": (
        (None, []),
        "modules saved whole (OpenVINO GenAI swaps in saved lm_head and embed_tokens weights "
        "only; other saved modules would be dropped)",
    ),
}


def _refuse_options(config: Mapping[str, Any], source: Path) -> None:
    for option, (allowed, lost) in UNEXPORTABLE_OPTIONS.items():
        if config.get(option) not in allowed:
            raise ExportError(
                f"Adapter {source} sets {option}={config[option]!r}; OpenVINO GenAI applies "
                f"only plain LoRA factors, so {lost} would be dropped. Fix: merge the adapter "
                "into its base with `lorakit merge` and export the merged model with "
                "optimum-intel instead."
            )
    for option, (allowed, holds) in UNCHECKED_OPTIONS.items():
        if config.get(option) not in allowed:
            raise ExportError(
                f"Adapter {source} sets {option}={config[option]!r}: it holds {holds}. "
                "`lorakit export` is tested against OpenVINO GenAI on the LoRA factors of "
                "Linear layers only, so it does not export this adapter. Fix: merge the "
                "adapter into its base with `lorakit merge` and export the merged model with "
                "optimum-intel instead."
            )
    if config.get("task_type") not in TASK_TYPES:
        raise ExportError(
            f"Adapter {source} has task_type={config['task_type']!r}; OpenVINO GenAI applies "
            f"adapters to text-generation models (task types {[t for t in TASK_TYPES if t]}). "
            "Fix: export a causal language model's adapter, or merge this one with "
            "`lorakit merge`."
        )


def _what_is(key: str, tensor: torch.Tensor) -> str | None:
    """What a tensor that is no Linear layer's LoRA factor is; None for a factor."""
    for marker, what in SKIPPED_TENSORS:
        if marker in key:
            return what
    if tensor.dim() > 2:
        return "LoRA on a convolution"
    if not key.startswith(MODEL_KEY_PREFIX) or not key.endswith(FACTOR_SUFFIXES):
        return "a saved module's or bias's weights, not a LoRA factor"
    return None


def _factor_pairs(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Module path -> (A key, B key); any other tensor, or a lone factor, is refused by name."""
    problems = {key: what for key, t in tensors.items() if (what := _what_is(key, t))}
    if problems:  # a feature's own tensor first (an embedding's LoRA, not its saved weight)
        key = min(problems, key=lambda k: not any(m in k for m, _ in SKIPPED_TENSORS))
        raise ExportError(
            f"The adapter file holds {key!r} (shape {tuple(tensors[key].shape)}): "
            f"{problems[key]}. OpenVINO GenAI applies the LoRA factors of Linear layers only "
            "and would skip it. Fix: merge the adapter into its base with `lorakit merge` and "
            "export the merged model with optimum-intel."
        )
    pairs: dict[str, list[str | None]] = {}
    for key in tensors:
        suffix = next(s for s in FACTOR_SUFFIXES if key.endswith(s))
        path = key[len(MODEL_KEY_PREFIX) : -len(suffix)]
        pair = pairs.setdefault(path, [None, None])
        pair[FACTOR_SUFFIXES.index(suffix)] = key
    complete: dict[str, tuple[str, str]] = {}
    for path, (a_key, b_key) in pairs.items():
        if a_key is None or b_key is None:
            raise ExportError(
                f"The adapter file holds only one of lora_A and lora_B for {path!r}. Fix: "
                "restore the file from the original save."
            )
        complete[path] = (a_key, b_key)
    return complete


def folded_scales(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, float]:
    """Each adapted module's scale s, as lorakit applies it (module path -> s).

    s = alpha / r, or alpha / sqrt(r) with `use_rslora`; r and alpha come from `rank_pattern`
    and `alpha_pattern` when one names the module, else from `r` and `lora_alpha`.

    Raises:
        ExportError: A tensor is not a Linear layer's LoRA factor, a factor lacks its pair, or
            a module's A has another number of rows than the rank its config gives it.
    """
    scales: dict[str, float] = {}
    for path, (a_key, _) in _factor_pairs(tensors).items():
        r = int(pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8)))
        if tensors[a_key].shape[0] != r:
            raise ExportError(
                f"adapter_config.json gives {path!r} rank {r}, but its lora_A has "
                f"{tensors[a_key].shape[0]} rows. Fix: use the adapter_config.json saved with "
                "these weights."
            )
        alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
        scales[path] = lora_scale(alpha, r, bool(config.get("use_rslora", False)))
    return scales


def fold_scales(
    tensors: Mapping[str, torch.Tensor], scales: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """The adapter's tensors with each B multiplied by its module's scale (B' = s · B).

    Args:
        tensors: The adapter file's tensors (PEFT keys).
        scales: Module path -> s, as `folded_scales` returns.

    Returns:
        The same keys; B' is formed in float32 (float64 for float64 factors) and stored in B's
        dtype, A is unchanged.
    """
    folded = dict(tensors)
    for path, scale in scales.items():
        B = tensors[f"{MODEL_KEY_PREFIX}{path}{FACTOR_SUFFIXES[1]}"]
        wide = B.double() if B.dtype == torch.float64 else B.float()
        folded[f"{MODEL_KEY_PREFIX}{path}{FACTOR_SUFFIXES[1]}"] = (wide * scale).to(B.dtype)
    return folded


def unit_scale_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with s = 1 for every module: lora_alpha = r, alpha_pattern = rank_pattern.

    rsLoRA is turned off (its s would be sqrt(r)); the user's dict is not changed.
    """
    exported = dict(config)
    exported["lora_alpha"] = config.get("r", 8)
    exported["alpha_pattern"] = dict(config.get("rank_pattern") or {})
    exported["use_rslora"] = False
    return exported


def _check_target(source: Path, out: Path) -> None:
    """Refuses an `out` whose replacement would delete the adapter or a folder of the user's."""
    inside, outside = source.resolve(), out.resolve()
    if outside == inside or inside in outside.parents or outside in inside.parents:
        raise ExportError(
            f"The export folder {out} is the adapter folder {source}, inside it or holds it. "
            "Fix: pass a folder apart from the adapter's."
        )
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder. Fix: pass another path.")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_NOTE).is_file():
        raise ExportError(
            f"{out} exists and is not a folder `lorakit export` wrote (no {EXPORT_NOTE}); it "
            "would be replaced as a whole. Fix: pass a new folder, or delete this one first."
        )


def to_openvino(adapter_dir: PathLike, out_dir: PathLike) -> Path:
    """Writes a copy of a LoRA adapter that OpenVINO GenAI runs as trained at alpha 1.0.

    The copy has the same tensor names (PEFT's, which OpenVINO GenAI's LLM pipeline matches to
    its layers) with each B scaled by its module's s, and a config with s = 1 (see the module
    docstring). `out_dir` is built under a temporary name and renamed into place, replacing an
    earlier export there.

    Args:
        adapter_dir: A PEFT adapter folder (adapter_config.json, adapter_model.safetensors).
        out_dir: The folder to write; new, empty, or an earlier export.

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ExportError: The adapter uses a feature OpenVINO GenAI would not apply (named), holds
            tensors in a dtype it cannot read, or `out_dir` is not a folder it may replace.
        AdapterFileError: The folder or its files are missing or corrupt (from lorakit.io).
    """
    source, out = Path(adapter_dir), Path(out_dir)
    tensors, config = load_adapter_files(source)
    _refuse_options(config, source)
    unreadable = {k: t.dtype for k, t in tensors.items() if t.dtype not in READABLE_DTYPES}
    if unreadable:
        key, dtype = next(iter(unreadable.items()))
        raise ExportError(
            f"The adapter file holds {key!r} as {dtype}; OpenVINO GenAI reads float32, float16 "
            "and bfloat16 adapters. Fix: save the adapter in float32."
        )
    scales = folded_scales(tensors, config)
    folded = fold_scales(tensors, scales)
    note = {"runtime": RUNTIME, "source": str(source), "alpha": 1.0, "folded_scales": scales}
    _check_target(source, out)
    with replace_folder(out) as staging:
        save_adapter_files(staging, DEFAULT_ADAPTER_NAME, folded, unit_scale_config(config))
        write_text(staging / EXPORT_NOTE, json.dumps(note, indent=2) + "\n")
    return out
