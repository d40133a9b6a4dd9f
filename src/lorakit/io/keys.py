"""PEFT's adapter state-dict keys, both ways: the one place in lorakit that knows them.

A `PeftModel`'s state dict names adapter tensors with the adapter name inside the key
(`...q_proj.lora_A.default.weight`); PEFT's `adapter_model.safetensors` drops it
(`...q_proj.lora_A.weight`) so one file can be loaded under any name. `adapter_state_dict`
selects and renames what PEFT writes for one adapter; `model_keys_for` maps a file back onto a
model's keys and refuses, before anything is loaded, a file that does not fit.

Rules PEFT follows and lorakit reproduces (checked against `peft` in tests/io):

- LoRA tensors: the adapter name is removed (`lora_A.<name>.weight` -> `lora_A.weight`,
  `lora_embedding_A.<name>` -> `lora_embedding_A`, DoRA's `lora_magnitude_vector.<name>.weight`
  -> `lora_magnitude_vector`). Other adapters' tensors are never saved.
- `modules_to_save` at path P: `P.modules_to_save.<name>.<rest>` is saved as `P.<rest>`.
- `bias="all"`: every tensor whose key ends in `bias` is saved too, with PEFT's textual
  name removal, which also writes a copy of each saved head's bias (`P.modules_to_save.bias`).
- `bias="lora_only"`: the `base_layer.bias` of every LoRA-wrapped module.
- Trainable tokens at path P: `P.token_adapter.trainable_tokens_delta.<name>` is saved as
  `P.token_adapter.trainable_tokens_delta` (a tied output layer saves nothing of its own).
- Embedding layers, when saved (see `embedding_prefixes_to_save`), go in under their own keys.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lorakit.io.errors import AdapterMismatch, AdapterMismatchError, ShapeMismatch

logger = logging.getLogger(__name__)

BiasMode = Literal["none", "all", "lora_only"]
BIAS_MODES: tuple[str, ...] = ("none", "all", "lora_only")
MODEL_KEY_PREFIX = "base_model.model."
MODULES_TO_SAVE = "modules_to_save"
LORA_MAGNITUDE = "lora_magnitude_vector"
TOKENS_DELTA = "trainable_tokens_delta"
ADAPTER_CONTAINERS: tuple[str, ...] = (
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    LORA_MAGNITUDE,
    MODULES_TO_SAVE,
    TOKENS_DELTA,
)
# Module names PEFT treats as embeddings when deciding whether to save them.
EMBEDDING_LAYER_NAMES: tuple[str, ...] = ("embed_tokens", "lm_head")
ALL_LINEAR = "all-linear"
BASE_LAYER = "base_layer"
MAX_LISTED = 5

# First `<container>.<adapter name>` pair in a key, on whole dotted segments.
_CONTAINER_PATTERN = re.compile(r"(?:^|\.)(" + "|".join(ADAPTER_CONTAINERS) + r")\.([^.]+)")


@dataclass(frozen=True)
class _AdapterKey:
    """A model key split around its adapter container: `<module>.<container>.<adapter>.<rest>`."""

    module: str
    container: str
    adapter_name: str
    rest: str


def _split_adapter_key(key: str) -> _AdapterKey | None:
    match = _CONTAINER_PATTERN.search(key)
    if match is None:
        return None
    module = key[: max(match.start(1) - 1, 0)]
    rest = key[match.end() + 1 :]
    return _AdapterKey(module, match.group(1), match.group(2), rest)


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def _is_bias_key(key: str) -> bool:
    return key == "bias" or key.endswith(".bias")


def _strip_adapter_name_textually(key: str, adapter_name: str) -> str:
    """PEFT's generic name removal: drop `.<name>` at the end or just before the last segment."""
    suffix = f".{adapter_name}"
    if key.endswith(suffix):
        return key[: -len(suffix)]
    head, _, last = key.rpartition(".")
    if head.endswith(suffix):
        return f"{head[: -len(suffix)]}.{last}"
    return key


def _file_keys_of_adapter_key(
    key: str, parsed: _AdapterKey, *, with_bias_alias: bool
) -> tuple[str, ...]:
    """The file key(s) PEFT writes for one tensor of the adapter being saved."""
    if parsed.container == MODULES_TO_SAVE:
        file_key = _join(parsed.module, parsed.rest)
        if with_bias_alias and _is_bias_key(parsed.rest):
            alias = _strip_adapter_name_textually(key, parsed.adapter_name)
            return (file_key, alias)
        return (file_key,)
    rest = parsed.rest
    if parsed.container == LORA_MAGNITUDE and rest == "weight":
        rest = ""  # PEFT keeps DoRA's magnitude under its pre-ModuleDict name
    return (_join(parsed.module, parsed.container, rest),)


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias={bias!r} is not supported; use one of {list(BIAS_MODES)}.")


