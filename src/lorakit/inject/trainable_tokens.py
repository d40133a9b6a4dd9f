"""Where `trainable_token_indices` puts its wrappers, and which output layers stay tied.

The rules are PEFT's: a list of ids targets the model's input embedding (or a module named
`embed_tokens`); a dict names modules (a module whose path ends with the name) with their ids.
When the model ties its output embeddings to the input embedding (`tie_word_embeddings`),
each tied layer gets a wrapper reading the embedding's new rows, so both change together;
with a dict naming both with different ids they are trained apart instead, or, with
`ensure_weight_tying=True`, refused. Everything is decided before anything is changed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError
from ..io.keys import EMBEDDING_LAYER_NAMES
from ..layers.routing import AdapterRouting
from ..layers.trainable_tokens import TrainableTokensWrapper
from .matching import InjectionPlan, iter_base_modules
from .surgery import replace_module

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_NAME = "embed_tokens"


@dataclass(frozen=True)
class TokenTarget:
    """One module to wrap: its path, the token ids, and the path of the wrapper it is tied to."""

    key: str
    indices: tuple[int, ...]
    tied_to: str | None = None


def plan_trainable_tokens(
    model: nn.Module, config: LoraConfig, plan: InjectionPlan
) -> tuple[TokenTarget, ...]:
    """The wrappers `config.trainable_token_indices` asks for (none if unset); changes nothing.

    Raises:
        ConfigError: A name matches no module, a module is also adapted by LoRA or trained
            whole, an id is outside the table, or tied layers get different ids under
            `ensure_weight_tying=True`.
    """
    check_weight_tying_options(model, config)
    spec = config.trainable_token_indices
    if spec is None:
        return ()
    wanted = dict(spec) if isinstance(spec, Mapping) else {_input_embedding_key(model): spec}
    for name in wanted:
        if any(name in saved for saved in config.modules_to_save or ()):
            raise ConfigError(
                f"trainable_token_indices names {name!r}, which modules_to_save also trains "
                "whole. Fix: keep it in one of the two."
            )
    modules = dict(iter_base_modules(model))
    embedding_key = _input_embedding_key(model)
    tied_keys = tied_output_keys(model) if _ties_embeddings(model) else []
    mismatch = _tied_ids_differ(wanted, embedding_key, tied_keys)
    if mismatch and config.ensure_weight_tying:
        raise ConfigError(
            f"ensure_weight_tying=True, but trainable_token_indices={spec!r} gives the tied "
            f"layers {[embedding_key, *tied_keys]} different token ids. Fix: give them the "
            "same ids, or set ensure_weight_tying=False to train them apart."
        )
    skipped = set() if mismatch else {key for key in tied_keys if _named_in(key, wanted)}
    targets: list[TokenTarget] = []
    for name, indices in wanted.items():
        keys = [key for key in modules if key.endswith(name) and key not in skipped]
        if not keys and not any(key.endswith(name) for key in skipped):
            raise ConfigError(
                f"trainable_token_indices names {name!r}, which matches no module path. Fix: "
                f"use the path (or its end) of an embedding, e.g. {embedding_key!r}."
            )
        targets += [TokenTarget(key, _checked_ids(key, modules[key], indices)) for key in keys]
    wrapped = {target.key for target in targets}
    if embedding_key in wrapped and not mismatch:
        ids = next(target.indices for target in targets if target.key == embedding_key)
        targets += [TokenTarget(key, ids, embedding_key) for key in tied_keys]
    _check_not_adapted(targets, plan)
    return tuple(targets)


def apply_trainable_tokens(
    model: nn.Module,
    targets: tuple[TokenTarget, ...],
    adapter_name: str,
    routing: AdapterRouting,
) -> None:
    """Wrap (or extend) each planned module with the adapter's token rows."""
    for target in targets:
        module = model.get_submodule(target.key)
        if not isinstance(module, TrainableTokensWrapper):
            source = None
            if target.tied_to is not None:
                tied_to = model.get_submodule(target.tied_to)
                assert isinstance(tied_to, TrainableTokensWrapper), "the embedding goes first"
                source = tied_to
            module = TrainableTokensWrapper(module, routing, source)
            replace_module(model, target.key, module)
        module.add_adapter(adapter_name, list(target.indices))


