"""`LoraConfig`, `TaskType` and `LoftQConfig`: the options of an adapter, validated once.

Every option is documented here and only here. Field names and meanings are PEFT's, so a
config written by peft loads and a config written by lorakit loads in peft.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias

from .config_files import ConfigFilesMixin
from .errors import ConfigError
from .init_configs import CordaConfig, EvaConfig, drop_unused_sub_configs, parse_sub_config

BiasMode = Literal["none", "all", "lora_only"]
BIAS_MODES: tuple[str, ...] = ("none", "all", "lora_only")
INIT_NAMES: tuple[str, ...] = (
    "gaussian",
    "loftq",
    "pissa",
    "olora",
    "orthogonal",
    "eva",
    "corda",
)
PISSA_NITER_PATTERN = re.compile(r"pissa_niter_(\d+)")  # randomized SVD, N subspace iterations
PEFT_TYPE = "LORA"


class PeftConfigLike(Protocol):
    """What lorakit reads from a `peft.LoraConfig`: its method name and its fields as a dict."""

    peft_type: Any

    def to_dict(self) -> dict[str, Any]: ...


ConfigSource: TypeAlias = "LoraConfig | Mapping[str, Any] | PeftConfigLike"
"""What `get_peft_model`, `add_adapter` and `from_pretrained(config=...)` take as a config."""


class TaskType(str, enum.Enum):
    """What the base model does; decides which heads train and how `PeftModel` is used."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