def _is_saved_base_key(key: str, bias: str, embedding_prefixes: tuple[str, ...]) -> bool:
    if bias == "all" and _is_bias_key(key):
        return True
    if bias == "lora_only" and key.endswith(f".{BASE_LAYER}.bias"):
        return True
    return key.startswith(embedding_prefixes)


def adapter_state_dict(
    model_state: Mapping[str, torch.Tensor],
    adapter_name: str,
    *,
    bias: BiasMode = "none",
    embedding_prefixes: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Returns exactly the tensors PEFT writes to `adapter_model.safetensors` for one adapter.

    The values are the model's own tensors (no copies); `save_adapter_files` makes them
    contiguous and unshared when writing.

    Args:
        model_state: A `PeftModel`'s `state_dict()` (keys start with `base_model.model.`).
        adapter_name: The adapter to save; its name is removed from the keys.
        bias: The adapter config's `bias` option.
        embedding_prefixes: Module paths (model keys without the trailing `.weight`) whose whole
            state is saved too, as returned by `embedding_prefixes_to_save`.

    Returns:
        File key -> tensor, keyed as in PEFT's files.

    Raises:
        ValueError: `bias` is not one of PEFT's values.
    """
    _check_bias(bias)
    prefixes = tuple(f"{prefix}." for prefix in embedding_prefixes)
    with_bias_alias = bias == "all"
    selected: dict[str, torch.Tensor] = {}
    for key, tensor in model_state.items():
        parsed = _split_adapter_key(key)
        if parsed is None:
            if _is_saved_base_key(key, bias, prefixes):
                selected[key] = tensor
        elif parsed.adapter_name == adapter_name:
            for file_key in _file_keys_of_adapter_key(key, parsed, with_bias_alias=with_bias_alias):
                selected[file_key] = tensor
    return selected


def _embedding_module_names(model_state_keys: Iterable[str]) -> set[str]:
    """Base-model module paths that end in one of PEFT's embedding layer names."""
    names: set[str] = set()
    for key in model_state_keys:
        parts = key.removeprefix(MODEL_KEY_PREFIX).split(".")
        for index, part in enumerate(parts[:-1]):
            if part in EMBEDDING_LAYER_NAMES:
                names.add(".".join(parts[: index + 1]))
    return names


def is_embedding_targeted(
    target_modules: str | Collection[str] | None, model_state_keys: Iterable[str]
) -> bool:
    """Whether PEFT would consider an embedding layer (`embed_tokens`, `lm_head`) targeted.

    PEFT's rule: a list of names targets an embedding when it names `embed_tokens` or
    `lm_head` literally; a regex (other than `"all-linear"`) when it fully matches the path of
    a module whose last part is one of those names.
    """
    if not target_modules:
        return False
    if isinstance(target_modules, str):
        if target_modules == ALL_LINEAR:
            return False
        candidates = _embedding_module_names(model_state_keys)
        return any(re.fullmatch(target_modules, name) for name in candidates)
    return any(name in target_modules for name in EMBEDDING_LAYER_NAMES)


def embedding_prefixes_to_save(
    save_embedding_layers: bool | Literal["auto"],
    *,
    target_modules: str | Collection[str] | None,
    embedding_paths: Sequence[str],
    model_state_keys: Collection[str],
    is_vocab_resized: bool = False,
) -> tuple[str, ...]:
    """Which embedding weights to save next to the adapter, by PEFT's rules.

    With `"auto"`, embeddings are saved when an embedding layer is targeted (then the base
    embedding under the LoRA wrapper is saved, as PEFT does) or when the vocabulary was
    resized (then the whole input and output embedding layers, so that the adapter reloads
    onto a base resized the same way). `True` saves them always, `False` never.

    Args:
        save_embedding_layers: `True`, `False` or `"auto"` (PEFT's `save_pretrained` option).
        target_modules: The adapter config's `target_modules`.
        embedding_paths: State-dict paths (with the `base_model.model.` prefix) of the modules
            returned by `get_input_embeddings()` and `get_output_embeddings()`, in that order;
            empty when the model has none.
        model_state_keys: The keys of the `PeftModel`'s `state_dict()`.
        is_vocab_resized: Whether the input embedding's row count differs from the vocabulary
            of the base named in `base_model_name_or_path`.

    Returns:
        Prefixes to pass to `adapter_state_dict(embedding_prefixes=...)`.
    """
    if save_embedding_layers is False:
        return ()
    is_targeted = is_embedding_targeted(target_modules, model_state_keys)
    if save_embedding_layers == "auto":
        if not (is_targeted or is_vocab_resized):
            return ()
        reason = "an embedding layer is targeted" if is_targeted else "the vocabulary was resized"
        logger.warning("Saving the embedding layers with the adapter because %s.", reason)
    if not embedding_paths:
        logger.warning("Embedding layers were requested but the model exposes none; skipping.")
    prefixes: list[str] = []
    for path in embedding_paths:
        wrapped_prefix = f"{path}.{BASE_LAYER}"
        is_wrapped = any(key.startswith(f"{wrapped_prefix}.") for key in model_state_keys)
        if not is_targeted:
            prefixes.append(path)
        elif is_wrapped:
            prefixes.append(wrapped_prefix)
    return tuple(prefixes)


def display_name(file_key: str) -> str:
    """A file key as users read it: no `base_model.model.` prefix, no trailing `.weight`."""
    name = file_key.removeprefix(MODEL_KEY_PREFIX)
    return name.removesuffix(".weight")


def _load_index(
    model_state_keys: Iterable[str], adapter_name: str
) -> tuple[dict[str, str], dict[str, str]]:
    """Maps file keys to model keys for one adapter name.

    Returns:
        (file key -> model key for everything a file may hold, model key -> its canonical file
        key for the adapter tensors a file must hold).
    """
    file_to_model: dict[str, str] = {}
    unwrapped_base: dict[str, str] = {}
    required: dict[str, str] = {}
    for key in model_state_keys:
        parsed = _split_adapter_key(key)
        if parsed is None:
            file_to_model[key] = key  # base tensors: saved biases and embeddings
            unwrapped_base.setdefault(_without_base_layer(key), key)
            continue
        if parsed.adapter_name != adapter_name:
            continue
        file_keys = _file_keys_of_adapter_key(key, parsed, with_bias_alias=True)
        for file_key in file_keys:
            file_to_model.setdefault(file_key, key)
        required[key] = file_keys[0]
    # A base tensor saved as `P.base_layer.bias` (P wrapped when saved) also fits `P.bias`
    # (P not wrapped now), and the other way round: it is the same base parameter.
    for unwrapped, key in unwrapped_base.items():
        file_to_model.setdefault(unwrapped, key)
        for wrapped in _wrapped_forms(unwrapped):
            file_to_model.setdefault(wrapped, key)
    return file_to_model, required


def _without_base_layer(key: str) -> str:
    return ".".join(part for part in key.split(".") if part != BASE_LAYER)


def _wrapped_forms(key: str) -> tuple[str, ...]:
    """`P.base_layer.<leaf>`: the key of a base tensor once its module is wrapped."""
    head, _, leaf = key.rpartition(".")
    return (f"{head}.{BASE_LAYER}.{leaf}",) if head else ()


def _is_redundant_head_bias(file_key: str, file_keys: Collection[str]) -> bool:
    """PEFT's `bias="all"` copy of a head bias saved under another adapter name.

    `P.modules_to_save.<name>.<rest>` (or `P.modules_to_save.bias`) duplicates `P.<rest>`,
    which the file holds too; it carries nothing of its own.
    """
    parsed = _split_adapter_key(file_key)
    if parsed is None or parsed.container != MODULES_TO_SAVE or not _is_bias_key(file_key):
        return False
    canonical = _join(parsed.module, parsed.rest or parsed.adapter_name)
    return canonical in file_keys


def _with_model_prefix(
    file_state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]
) -> Mapping[str, torch.Tensor]:
    """Adds or drops `base_model.model.` so file keys and model keys use the same form."""
    model_has_prefix = any(key.startswith(MODEL_KEY_PREFIX) for key in model_state)
    file_has_prefix = any(key.startswith(MODEL_KEY_PREFIX) for key in file_state)
    if model_has_prefix == file_has_prefix:
        return file_state
    if model_has_prefix:
        return {MODEL_KEY_PREFIX + key: value for key, value in file_state.items()}
    return {key.removeprefix(MODEL_KEY_PREFIX): value for key, value in file_state.items()}


