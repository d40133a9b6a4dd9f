"""`layer_replication`: a deeper model built from the base's own decoder layers, weights shared.

`[[0, 4], [2, 5]]` turns layers `[0, 1, 2, 3, 4]` into `[0, 1, 2, 3, 2, 3, 4]`: each range is
`[start, end)` over the base's layer list. Every new layer is a new module object (so LoRA
wraps each one separately and each gets its own adapters) whose parameters ARE the parameters
of the layer it repeats: nothing is copied, the model grows only by its adapters. The layer
list is found where PEFT looks for it (`model[.model]*.layers`, `.bert.encoder.layer`,
`.encoder.layer`, `.h`), so a saved adapter's keys name the same layers in both libraries.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..layers.base import LoraLayer
from ..layers.modules_to_save import ModulesToSaveWrapper

LayerMap = Sequence[Sequence[int]]
# transformers' attention modules read their cache slot from this attribute.
LAYER_INDEX_ATTRIBUTE = "layer_idx"


@dataclass
class Replication:
    """A done replication, with what `undo` needs to put the base's layers back."""

    owner: nn.Module
    attribute: str
    original_layers: nn.ModuleList
    config: object | None
    original_num_hidden_layers: int | None

    def undo(self) -> None:
        """Restore the original layer list and `config.num_hidden_layers`."""
        setattr(self.owner, self.attribute, self.original_layers)
        if self.original_num_hidden_layers is not None:
            self.config.num_hidden_layers = self.original_num_hidden_layers  # type: ignore[union-attr]


def find_layer_list(model: nn.Module) -> tuple[nn.Module, nn.Module, str, nn.ModuleList]:
    """The inner model (holding `config`), the module holding the decoder layers, the
    attribute name, and the layer list.

    Raises:
        ConfigError: No layer list where PEFT looks for one.
    """
    inner = model
    while isinstance(getattr(inner, "model", None), nn.Module):
        inner = getattr(inner, "model")  # noqa: B009 (typed as a Module just above)
    bert = getattr(inner, "bert", None)
    if isinstance(bert, nn.Module):
        inner = bert
    candidates: list[tuple[nn.Module, str]] = [(inner, "layers")]
    encoder = getattr(inner, "encoder", None)
    if isinstance(encoder, nn.Module):
        candidates.append((encoder, "layer"))
    candidates.append((inner, "h"))
    for owner, attribute in candidates:
        layers = getattr(owner, attribute, None)
        if isinstance(layers, nn.ModuleList):
            return inner, owner, attribute, layers
    raise ConfigError(
        f"layer_replication: no decoder layer list in this {type(model).__name__} (looked for "
        "`.layers` under `.model`, `.encoder.layer` and `.h`, as PEFT does). Fix: remove "
        "layer_replication, or use a Llama-, BERT- or Falcon-like model."
    )


def check_layer_map(layer_map: LayerMap, num_layers: int) -> None:
    """Raise unless every range is `[start, end)` with 0 <= start < end <= num_layers."""
    for pair in layer_map:
        start, end = pair
        if not 0 <= start < end <= num_layers:
            raise ConfigError(
                f"layer_replication={[list(p) for p in layer_map]!r}: range {list(pair)!r} is "
                f"not [start, end) within the base's {num_layers} layers. Fix: use ranges with "
                f"0 <= start < end <= {num_layers}."
            )


def replicate_layers(model: nn.Module, layer_map: LayerMap) -> Replication:
    """Replace the base's layer list by the replicated one (parameters shared, not copied).

    Each new layer's submodules that carry `layer_idx` get their new position, so a KV
    cache keeps one slot per layer; `config.num_hidden_layers` becomes the new count.

    Returns:
        The record to `undo` the change with.

    Raises:
        ConfigError: No layer list, or a range outside it (nothing is changed then).
    """
    inner, owner, attribute, layers = find_layer_list(model)
    config = getattr(inner, "config", None)
    check_layer_map(layer_map, len(layers))
    new_layers: list[nn.Module] = []
    for start, end in layer_map:
        for index in range(start, end):
            clone = _shared_clone(layers[index], config)
            for submodule in clone.modules():
                if hasattr(submodule, LAYER_INDEX_ATTRIBUTE):
                    setattr(submodule, LAYER_INDEX_ATTRIBUTE, len(new_layers))
            new_layers.append(clone)
    original_count = getattr(config, "num_hidden_layers", None)
    if not isinstance(original_count, int):
        original_count = None
    setattr(owner, attribute, nn.ModuleList(new_layers))
    if original_count is not None:
        config.num_hidden_layers = len(new_layers)  # type: ignore[union-attr]
    return Replication(owner, attribute, layers, config, original_count)


def _shared_clone(layer: nn.Module, config: object | None) -> nn.Module:
    """A copy of `layer`'s module tree whose parameters are the very same tensors.

    The parameters (and the model's config, which attention modules keep a reference to) go
    in deepcopy's memo, so they are never copied, not even briefly.
    """
    memo: dict[int, object] = {id(parameter): parameter for parameter in layer.parameters()}
    if config is not None:
        memo[id(config)] = config
    return copy.deepcopy(layer, memo)


# Set on the user's model once its layers are replicated: the map used. It lives with the
# layers, so it survives `unload`, deep copies and the adapters' deletion.
REPLICATED_MAP_ATTRIBUTE = "_lorakit_layer_replication"


def replicated_map(model: nn.Module) -> list[list[int]] | None:
    """The `layer_replication` map `model`'s layers were built with, or None."""
    value = model.__dict__.get(REPLICATED_MAP_ATTRIBUTE)
    return None if value is None else [list(pair) for pair in value]


@contextmanager
def layers_replicated(model: nn.Module, layer_map: LayerMap | None) -> Iterator[None]:
    """Replicate `model`'s layers for a new adapter; undone if the block raises.

    The block plans the adapter on the replicated layers, so a config that does not fit
    leaves the model as it was. A model already replicated with this map is left alone (a
    further adapter, or a reload, of the same deeper model).

    Raises:
        ConfigError: The model is replicated with another map, or already holds adapters
            (replicating would copy their layers' adapters), or the map does not fit.
    """
    wanted = None if layer_map is None else [list(pair) for pair in layer_map]
    done = replicated_map(model)
    if wanted is None or wanted == done:
        yield
        return
    if done is not None:
        raise ConfigError(
            f"layer_replication={wanted!r}: this model's layers are already replicated with "
            f"{done!r}. Fix: use the same layer_replication (or None) for every adapter."
        )
    if any(isinstance(module, (LoraLayer, ModulesToSaveWrapper)) for module in model.modules()):
        raise ConfigError(
            f"layer_replication={wanted!r} on a model that already holds adapters: the new "
            "layers would share those adapters. Fix: set layer_replication on the first "
            "adapter (get_peft_model), or on none."
        )
    replication = replicate_layers(model, wanted)
    try:
        yield
    except BaseException:
        replication.undo()
        raise
    model.__dict__[REPLICATED_MAP_ATTRIBUTE] = wanted