@dataclass
class LoftQConfig:
    """Options of LoftQ initialisation (used with `init_lora_weights="loftq"`).

    Attributes:
        loftq_bits: Bits of the quantized base the adapter compensates for (4).
        loftq_iter: Alternating quantize / low-rank-fit iterations.
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if self.loftq_bits != 4:
            raise ConfigError(f"loftq_bits={self.loftq_bits!r}: only 4 is supported; set 4.")
        if not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ConfigError(f"loftq_iter={self.loftq_iter!r}: must be an int >= 1.")


@dataclass
class LoraConfig(ConfigFilesMixin):
    """The options of one LoRA adapter.

    Attributes:
        r: Rank of the update B·A.
        lora_alpha: Numerator of the scale: s = lora_alpha / r (or / sqrt(r) with rsLoRA).
        lora_dropout: Dropout probability on the LoRA branch's input (0 costs nothing).
            Layers that read the very same input tensor in one forward share one mask.
        target_modules: Modules to adapt. A list of names matches a module whose whole dotted
            path, or its last dotted parts, equal a name; a string is a regex that must match
            the whole path; "all-linear" means every linear layer but the output head. None
            takes the default for `model.config.model_type`.
        exclude_modules: Modules never adapted, matched like `target_modules`.
        bias: "none", "all" (every bias trains) or "lora_only" (biases of adapted layers).
        use_rslora: Scale by lora_alpha / sqrt(r) instead of lora_alpha / r.
        modules_to_save: Modules trained in full and saved with the adapter, e.g. a new
            classification head: as in PEFT, every module whose path ends with a name, as
            plain text ("classifier" also picks "pre_classifier").
        layers_to_transform: Only adapt modules inside these layer indices.
        layers_pattern: Name of the module list holding the layers ("layers", "h", ...);
            only with `layers_to_transform`.
        rank_pattern: Per-module rank overrides; keys are names or regexes.
        alpha_pattern: Per-module lora_alpha overrides; keys are names or regexes.
        init_lora_weights: True: Kaiming-uniform A and zero B (the model starts unchanged);
            "gaussian": normal A (std 1/r), zero B; False: random A and B (tests only);
            "loftq": LoftQ (needs `loftq_config`); "pissa": A and B from the top-r singular
            triplets of W, and W replaced by the residual W - s·B·A (the model starts
            unchanged); "pissa_niter_N": the same from a randomized SVD with N subspace
            iterations (`torch.svd_lowrank`; faster, approximate); "olora": A and B from W's
            QR decomposition, W replaced by its residual; "orthogonal": A and B built on
            orthogonal halves of a random orthogonal matrix (B·A = 0; even r). These four apply
            to nn.Linear and Conv1D layers. A saved file with them loads as the plain LoRA it
            holds: the base is not changed on load; `save_pretrained(...,
            path_initial_model_for_weight_conversion=...)` writes a PiSSA/OLoRA adapter as a
            rank-2r LoRA for the original base. "eva": data-driven, B zero until
            `initialize_lora_eva_weights` sets A (and the ranks) from the layers' inputs (see
            `eva_config`); "corda": A and B from the decomposition `preprocess_corda` made
            of W and its inputs' covariance, W replaced by its residual (see `corda_config`;
            nn.Linear and Conv1D; converted on save like PiSSA).
        fan_in_fan_out: The base stores its weight as (in, out), as transformers' Conv1D.
            Each layer's own type decides this, as in PEFT: a value that contradicts a newly
            wrapped layer (True on nn.Linear, False on Conv1D) is corrected with a warning,
            and the corrected value is saved.
        task_type: A `TaskType`; classification heads join `modules_to_save`.
        base_model_name_or_path: Where the base model comes from (saved with the adapter).
        inference_mode: Adapter weights do not train.
        loftq_config: Options for `init_lora_weights="loftq"`.
        eva_config: An `EvaConfig`, for `init_lora_weights="eva"` only (its defaults if None).
        corda_config: A `CordaConfig`, for `init_lora_weights="corda"` only (its defaults if
            None).
        use_dora: DoRA (weight-decomposed LoRA): each adapted layer also learns a magnitude
            per output row (`lora_magnitude_vector`, set at first to the row norms of
            W + s·B·A) and computes with m · (W + s·B·A) / ||W + s·B·A||, the norm per row
            treated as a constant in backward, as peft does. On nn.Linear, Conv1D,
            nn.Conv1d/2d/3d and nn.Embedding, on full-precision and 4-bit bases; with
            init_lora_weights True, False or "gaussian".
        lora_bias: Train a bias b on lora_B (saved as PEFT's `lora_B.bias`), adding s·b to
            the output (not dropped). Merging adds s·b to the base layer's bias, so a base
            without a bias cannot be merged. On nn.Linear, Conv1D, nn.Conv1d/2d/3d and 4-bit
            bases, not nn.Embedding; with init_lora_weights True (b starts at zero) or False,
            not with DoRA (as in PEFT).
        layer_replication: Build a deeper model from the base's decoder layers before adapting
            it: a list of `[start, end)` ranges over the layer list (`[[0, 4], [2, 5]]` makes
            layers 0, 1, 2, 3, 2, 3, 4). Repeated layers share the base weights (nothing is
            copied) and each gets its own adapters. Such an adapter cannot be merged.
        trainable_token_indices: Train only these rows of an embedding (e.g. new chat-template
            tokens), the rest frozen: a list of token ids for the model's input embedding, or
            a dict of module name (a path or its end) -> ids. Output layers tied to the input
            embedding (`tie_word_embeddings`) get the same new rows. Saved as PEFT saves them
            (`...token_adapter.trainable_tokens_delta`); `merge_and_unload` writes the rows
            into the weight.
        ensure_weight_tying: With `trainable_token_indices` naming both tied layers with
            different ids, raise instead of training them apart. With an embedding in
            `target_modules` or `modules_to_save` of a tied model it raises (tying those
            adapters is not implemented); otherwise it changes nothing, as in PEFT.
        revision: Revision of the base model (kept for PEFT compatibility).
        target_parameters: Parameters to adapt that are not a layer's weight, such as the 3-D
            expert stacks of transformers' mixture-of-experts blocks
            (`["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`): a list of names, each
            matching a parameter whose path equals it or ends with "." + it. A 3-D parameter
            (E, d1, d2) gets one adapter per expert (A holds E·r rows, B E·r columns, as in
            PEFT). Without `target_modules` only the default modules of the model type (if it
            has defaults) are adapted besides; `target_modules=[]` adapts no module.
            `layers_to_transform`, `layers_pattern` and `exclude_modules` select modules only.
            Not with `lora_dropout`, `fan_in_fan_out`, `use_dora`, `lora_bias` or inits other
            than True, False and "gaussian"; all adapters of a model name the same parameters.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: BiasMode = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    task_type: TaskType | str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    loftq_config: LoftQConfig | dict[str, Any] = field(default_factory=dict)
    eva_config: EvaConfig | None = None
    corda_config: CordaConfig | None = None
    use_dora: bool = False
    lora_bias: bool = False
    revision: str | None = None
    target_parameters: list[str] | None = None
    layer_replication: list[list[int]] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        # Normalise copies of containers so the caller's objects are never shared or mutated.
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
        elif isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = list(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, (list, tuple)):
            self.layers_to_transform = list(self.layers_to_transform)
        if isinstance(self.target_parameters, set):  # peft's form after its MoE conversion
            self.target_parameters = sorted(self.target_parameters, key=str)
        elif isinstance(self.target_parameters, (list, tuple)):
            self.target_parameters = list(self.target_parameters)
        if self.layer_replication is not None:
            self.layer_replication = _layer_ranges(self.layer_replication)
        if self.trainable_token_indices is not None:
            self.trainable_token_indices = _token_ids(self.trainable_token_indices)
        if not isinstance(self.ensure_weight_tying, bool):
            raise ConfigError(
                f"ensure_weight_tying={self.ensure_weight_tying!r}: must be True or False."
            )
        self.rank_pattern = dict(self.rank_pattern)
        self.alpha_pattern = dict(self.alpha_pattern)
        if isinstance(self.loftq_config, Mapping) and self.loftq_config:
            self.loftq_config = LoftQConfig(**self.loftq_config)
        if self.task_type is not None:
            self.task_type = _parse_task_type(self.task_type)
        self.eva_config = parse_sub_config("eva_config", self.eva_config, EvaConfig)
        self.corda_config = parse_sub_config("corda_config", self.corda_config, CordaConfig)
        if self.init_lora_weights == "eva" and self.eva_config is None:
            self.eva_config = EvaConfig()
        if self.init_lora_weights == "corda" and self.corda_config is None:
            self.corda_config = CordaConfig()
        self._validate()

    def _validate(self) -> None:
        _check_rank("r", self.r)
        _check_number("lora_alpha", self.lora_alpha)
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ConfigError(
                f"lora_dropout={self.lora_dropout!r}: must be a number in [0, 1); use 0 for none."
            )
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r}: allowed values are {list(BIAS_MODES)}.")
        init = self.init_lora_weights
        is_pissa_niter = isinstance(init, str) and PISSA_NITER_PATTERN.fullmatch(init) is not None
        if not (isinstance(init, bool) or init in INIT_NAMES or is_pissa_niter):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r}: allowed values are True, False, "
                "'gaussian', 'loftq', 'pissa', 'pissa_niter_<N>' (N an int, e.g. "
                "'pissa_niter_4'), 'olora', 'orthogonal', 'eva', 'corda'."
            )
        for name, owner in (("eva_config", "eva"), ("corda_config", "corda")):
            if getattr(self, name) is not None and owner != self.init_lora_weights:
                raise ConfigError(
                    f"{name} with init_lora_weights={self.init_lora_weights!r}: {name} is read "
                    f"only by init_lora_weights={owner!r}, so it would be ignored. Fix: set "
                    f"init_lora_weights={owner!r}, or leave out {name}."
                )
        if init == "orthogonal" and any(
            isinstance(rank, int) and rank % 2 for rank in (self.r, *self.rank_pattern.values())
        ):
            raise ConfigError(
                f"init_lora_weights='orthogonal' needs even ranks; got r={self.r!r}, "
                f"rank_pattern={self.rank_pattern!r}. Fix: use even values."
            )
        if self.init_lora_weights == "loftq" and not isinstance(self.loftq_config, LoftQConfig):
            raise ConfigError(
                "init_lora_weights='loftq' needs loftq_config: pass "
                "loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)."
            )
        if self.init_lora_weights != "loftq" and isinstance(self.loftq_config, LoftQConfig):
            raise ConfigError(
                f"loftq_config={self.loftq_config!r} with init_lora_weights="
                f"{self.init_lora_weights!r}: loftq_config is read only by "
                "init_lora_weights='loftq', so it would be ignored. Fix: set "
                "init_lora_weights='loftq', or leave out loftq_config."
            )
        _check_names("target_modules", self.target_modules)
        _check_names("exclude_modules", self.exclude_modules)
        _check_names("layers_pattern", self.layers_pattern)
        if self.target_parameters is not None and not (
            isinstance(self.target_parameters, list)
            and all(isinstance(name, str) for name in self.target_parameters)
        ):
            raise ConfigError(
                f"target_parameters={self.target_parameters!r}: must be a list of parameter "
                "names (a regex string is not supported, as in PEFT), e.g. "
                "['mlp.experts.gate_up_proj']."
            )
        if self.modules_to_save is not None:
            _check_names("modules_to_save", self.modules_to_save)
        layers = self.layers_to_transform
        if layers is not None:
            indices = [layers] if isinstance(layers, int) else layers
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
                raise ConfigError(
                    f"layers_to_transform={layers!r}: must be a non-negative int or a list of them."
                )
        for key, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", rank)
        for key, alpha in self.alpha_pattern.items():
            _check_number(f"alpha_pattern[{key!r}]", alpha)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(
                f"layers_pattern={self.layers_pattern!r} without layers_to_transform selects "
                "nothing by itself; set layers_to_transform (e.g. [0, 1]) to pick layers, or "
                "remove layers_pattern."
            )
        if self.layer_replication is not None and not self.layer_replication:
            raise ConfigError(
                "layer_replication=[]: an empty list leaves no layers. Fix: give [start, end) "
                "ranges, e.g. [[0, 2], [1, 2]], or None for no replication."
            )
        init = self.init_lora_weights
        if self.lora_bias and (init not in (True, False) or self.use_dora):
            raise ConfigError(
                f"lora_bias=True with init_lora_weights={init!r}, use_dora={self.use_dora!r}: "
                "as in PEFT, lora_bias works with init_lora_weights True or False and without "
                "DoRA. Fix: set init_lora_weights=True or False and use_dora=False, or "
                "lora_bias=False."
            )
        if self.use_dora and not (isinstance(init, bool) or init == "gaussian"):
            raise ConfigError(
                f"use_dora=True with init_lora_weights={init!r}: lorakit sets DoRA's "
                "magnitude from A and B when the adapter is created, before that init would "
                "change them (and W). Fix: use init_lora_weights=True, False or 'gaussian' "
                "with DoRA, or use_dora=False."
            )

    @property
    def peft_type(self) -> str:
        """PEFT's name for this method, written into adapter_config.json."""
        return PEFT_TYPE

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with PEFT's field names (round-trips with `from_dict`)."""
        result: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, TaskType):
                value = value.value
            elif isinstance(value, (LoftQConfig, EvaConfig, CordaConfig)):
                value = dataclasses.asdict(value)
            elif isinstance(value, (list, dict)):
                value = type(value)(value)
            result[item.name] = value
        result["peft_type"] = PEFT_TYPE
        return result

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Build a config from a dict such as a parsed adapter_config.json or peft's `to_dict()`.

        PEFT bookkeeping fields (`peft_version`, `auto_mapping`, ...) are skipped. A field of a
        PEFT feature lorakit does not implement (DoRA, aLoRA, `lora_bias`, ...) holding
        anything but PEFT's default raises, as does an unknown field that is set: the adapter
        would otherwise compute something else than the config describes.

        Raises:
            ConfigError: Another PEFT method than LoRA, or a set field lorakit does not
                implement (named, with the fix).
        """
        peft_type = data.get("peft_type", PEFT_TYPE)
        if peft_type != PEFT_TYPE:
            raise ConfigError(
                f"peft_type={peft_type!r}: lorakit loads LoRA adapters only (peft_type 'LORA')."
            )
        known = {item.name for item in dataclasses.fields(cls)}
        data = drop_unused_sub_configs(data)
        for key, value in data.items():
            if key not in known and key not in _PEFT_BOOKKEEPING:
                _refuse_if_set(key, value)
        return cls(**{key: value for key, value in data.items() if key in known})

    @classmethod
    def from_config(cls, config: ConfigSource) -> LoraConfig:
        """A lorakit config from a lorakit `LoraConfig`, a `peft.LoraConfig` or a dict.

        A lorakit config is copied; the others go through `from_dict`, so every field is
        either carried over or refused. peft's runtime-only options are checked too.

        Raises:
            ConfigError: `config` is none of these, or sets a field lorakit does not implement.
        """
        if isinstance(config, LoraConfig):
            return dataclasses.replace(config)
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        to_dict = getattr(config, "to_dict", None)
        if not callable(to_dict) or not hasattr(config, "peft_type"):
            raise ConfigError(
                f"peft_config is a {type(config).__name__}; allowed: lorakit.LoraConfig, "
                "peft.LoraConfig or a dict of LoraConfig fields."
            )
        runtime = getattr(config, "runtime_config", None)
        if getattr(runtime, "ephemeral_gpu_offload", False):
            _refuse_if_set("runtime_config.ephemeral_gpu_offload", True)
        return cls.from_dict(to_dict())


# Fields peft writes that carry no meaning for the adapter's numbers.
_PEFT_BOOKKEEPING = frozenset({"peft_type", "peft_version", "auto_mapping"})

# PEFT LoRA fields lorakit does not implement: PEFT's default value and what the field does.
# Any other value raises, since the adapter would silently compute something else.
UNSUPPORTED_PEFT_FIELDS: dict[str, tuple[object, str]] = {
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA)"),
    "arrow_config": (None, "Arrow routing among adapters"),
    "kasa_config": (None, "KaSA"),
    "lora_ga_config": (None, "LoRA-GA initialisation"),
    "megatron_config": (None, "Megatron-LM parallel layers"),
    "megatron_core": ("megatron.core", "Megatron-LM parallel layers"),
    "monteclora_config": (None, "MonteCLoRA"),
    "qalora_group_size": (16, "QALoRA"),
    "runtime_config.ephemeral_gpu_offload": (False, "ephemeral GPU offload (used by DoRA)"),
    "use_bdlora": (None, "block-diagonal LoRA (BD-LoRA)"),
    "use_qalora": (False, "QALoRA"),
    "velora_config": (None, "VeLoRA"),
}


def _refuse_if_set(key: str, value: object) -> None:
    """Raise for a field lorakit does not implement unless it holds PEFT's default (or unset)."""
    if key in UNSUPPORTED_PEFT_FIELDS:
        default, feature = UNSUPPORTED_PEFT_FIELDS[key]
        if value == default or (default is None and not _is_set(value)):
            return
        raise ConfigError(
            f"{key}={value!r}: lorakit does not implement {feature}, so this adapter would "
            f"compute something else than its config says. Fix: set {key}={default!r} (remove "
            "it), or use peft for this adapter."
        )
    if _is_set(value):
        raise ConfigError(
            f"{key}={value!r}: not a LoRA option lorakit knows (a newer peft's, or a typo); "
            f"it is not ignored. Fix: remove {key} from the config."
        )