def check_weight_tying_options(model: nn.Module, config: LoraConfig) -> None:
    """`ensure_weight_tying` as PEFT reads it for LoRA and `modules_to_save`.

    Tying the adapters of a LoRA-adapted or wholly trained embedding to its tied output
    layer is not implemented: that combination raises. With no tied layers, or nothing of
    the embeddings adapted, the option does nothing, as in PEFT (with its warning).

    Raises:
        ConfigError: `ensure_weight_tying=True` on a tied model whose embedding layers are
            in `target_modules` or `modules_to_save`.
    """
    if not config.ensure_weight_tying:
        return
    tied = tied_output_keys(model) if _ties_embeddings(model) else []
    adapted = _names_embedding(config.target_modules) or _names_embedding(config.modules_to_save)
    if tied and adapted:
        raise ConfigError(
            f"ensure_weight_tying=True with an embedding layer in target_modules="
            f"{config.target_modules!r} or modules_to_save={config.modules_to_save!r}: tying "
            "those adapters to the tied layers is not implemented. Fix: use "
            "trainable_token_indices, or set ensure_weight_tying=False."
        )
    if not tied:
        logger.warning("ensure_weight_tying=True, but the model has no tied weights.")
    elif config.trainable_token_indices is None:
        logger.warning("ensure_weight_tying=True, but no tied module is adapted.")


def tied_output_keys(model: nn.Module) -> list[str]:
    """Paths of the modules whose weight is the input embedding's very tensor (`lm_head`)."""
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    weight = getattr(_unwrapped(embedding), "weight", None)
    if weight is None:
        return []
    return sorted(
        key
        for key, module in iter_base_modules(model)
        if _unwrapped(module) is not _unwrapped(embedding)
        and getattr(_unwrapped(module), "weight", None) is weight
    )


def _unwrapped(module: object) -> object:
    if isinstance(module, TrainableTokensWrapper):
        return module.original_module
    return module


def _ties_embeddings(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False))


def _input_embedding_key(model: nn.Module) -> str:
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    for key, module in iter_base_modules(model):
        if module is embedding:
            return key
    return DEFAULT_EMBEDDING_NAME


def _named_in(key: str, wanted: Mapping[str, object]) -> bool:
    return any(key.endswith(name) or name in key.split(".") for name in wanted)


def _tied_ids_differ(
    wanted: Mapping[str, list[int]], embedding_key: str, tied_keys: list[str]
) -> bool:
    """Whether the dict gives the embedding and a layer tied to it different ids."""
    if len(wanted) < 2 or not tied_keys:
        return False
    tied_names = [
        name
        for name in wanted
        if embedding_key.endswith(name) or any(_named_in(key, {name: 0}) for key in tied_keys)
    ]
    return len(tied_names) >= 2 and any(wanted[n] != wanted[tied_names[0]] for n in tied_names)


def _checked_ids(key: str, module: nn.Module, indices: object) -> tuple[int, ...]:
    rows = getattr(_unwrapped(module), "weight", None)
    count = None if rows is None else int(rows.shape[0])
    is_ints = isinstance(indices, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in indices
    )
    if not is_ints or not indices or count is None:
        raise ConfigError(
            f"trainable_token_indices for {key!r} = {indices!r}: give a non-empty list of "
            "token ids (ints) of an embedding or linear layer."
        )
    assert isinstance(indices, (list, tuple))
    bad = [i for i in indices if not 0 <= i < count]
    if bad or len(set(indices)) != len(indices):
        raise ConfigError(
            f"trainable_token_indices for {key!r} = {list(indices)!r}: ids must be distinct "
            f"and in [0, {count}); got {bad or 'repeats'}. Fix: use ids of the vocabulary."
        )
    return tuple(indices)


def _check_not_adapted(targets: list[TokenTarget], plan: InjectionPlan) -> None:
    adapted = {target.key for target in plan.targets} | set(plan.modules_to_save)
    for target in targets:
        if target.key in adapted:
            raise ConfigError(
                f"trainable_token_indices would wrap {target.key!r}, which this adapter also "
                "adapts with LoRA or trains whole (target_modules / modules_to_save). Fix: "
                "remove it from one of them."
            )


def _names_embedding(names: list[str] | str | None) -> bool:
    if names is None:
        return False
    if isinstance(names, str):
        return any(name in names for name in EMBEDDING_LAYER_NAMES)
    return any(name.split(".")[-1] in EMBEDDING_LAYER_NAMES for name in names)