def remap_keys(
    file_state: Mapping[str, torch.Tensor], key_mapping: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Renames a file's keys with PEFT's `key_mapping` (regex -> replacement), before matching.

    As in PEFT, each key is renamed without its `base_model.model.` (or `base_model.`) prefix,
    which is put back after; the first pattern, in order, that replaces anything in a key
    wins. Used for bases whose module names changed since the adapter was saved (transformers'
    `_checkpoint_conversion_mapping`).
    """
    patterns = [(re.compile(pattern), replacement) for pattern, replacement in key_mapping.items()]
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in file_state.items():
        prefix = next((p for p in (MODEL_KEY_PREFIX, "base_model.") if key.startswith(p)), "")
        rest = key.removeprefix(prefix)
        for pattern, replacement in patterns:
            new_rest, count = pattern.subn(replacement, rest)
            if count:
                rest = new_rest
                break
        renamed[prefix + rest] = tensor
    return renamed


def find_mismatches(
    file_state: Mapping[str, torch.Tensor],
    adapter_name: str,
    model_state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], AdapterMismatch]:
    """Maps a file's tensors onto model keys and lists everything that does not fit.

    Args:
        file_state: Tensors read from `adapter_model.safetensors` (PEFT keys).
        adapter_name: The name the adapter gets in the model; the model must already hold
            that adapter's (freshly initialised) tensors, which give the expected keys and
            shapes.
        model_state: The `PeftModel`'s `state_dict()` (or any key -> tensor mapping with
            the same keys and shapes).

    Returns:
        (model key -> file tensor for every key that fits, the problems found).
    """
    file_state = _with_model_prefix(file_state, model_state)
    file_to_model, required = _load_index(model_state.keys(), adapter_name)
    matched_file_keys = file_state.keys() & file_to_model.keys()
    mapped: dict[str, torch.Tensor] = {}
    wrong_shape: set[str] = set()
    mismatch = AdapterMismatch()
    for file_key, tensor in file_state.items():
        model_key = file_to_model.get(file_key)
        if model_key is None:
            if not _is_redundant_head_bias(file_key, matched_file_keys):
                mismatch.unexpected.append(display_name(file_key))
            continue
        model_shape = tuple(model_state[model_key].shape)
        if tuple(tensor.shape) != model_shape:
            shape = ShapeMismatch(display_name(file_key), tuple(tensor.shape), model_shape)
            mismatch.shapes.append(shape)
            wrong_shape.add(model_key)
            continue
        mapped.setdefault(model_key, tensor)
    for model_key, file_key in required.items():
        if model_key not in mapped and model_key not in wrong_shape:
            mismatch.missing.append(display_name(file_key))
    return mapped, mismatch


def _listing(names: Sequence[str]) -> str:
    shown = "; ".join(names[:MAX_LISTED])
    rest = len(names) - MAX_LISTED
    return f"{shown}; and {rest} more" if rest > 0 else shown


def describe_mismatch(mismatch: AdapterMismatch, adapter_name: str, source: str | None) -> str:
    """The message of an `AdapterMismatchError`: first few problems of each kind, then the fix."""
    origin = f" from {source}" if source else ""
    lines = [f"Adapter {adapter_name!r}{origin} does not fit this model:"]
    if mismatch.shapes:
        described = [shape.describe() for shape in mismatch.shapes]
        lines.append(f"- {len(described)} shape mismatch(es): {_listing(described)}")
    if mismatch.unexpected:
        count = len(mismatch.unexpected)
        lines.append(
            f"- {count} tensor(s) in the file match no module of the model: "
            f"{_listing(mismatch.unexpected)}"
        )
    if mismatch.missing:
        count = len(mismatch.missing)
        lines.append(
            f"- {count} adapted tensor(s) have no weights in the file: {_listing(mismatch.missing)}"
        )
    lines.append(
        "Fix: load the adapter onto the base model it was trained on (its adapter_config.json "
        "names it in base_model_name_or_path), with the adapter_config.json saved next to "
        "these weights."
    )
    return "\n".join(lines)


def model_keys_for(
    file_state: Mapping[str, torch.Tensor],
    adapter_name: str,
    model_state: Mapping[str, torch.Tensor],
    *,
    source: str | None = None,
) -> dict[str, torch.Tensor]:
    """Maps an adapter file's tensors to the model's keys, refusing a file that does not fit.

    Nothing is changed: the caller loads the returned mapping only when this returns.

    Args:
        file_state: Tensors read from `adapter_model.safetensors` (PEFT keys).
        adapter_name: The name the adapter gets in the model (may differ from the saved one).
        model_state: The `PeftModel`'s `state_dict()`, already holding that adapter's tensors.
        source: Where the file came from, for the error message.

    Returns:
        Model key -> tensor from the file, ready for `load_state_dict(..., strict=False)`.

    Raises:
        AdapterMismatchError: File keys that match no module, adapter tensors with no weights
            in the file, or shape mismatches; the message lists the first few of each.
    """
    mapped, mismatch = find_mismatches(file_state, adapter_name, model_state)
    if mismatch:
        raise AdapterMismatchError(describe_mismatch(mismatch, adapter_name, source), mismatch)
    return mapped


def lora_module_paths(state_keys: Iterable[str]) -> list[str]:
    """Paths of the modules holding LoRA tensors in a PEFT state dict, in first-seen order.

    Works on file keys and model keys alike; the `base_model.model.` prefix is dropped and
    `modules_to_save` copies are not LoRA modules.
    """
    paths: dict[str, None] = {}
    for key in state_keys:
        parsed = _split_adapter_key(key)
        if parsed is not None and parsed.container not in (MODULES_TO_SAVE, TOKENS_DELTA):
            paths[parsed.module.removeprefix(MODEL_KEY_PREFIX)] = None
    return list(paths)
