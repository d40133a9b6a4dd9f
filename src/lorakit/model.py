"""`PeftModel` and `get_peft_model`: a base model with named LoRA adapters and their lifecycle.

State-dict keys follow PEFT: `PeftModel.base_model` is a `LoraModel` whose `.model` is the
user's model, so keys read `base_model.model.<path>.lora_A.<adapter>.weight`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypedDict

import torch
from torch import nn

from .config import ConfigSource, LoraConfig, TaskType
from .constants import BASE_ADAPTER_NAME, DEFAULT_ADAPTER_NAME, TASK_HEAD_MODULES
from .errors import AdapterNameError, LorakitError, MergeError, UnsupportedOptionError
from .inject import (
    apply_injection,
    corrected_fan_in_fan_out,
    iter_wrappers,
    plan_injection,
    replace_module,
    unwrap_model,
    wrapped_module,
)
from .inject.layer_init import apply_layer_init_injection
from .inject.parameters import apply_parameter_injection, plan_parameter_injection
from .inject.replication import layers_replicated, replicated_map
from .inject.surgery import Wrapper
from .inject.trainable import refresh_trainable
from .inject.trainable_tokens import apply_trainable_tokens, plan_trainable_tokens
from .layers.base import LoraLayer
from .layers.frozen import linears_restored, restore_linears, use_frozen_linears
from .layers.init import layer_init_name
from .layers.lora_bias import check_bias_merge
from .layers.modules_to_save import ModulesToSaveWrapper
from .layers.routing import AdapterRouting, batch_size_of, row_groups_for
from .layers.trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper
from .lora_model import LoraModel
from .model_controls import AdapterControlsMixin
from .model_files import AdapterFilesMixin

logger = logging.getLogger(__name__)


class _InjectionFlags(TypedDict):
    """The keyword options every `apply_*injection` call of `add_adapter` takes alike."""

    autocast_adapter_dtype: bool
    low_cpu_mem_usage: bool


class PeftModel(AdapterFilesMixin, AdapterControlsMixin, nn.Module):
    """A base model with LoRA adapters; calls and unknown attributes pass through to the base."""

    def __init__(
        self,
        model: nn.Module,
        peft_config: ConfigSource,
        adapter_name: str = DEFAULT_ADAPTER_NAME,
        *,
        init_weights: bool = True,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self.routing = AdapterRouting()
        self.base_model = LoraModel(model, self.routing)
        self.base_model.attach(self)
        self.peft_config: dict[str, LoraConfig] = {}
        self._wrapper_cache: list[tuple[str, Wrapper]] | None = None
        model.requires_grad_(False)
        self.add_adapter(
            adapter_name,
            peft_config,
            init_weights=init_weights,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        self.set_adapter(adapter_name, self.peft_config[adapter_name].inference_mode)

    # --- pass-through ----------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """The inner model's, read by `transformers.Trainer` when it is built; raises
        `UnsupportedOptionError` in a plain `Trainer`, which would save this model whole
        (`lorakit.integrations.trainer_guard`)."""
        from .integrations.trainer_guard import accepts_loss_kwargs

        return accepts_loss_kwargs(self.base_model)

    def get_base_model(self) -> nn.Module:
        """The user's model, with lorakit layers in it."""
        model: nn.Module = self.base_model.model
        return model

    def forward(
        self,
        *args: Any,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the base model; `adapter_names` names one adapter per row ("__base__" = none).

        The usual model inputs are named in the signature (only those given are passed on), so
        `transformers.Trainer` keeps those dataset columns as it does for peft models.
        """
        named = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
            "labels": labels,
            "pixel_values": pixel_values,
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_attention_mask,
        }
        kwargs.update({key: value for key, value in named.items() if value is not None})
        self.routing.shared_dropout.clear()  # nothing from the last step stays alive
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self._rows_routed(adapter_names, args, kwargs):
            return self.base_model(*args, **kwargs)

    def generate(
        self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> Any:
        """transformers' `generate` of the base model, with the active (or per-row) adapters."""
        base: Any = self.get_base_model()
        generate = base.generate
        if adapter_names is None:
            return generate(*args, **kwargs)
        with self._rows_routed(adapter_names, args, kwargs):
            return generate(*args, **kwargs)

    # --- adapters --------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self.routing.active_adapters)

    @property
    def active_adapter(self) -> str:
        """The first active adapter (PEFT's attribute)."""
        return self.routing.active_adapters[0] if self.routing.active_adapters else ""

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: ConfigSource,
        low_cpu_mem_usage: bool = False,
        *,
        init_weights: bool = True,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Inject a new, inactive adapter; on any error the model is left unchanged.

        Adapters sit on the device of the layer they wrap, in fp32 on a fp16/bf16 base unless
        `autocast_adapter_dtype=False` (then in the base dtype). `init_weights=False` skips
        initialisation, for callers that load weights right after. `low_cpu_mem_usage=True`
        creates the adapter's tensors on the meta device, uninitialised and allocating
        nothing: load weights into it (`load_adapter`, or `load_state_dict(..., assign=True)`)
        before running it.

        With `init_lora_weights="loftq"` (and weights to initialise) the targeted
        full-precision linear layers become 4-bit `QuantLinear`s and the adapter starts at
        the LoftQ factors; see `lorakit.quant.loftq`. With "pissa", "pissa_niter_N", "olora"
        or "orthogonal" each adapter is set from its layer (`inject.layer_init`); PiSSA and
        OLoRA also replace the base weights by their residuals. Without weights to initialise
        (a load) the adapter is plain LoRA and the base is left as it is.

        `peft_config` may be a lorakit `LoraConfig`, a `peft.LoraConfig` or a dict of its
        fields; a field of a PEFT feature lorakit does not implement raises `ConfigError`
        naming it (`LoraConfig.from_config`).
        """
        if adapter_name in self.peft_config:
            raise AdapterNameError(
                f"Adapter {adapter_name!r} already exists; pick another name or "
                f"delete_adapter({adapter_name!r}) first."
            )
        if adapter_name == BASE_ADAPTER_NAME or not adapter_name or "." in adapter_name:
            raise AdapterNameError(
                f"{adapter_name!r} cannot name an adapter: names must be non-empty, without "
                f"'.', and not {BASE_ADAPTER_NAME!r}."
            )
        config = self._config_for(peft_config)
        model = self.get_base_model()
        adapter = (config, adapter_name, self.routing, init_weights)
        flags = _InjectionFlags(
            autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
        )
        with linears_restored(model):  # matching and wrappers see the model's own classes
            with layers_replicated(model, config.layer_replication):  # undone if planning fails
                plan = plan_injection(model, config)
                config.fan_in_fan_out = corrected_fan_in_fan_out(model, plan, config.fan_in_fan_out)
                parameters = plan_parameter_injection(model, config, plan, self.peft_config)
                tokens = plan_trainable_tokens(model, config, plan)
            if config.init_lora_weights == "loftq" and init_weights and not low_cpu_mem_usage:
                from .inject.loftq import apply_loftq_injection  # imports lorakit.quant

                apply_loftq_injection(
                    model, plan, config, adapter_name, self.routing, autocast_adapter_dtype
                )
            elif (
                layer_init_name(config.init_lora_weights) and init_weights and not low_cpu_mem_usage
            ):
                apply_layer_init_injection(
                    model, plan, config, adapter_name, self.routing, autocast_adapter_dtype
                )
            else:
                apply_injection(model, plan, *adapter, **flags)
            apply_parameter_injection(model, parameters, *adapter, **flags)
            apply_trainable_tokens(model, tokens, adapter_name, self.routing)
        self._wrappers_changed()
        self._use_frozen_linears()
        self.peft_config[adapter_name] = config
        self._refresh_trainable()

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make these adapters the active ones (one assignment; trainability follows).

        As in PEFT, they become trainable, or frozen with `inference_mode=True` (their configs'
        `inference_mode` says which from then on); the adapters left inactive are frozen.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_exist(names)
        changed = set(self.routing.active_adapters) ^ set(names)
        flipped = {
            name for name in names if self.peft_config[name].inference_mode != inference_mode
        }
        for name in flipped:
            self.peft_config[name].inference_mode = inference_mode
        self.routing.active_adapters = tuple(names)
        if flipped or any(not self.peft_config[name].inference_mode for name in changed):
            self._refresh_trainable(changed | flipped)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer; wrappers left with no adapter are unwrapped."""
        self._check_exist([adapter_name])
        model = self.get_base_model()
        for key, wrapper in reversed(list(iter_wrappers(model))):  # nested: innermost first
            if adapter_name not in wrapper.adapter_names:
                continue
            wrapper.delete_adapter(adapter_name)
            if not wrapper.adapter_names:
                replace_module(model, key, wrapped_module(wrapper))
        self._wrappers_changed()
        self._use_frozen_linears()
        del self.peft_config[adapter_name]
        remaining = [name for name in self.routing.active_adapters if name != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.routing.active_adapters = tuple(remaining)
        self._refresh_trainable()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the bare base model inside the block; merged adapters are unmerged meanwhile."""
        merged = {key: list(layer.merged_adapters) for key, layer in self._lora_layers()}
        merged = {key: names for key, names in merged.items() if names}
        merged_tokens = [(layer, list(layer.merged_adapters)) for layer in self._token_layers()]
        if merged:
            logger.warning("Unmerging adapters while they are disabled; they merge back after.")
            self.unmerge_adapter()
        was_disabled = self.routing.is_disabled
        self.routing.is_disabled = True
        try:
            yield
        finally:
            self.routing.is_disabled = was_disabled
            layers = dict(self._lora_layers())
            for key, names in merged.items():
                layers[key].merge(names)
            for token_layer, names in merged_tokens:
                token_layer.merge(names)

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        svd_driver: str | None = None,
    ) -> None:
        """Make a new adapter combining existing ones: "linear", "cat" (exact Σ wᵢΔWᵢ), "svd"
        (best rank-k fit of Σ wᵢΔWᵢ), "ties", "dare_linear", "dare_ties", "magnitude_prune"
        and their "_svd" forms, with peft's meanings. The new adapter is not activated."""
        from .weighted import add_weighted_adapter

        add_weighted_adapter(
            self,
            adapters,
            weights,
            adapter_name,
            combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            density=density,
            majority_sign_method=majority_sign_method,
            svd_driver=svd_driver,
        )

    # --- merging ---------------------------------------------------------------------------
    def merge_adapter(
        self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False
    ) -> None:
        """Add s·BA of the adapters (default: the active ones) into the base weights.

        With `safe_merge`, every layer's merged weight is checked for NaN/inf before any is
        written, so a broken adapter leaves the model untouched. `unmerge_adapter` restores
        the original weights bit for bit.
        """
        names, layers = self._checked_merge(adapter_names, safe_merge, in_place=True)
        for _, layer in layers:
            layer.merge(names)
        for token_layer in self._token_layers():
            token_layer.merge(names)

    def _checked_merge(
        self, adapter_names: Sequence[str] | None, safe_merge: bool, in_place: bool
    ) -> tuple[list[str], list[tuple[str, LoraLayer]]]:
        """The adapters to merge and the LoRA layers, once every check passed (nothing written)."""
        names = list(self.routing.active_adapters if adapter_names is None else adapter_names)
        self._check_exist(names)
        layer_map = replicated_map(self.get_base_model())
        if layer_map is not None:
            raise MergeError(
                f"This model's layers are replicated (layer_replication={layer_map!r}): "
                "repeated layers share one base weight, so merging one layer's adapter would "
                "change its copies too; nothing was merged. Fix: run the adapters unmerged."
            )
        layers = list(self._lora_layers())
        if in_place:
            for _, layer in layers:
                layer.base_weight()  # raises if a base cannot hold a merged weight (4-bit)
        for _, layer in layers:
            check_bias_merge(layer, [name for name in names if name in layer.r])  # lora_bias
        if safe_merge:
            for key, layer in layers:
                for name in names:
                    if name in layer.r and not layer.merged_weight_is_finite(name):
                        raise MergeError(
                            f"Merging adapter {name!r} into {key!r} would produce NaN/inf; "
                            "nothing was merged. Check the adapter weights."
                        )
        for token_layer in self._token_layers():
            token_layer.check_merge(names, safe_merge)
        return names, layers

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights."""
        for _, layer in self._lora_layers():
            layer.unmerge()
        for token_layer in self._token_layers():
            token_layer.unmerge()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
        *,
        requantize: bool = False,
    ) -> nn.Module:
        """Merge the adapters and return the plain base model (no lorakit module left).

        A 4-bit base (`QuantLinear`, bitsandbytes' `Linear4bit`) becomes an `nn.Linear` in
        its weight's original dtype holding dequant(Q) + s·BA summed in fp32, or with
        `requantize=True` a 4-bit layer like it (rounding: `lorakit.layers.packed`).
        `progressbar=True` shows a tqdm bar over the layers being merged, on stderr.
        """
        names, layers = self._checked_merge(adapter_names, safe_merge, in_place=False)
        model = self.get_base_model()
        layers.reverse()  # nested wrappers (target_parameters): innermost first
        for key, layer in _progress(layers, progressbar, "Unloading and merging model"):
            # never unmerged: no records are kept
            replace_module(model, key, layer.merged_module(names, requantize))
        for token_layer in self._token_layers():
            token_layer.merge(names)  # the rows go into the weight; the wrapper is dropped
        self._wrappers_changed()
        restore_linears(model)
        return unwrap_model(model, keep_trained_heads=True)

    def unload(self) -> nn.Module:
        """Return the base model with its original modules back in place (adapters dropped)."""
        if any(layer.merged_adapters for _, layer in self._lora_layers()):
            logger.warning("unload() unmerges merged adapters first (restoring the base weights).")
            self.unmerge_adapter()
        self._wrappers_changed()
        restore_linears(self.get_base_model())
        return unwrap_model(self.get_base_model(), keep_trained_heads=False)

    # --- parameters (counts: model_controls) ----------------------------------------------
    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Checkpoint the base model's blocks; inputs require grad so frozen blocks still
        pass gradients through to the adapters inside them."""
        base = self.get_base_model()
        base.gradient_checkpointing_enable(**kwargs)  # type: ignore[operator]
        enable = getattr(base, "enable_input_require_grads", None)
        if callable(enable):
            enable()

    # --- internals -------------------------------------------------------------------------
    def _config_for(self, peft_config: ConfigSource) -> LoraConfig:
        """A private lorakit copy of the user's config (a lorakit or peft `LoraConfig`, or a
        dict), with task heads and the base path filled in."""
        config = LoraConfig.from_config(peft_config)
        task = config.task_type
        if task is not None and TaskType(task).value in TASK_HEAD_MODULES:
            heads = TASK_HEAD_MODULES[TaskType(task).value]
            config.modules_to_save = list(config.modules_to_save or []) + [
                head for head in heads if head not in (config.modules_to_save or [])
            ]
        if config.base_model_name_or_path is None:
            base_config = getattr(self.get_base_model(), "config", None)
            config.base_model_name_or_path = getattr(base_config, "_name_or_path", None) or None
        return config

    def _check_exist(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.peft_config:
                raise AdapterNameError(
                    f"Adapter {name!r} does not exist; existing adapters: {list(self.peft_config)}."
                )

    def _lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for key, wrapper in self._wrappers():
            if isinstance(wrapper, LoraLayer):
                yield key, wrapper

    def _token_layers(self) -> list[TrainableTokensLayer]:
        """The trainable-token layers (`trainable_token_indices`), embeddings before tied ones."""
        wrappers = [w for _, w in self._wrappers() if isinstance(w, TrainableTokensWrapper)]
        return [w.token_adapter for w in sorted(wrappers, key=lambda w: w.is_tied)]

    def _wrappers(self) -> list[tuple[str, Wrapper]]:
        """Every lorakit wrapper, cached until the set of wrappers changes."""
        if self._wrapper_cache is None:
            self._wrapper_cache = list(iter_wrappers(self.get_base_model()))
        return self._wrapper_cache

    def _wrappers_changed(self) -> None:
        self._wrapper_cache = None

    def _use_frozen_linears(self) -> None:
        """The plain nn.Linear modules no wrapper holds run as `layers.frozen.FrozenLinear`."""
        use_frozen_linears(self.get_base_model(), keep=[w for _, w in self._wrappers()])

    def _refresh_trainable(self, adapter_names: set[str] | None = None) -> None:
        """Active, non-inference adapters train (`inject.trainable.refresh_trainable`)."""
        refresh_trainable(
            self.get_base_model(),
            self._wrappers(),
            self.peft_config,
            self.routing.active_adapters,
            adapter_names,
        )

    @contextmanager
    def _rows_routed(
        self, adapter_names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Iterator[None]:
        """Route each batch row to its adapter for the duration of one call."""
        groups = row_groups_for(
            adapter_names,
            known=set(self.peft_config) | {BASE_ADAPTER_NAME},
            batch_size=batch_size_of(args, kwargs),
            device=next(self.parameters()).device,
        )
        previous = self.routing.row_groups
        self.routing.row_groups = groups
        try:
            yield
        finally:
            self.routing.row_groups = previous


def _progress(
    items: list[tuple[str, LoraLayer]], show: bool, description: str
) -> Iterable[tuple[str, LoraLayer]]:
    """`items`, through a tqdm bar on stderr when `show` (tqdm is imported only then)."""
    if not show:
        return items
    try:
        from tqdm import tqdm
    except ImportError as error:
        raise LorakitError(
            "progressbar=True needs tqdm, which is not installed. Fix: pip install tqdm, or "
            "pass progressbar=False."
        ) from error
    return tqdm(items, desc=description, total=len(items))


def get_peft_model(
    model: nn.Module,
    peft_config: ConfigSource,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with a new trainable LoRA adapter; base weights are frozen.

    The options are `PeftModel.add_adapter`'s (fp32 adapters on half-precision bases; meta
    tensors to be loaded later). `revision`, the base model's revision, is saved in the
    adapter's config in place of the config's own, as in PEFT (the caller's config object is
    not changed).

    Raises:
        UnsupportedOptionError: `mixed=True` (PEFT's models mixing adapter methods).
    """
    if mixed:
        raise UnsupportedOptionError(
            "get_peft_model(mixed=True): PEFT's mixed models, holding adapters of several PEFT "
            "methods, are not implemented; lorakit adapters are all LoRA. Fix: pass mixed=False."
        )
    if revision is not None:
        peft_config = LoraConfig.from_config(peft_config)
        if peft_config.revision not in (None, revision):
            logger.warning(
                "The config names base model revision %r; saving revision %r instead.",
                peft_config.revision,
                revision,
            )
        peft_config.revision = revision

    from .task_models import peft_model_class_for  # the task classes subclass PeftModel

    model_class = peft_model_class_for(peft_config, PeftModel)
    return model_class(
        model,
        peft_config,
        adapter_name=adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )


# ModulesToSaveWrapper is re-exported for isinstance checks by users.
__all__ = ["LoraModel", "ModulesToSaveWrapper", "PeftModel", "get_peft_model"]
