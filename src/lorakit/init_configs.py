"""`EvaConfig` and `CordaConfig`: the options of the two data-driven initialisations.

Field names, defaults and meanings are PEFT's, so `LoraConfig(eva_config=...)` and
`LoraConfig(corda_config=...)` written by either library load in the other. Both are used by
a call that runs data through the model: `lorakit.initialize_lora_eva_weights` for EVA (after
`get_peft_model`), `lorakit.preprocess_corda` for CorDA (before it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from .errors import ConfigError

logger = logging.getLogger(__name__)

CordaMethod = Literal["ipm", "kpm"]
CORDA_METHODS: tuple[str, ...] = ("ipm", "kpm")


@dataclass
class EvaConfig:
    """Options of EVA (Explained Variance Adaptation, `init_lora_weights="eva"`).

    EVA sets each adapter's A to the top right-singular vectors of the layer's inputs on some
    data (B stays zero), and gives the ranks to the layers whose inputs those vectors explain
    best, keeping the total.

    Attributes:
        rho: Largest rank a layer may get, as a multiple of its configured rank (>= 1; 1 keeps
            every rank as configured).
        tau: A layer's components are final once each one's cosine similarity to the
            previous batch's is at least tau (in [0, 1]).
        use_label_mask: Leave out the positions whose `labels` equal `label_mask_value`.
        label_mask_value: The label of positions left out (-100).
        whiten: Divide each component by the square root of its singular value.
        adjust_scaling_factors: Scale a layer's lora_alpha by new rank / old rank, so its
            scale stays lora_alpha / r.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if not _is_real(self.rho) or not self.rho >= 1.0:
            raise ConfigError(f"eva_config.rho={self.rho!r}: must be a number >= 1.0, e.g. 2.0.")
        if not _is_real(self.tau) or not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"eva_config.tau={self.tau!r}: must be a number in [0, 1].")
        for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"eva_config.{name}={getattr(self, name)!r}: must be a bool.")
        if not isinstance(self.label_mask_value, int) or isinstance(self.label_mask_value, bool):
            raise ConfigError(
                f"eva_config.label_mask_value={self.label_mask_value!r}: must be an int, e.g. -100."
            )


@dataclass
class CordaConfig:
    """Options of CorDA (context-oriented decomposition, `init_lora_weights="corda"`).

    CorDA decomposes W·C, C the covariance of the layer's inputs on some data, and builds the
    adapter from r of its singular triplets; W becomes the residual, so the model starts
    unchanged (like PiSSA).

    Attributes:
        cache_file: Where `preprocess_corda` saves the per-layer decomposition (and reads it
            back instead of running the model, when the file exists).
        covariance_file: Where it saves the per-layer covariances (and reads them back,
            when the file exists: a new rank needs no new pass over the data).
        corda_method: "ipm" (instruction-previewed: the r largest triplets, the adapter
            holds what the data uses most) or "kpm" (knowledge-preserved: the r smallest,
            the base keeps what the data uses).
        verbose: Log each layer as it is decomposed.
        use_float16_for_covariance: Accumulate the covariance in the inputs' own dtype
            (half the memory with a float16 model) instead of float32.
        prune_temporary_fields: Delete the covariance from each layer once decomposed.
    """

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: CordaMethod = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        for name in ("cache_file", "covariance_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"corda_config.{name}={value!r}: must be a path string or None.")
        if self.corda_method not in CORDA_METHODS:
            raise ConfigError(
                f"corda_config.corda_method={self.corda_method!r}: allowed values are "
                f"{list(CORDA_METHODS)}."
            )
        for name in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"corda_config.{name}={getattr(self, name)!r}: must be a bool.")


SubConfig = TypeVar("SubConfig", EvaConfig, CordaConfig)


def parse_sub_config(name: str, value: object, config_class: type[SubConfig]) -> SubConfig | None:
    """None, an instance of `config_class` (copied), or one built from a dict or any object
    with the same fields (peft's `EvaConfig` / `CordaConfig`).

    Raises:
        ConfigError: `value` is none of these, or has a field `config_class` lacks.
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        fields: dict[str, Any] = dict(value)
    elif hasattr(value, "__dataclass_fields__"):
        fields = {key: getattr(value, key) for key in value.__dataclass_fields__}
    else:
        raise ConfigError(
            f"{name}={value!r}: must be a {config_class.__name__}, a dict of its fields or None."
        )
    known = set(config_class.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(
            f"{name} has fields {unknown} that lorakit does not know; allowed: {sorted(known)}. "
            "Fix: remove them."
        )
    return config_class(**fields)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The init each sub-config belongs to.
SUB_CONFIG_INITS: dict[str, str] = {"eva_config": "eva", "corda_config": "corda"}


def drop_unused_sub_configs(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict without the `eva_config` / `corda_config` its `init_lora_weights` does
    not use.

    PEFT keeps `corda_config` when `save_pretrained(path_initial_model_for_weight_conversion=
    ...)` rewrites a CorDA adapter as plain LoRA (`init_lora_weights=True`): in such a file
    the sub-config only records how the adapter was first made and selects nothing, so it
    is dropped (with a log line) where a `LoraConfig` built directly would refuse it.
    """
    result = dict(data)
    init = result.get("init_lora_weights", True)
    for name, owner in SUB_CONFIG_INITS.items():
        if result.get(name) is not None and init != owner:
            logger.warning(
                "%s dropped: init_lora_weights=%r does not use it (a record of how peft or "
                "lorakit made the adapter before converting it)",
                name,
                init,
            )
            del result[name]
    return result