def _layer_ranges(value: object) -> list[list[int]]:
    """`layer_replication` as a list of `[start, end]` lists (JSON's form), checked."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(
            f"layer_replication={value!r}: must be a list of [start, end) pairs, e.g. "
            "[[0, 2], [1, 2]], or None."
        )
    ranges: list[list[int]] = []
    for pair in value:
        is_pair = isinstance(pair, (list, tuple)) and len(pair) == 2
        if not is_pair or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pair
        ):
            raise ConfigError(
                f"layer_replication={value!r}: each item must be a [start, end) pair of "
                "non-negative ints, e.g. [[0, 2], [1, 2]]."
            )
        if pair[0] >= pair[1]:
            raise ConfigError(
                f"layer_replication={value!r}: range {list(pair)!r} is empty; each needs "
                "start < end."
            )
        ranges.append(list(pair))
    return ranges


def _token_ids(value: object) -> list[int] | dict[str, list[int]]:
    """`trainable_token_indices` copied (a list, or a dict of lists), checked."""

    def ids(item: object) -> list[int]:
        if isinstance(item, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in item
        ):
            return list(item)
        raise ConfigError(
            f"trainable_token_indices={value!r}: give token ids (non-negative ints) as a list, "
            "e.g. [32000, 32001], or a dict of module name -> list, e.g. "
            "{'embed_tokens': [32000]}."
        )

    if isinstance(value, Mapping):
        if not all(isinstance(name, str) for name in value):
            ids(None)  # raises with the value
        return {name: ids(item) for name, item in value.items()}
    return ids(value)


def _is_set(value: object) -> bool:
    return value not in (None, False, {}, [], "", 0)


def _parse_task_type(value: TaskType | str) -> TaskType:
    try:
        return TaskType(value)
    except ValueError:
        allowed = [task.value for task in TaskType]
        raise ConfigError(f"task_type={value!r}: allowed values are {allowed}.") from None


def _check_rank(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r}: the rank must be a positive int, e.g. 8.")


def _check_number(name: str, value: object) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name}={value!r}: must be a positive finite number, e.g. 16.")


def _check_names(name: str, value: object) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{name}={value!r}: must be a string (regex) or a list of strings.")
