"""`LoraLayer`: the bookkeeping every LoRA wrapper shares (adapters, routing, merging).

A wrapper keeps the original module as `base_layer` and never subclasses it, so `unload()`
hands back the very objects of the base model. Subclasses supply the math of their layer
type through a few methods: `_create_adapter`, `_adapter_pair`, `_adapter_holders`
(`_slot_holders` where a forward reads A and B elsewhere), `_add_slot_output` and
`get_delta_weight`; merging only reads and writes the base's dense weight.

A forward reads `active_slots`, the acting adapters resolved into `AdapterSlot`s (see
`layers.routing`), which the layer rebuilds whenever they can change: the routing's active
adapters are set, an adapter is added, deleted, merged or unmerged, or the layer is moved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import AdapterNameError, ConfigError, MergeError
from ..ops.lora import lora_scale
from ..ops.merge import MergeRecord, merge_delta, unmerge_delta
from . import dora
from .init import InitFunction, initialise
from .lora_bias import (
    check_bias_merge,
    init_lora_B_bias,
    lora_B_bias,
    merge_bias,
    merged_bias_is_finite,
    unmerge_bias,
)
from .routing import AdapterRouting, AdapterSlot, RowGroup


def module_weight(module: nn.Module) -> torch.Tensor:
    """The `weight` tensor of a module (typed for the checker)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


class LoraLayer(nn.Module):
    """A base layer plus any number of named LoRA adapters."""

    init_table: dict[object, InitFunction]
    supports_lora_bias = False  # lora_B may have a bias (linear and conv layers)

    def __init__(self, base_layer: nn.Module, routing: AdapterRouting) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout_p: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self.merge_records: dict[str, MergeRecord] = {}
        self.adapter_slots: dict[str, AdapterSlot] = {}
        self.active_slots: tuple[AdapterSlot, ...] = ()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA's m per adapter (`layers.dora`)
        self.dora_norms = dora.RowNormCache()
        self.dora_merge_factors: dict[str, torch.Tensor] = {}
        self.lora_bias: dict[str, bool] = {}  # lora_B has a bias (`layers.lora_bias`)
        self.bias_merge_records: dict[str, MergeRecord] = {}
        routing.attach(self)

    # --- what subclasses provide -------------------------------------------------------
    def _create_adapter(
        self, adapter_name: str, r: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        raise NotImplementedError

    def _adapter_pair(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the (A, B) tensors of an adapter."""
        raise NotImplementedError

    def _remove_adapter_tensors(self, adapter_name: str) -> None:
        raise NotImplementedError

    def _adapter_holders(
        self, adapter_name: str
    ) -> tuple[tuple[nn.Module, nn.Module], tuple[str, str]]:
        """The modules whose `_parameters` hold A and B, and the names they hold them under."""
        raise NotImplementedError

    def _slot_holders(
        self, adapter_name: str
    ) -> tuple[tuple[nn.Module, nn.Module], tuple[str, str]]:
        """Where a forward reads A and B (`AdapterSlot.holders` / `keys`): by default the
        holders themselves; a layer whose holders key A and B by adapter name gives holders
        that use one name for every adapter, so that a compiled forward guards on no name."""
        return self._adapter_holders(adapter_name)

    def _add_slot_output(
        self, result: torch.Tensor, x: torch.Tensor, slot: AdapterSlot
    ) -> torch.Tensor:
        """result + the slot's adapter update for input `x`."""
        raise NotImplementedError

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW of an adapter in the layout of the base layer's weight."""
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (model code such as T5's reads `layer.weight` directly)."""
        return module_weight(self.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.base_layer, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    # --- adapters ------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The dense weight merging writes into."""
        return module_weight(self.base_layer)

    def base_dtype_and_device(self) -> tuple[torch.dtype, torch.device]:
        """The dtype the base computes in and the device it sits on."""
        weight = self.base_weight()
        return weight.dtype, weight.device

    def adapter_dtype_and_device(
        self, autocast_adapter_dtype: bool = True
    ) -> tuple[torch.dtype, torch.device]:
        """Adapters live beside the base; half-precision bases get fp32 adapters by default.

        `autocast_adapter_dtype=False` keeps them in the base dtype (when it is floating).
        """
        dtype, device = self.base_dtype_and_device()
        is_half = dtype in (torch.float16, torch.bfloat16)
        if (is_half and autocast_adapter_dtype) or not dtype.is_floating_point:
            dtype = torch.float32
        return dtype, device

    def add_adapter(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        use_rslora: bool,
        init_lora_weights: object,
        initialise_weights: bool = True,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
    ) -> None:
        """Create the tensors of a new adapter in this layer and initialise them.

        `initialise_weights=False` leaves them as allocated, for a load that overwrites them.
        `low_cpu_mem_usage=True` allocates nothing: the tensors are created on the meta
        device (uninitialised) for a load to replace with the file's tensors. `use_dora`
        adds DoRA's magnitude m, set to the row norms of W + s·B A (`layers.dora`).
        """
        if adapter_name in self.r:
            raise AdapterNameError(f"Adapter {adapter_name!r} already exists in this layer.")
        dtype, device = self.adapter_dtype_and_device(autocast_adapter_dtype)
        if low_cpu_mem_usage:
            device, initialise_weights = torch.device("meta"), False
        if lora_bias and not self.supports_lora_bias:
            raise ConfigError(
                f"lora_bias=True on a {type(self).__name__}: PEFT gives lora_B a bias on "
                "linear and conv layers only. Fix: leave this layer out of target_modules, "
                "or set lora_bias=False."
            )
        self.lora_bias[adapter_name] = lora_bias
        self._create_adapter(adapter_name, r, dtype, device)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_scale(lora_alpha, r, use_rslora)
        self.lora_dropout_p[adapter_name] = float(lora_dropout)
        if initialise_weights:
            A, B = self._adapter_pair(adapter_name)
            initialise(self.init_table, A, B, r, init_lora_weights)
            init_lora_B_bias(self, adapter_name, r, init_lora_weights)
        if use_dora:
            dora.create_magnitude(self, adapter_name, dtype, device)
        self.refresh_slots()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove every tensor and record of an adapter from this layer."""
        if adapter_name in self.merged_adapters:
            self.unmerge([adapter_name])
        self._remove_adapter_tensors(adapter_name)
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        self.lora_bias.pop(adapter_name, None)
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout_p):
            del table[adapter_name]
        self.refresh_slots()

    @torch.no_grad()
    def pad_adapter_rank(self, adapter_name: str, target_rank: int) -> None:
        """Give an adapter rank `target_rank` by zero rows of A and zero columns of B.

        B A, and so the layer's output, is unchanged (the zeros add nothing); the scale stays
        as it is. A and B become new parameters in their holders (an optimizer holding the
        old ones must be rebuilt).
        """
        r = self.r[adapter_name]
        assert target_rank >= r, "callers check that no adapter would shrink"
        (A_holder, B_holder), (A_key, B_key) = self._adapter_holders(adapter_name)
        for holder, key, dim in ((A_holder, A_key, 0), (B_holder, B_key, 1)):
            old = holder._parameters[key]
            assert old is not None
            shape = list(old.shape)
            shape[dim] = target_rank
            padded = old.new_zeros(shape)
            padded.narrow(dim, 0, r).copy_(old)
            holder._parameters[key] = nn.Parameter(padded, requires_grad=old.requires_grad)
        for holder, attributes in (
            (A_holder, ("out_features", "out_channels")),
            (B_holder, ("in_features", "in_channels")),
        ):
            for attribute in attributes:
                if isinstance(getattr(holder, attribute, None), int):
                    setattr(holder, attribute, target_rank)
        self.r[adapter_name] = target_rank
        self.refresh_slots()

    def set_adapter_trainable(self, adapter_name: str, is_trainable: bool) -> None:
        for tensor in self._adapter_pair(adapter_name):
            tensor.requires_grad_(is_trainable)
        bias = lora_B_bias(self, adapter_name)
        if bias is not None:
            bias.requires_grad_(is_trainable)
        if adapter_name in self.lora_magnitude_vector:
            dora.magnitude(self, adapter_name).requires_grad_(is_trainable)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    # --- slots ---------------------------------------------------------------------------
    def refresh_slots(self) -> None:
        """Rebuild `adapter_slots` and `active_slots` from the adapters and the routing.

        Called by the routing when its active adapters change and by every method here that
        changes what a forward must add; `active_slots` are the active adapters this layer
        holds and has not merged, in the routing's order.
        """
        slots = {name: self._new_slot(name, self.adapter_slots.get(name)) for name in self.r}
        self.adapter_slots = slots
        self.active_slots = tuple(
            slots[name]
            for name in self.routing.active_adapters
            if name in slots and name not in self.merged_adapters
        )

    def _new_slot(self, adapter_name: str, old: AdapterSlot | None) -> AdapterSlot:
        """The slot of an adapter: `old` itself when nothing in it would change."""
        holders, keys = self._slot_holders(adapter_name)
        scale = self.scaling[adapter_name]
        device = self._adapter_pair(adapter_name)[0].device
        device = torch.device("cpu") if device.type == "meta" else device
        p = self.lora_dropout_p[adapter_name]
        if old is not None:
            kept = (old.holders, old.keys, old.scale, old.dropout_p, old.scale_tensor.device)
            if kept == (holders, keys, scale, p, device):
                return old
        return AdapterSlot(
            adapter_name=adapter_name,
            holders=holders,
            keys=keys,
            scale=scale,
            scale_tensor=torch.tensor(scale, dtype=torch.float32, device=device),
            dropout_p=p,
        )

    def _apply(self, fn: Any, recurse: bool = True) -> LoraLayer:
        """`nn.Module._apply` (`.to()`, `.half()`, ...); then the slots follow A's device."""
        super()._apply(fn, recurse)
        self.refresh_slots()
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled or deep-copied: attach to the (copied) routing again."""
        super().__setstate__(state)
        self.routing.attach(self)

    def _add_adapter_output(
        self, result: torch.Tensor, x: torch.Tensor, adapter_name: str
    ) -> torch.Tensor:
        """result + the named adapter's update for input `x` (the reference path)."""
        return self._add_slot_output(result, x, self.adapter_slots[adapter_name])

    # --- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        routing = self.routing
        if routing.is_disabled:
            return result
        if routing.row_groups is not None:
            return self._add_row_group_outputs(result, x, routing.row_groups)
        for slot in self.active_slots:
            result = self._add_slot_output(result, x, slot)
        return result

    def acting_adapters(self) -> list[str]:
        """Active adapters this layer holds and has not merged: the ones forward must add."""
        return [slot.adapter_name for slot in self.active_slots]

    def _add_row_group_outputs(
        self, result: torch.Tensor, x: torch.Tensor, groups: tuple[RowGroup, ...]
    ) -> torch.Tensor:
        """Each group of rows gets its own adapter's update (reference path, one pass a group)."""
        if self.merged_adapters:
            raise MergeError(
                f"Adapters {self.merged_adapters} are merged into the base weights, so rows "
                "cannot opt out of them; call unmerge_adapter() before a mixed-adapter batch."
            )
        dora_names = [
            g.adapter_name for g in groups if g.adapter_name in self.lora_magnitude_vector
        ]
        if dora_names:
            raise MergeError(
                f"adapter_names routes rows to DoRA adapters {dora_names}; DoRA is not "
                "supported in mixed-adapter batches (as in peft). Fix: run one adapter per "
                "batch with set_adapter()."
            )
        for group in groups:
            if group.adapter_name not in self.scaling:
                continue
            rows = group.rows
            slot = self.adapter_slots[group.adapter_name]
            updated = self._add_slot_output(result[rows], x[rows], slot)
            result = result.index_copy(0, rows, updated)
        return result

    # --- merging -------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight_is_finite(self, adapter_name: str) -> bool:
        """Whether merging `adapter_name` would leave the base weight free of NaN/inf."""
        weight = self.base_weight()
        if adapter_name in self.lora_magnitude_vector:
            n = dora.weight_norm_of(self, adapter_name)
            return bool(torch.isfinite(dora.merged_dense(self, adapter_name, weight, n)).all())
        is_finite = bool(torch.isfinite(weight + self.get_delta_weight(adapter_name)).all())
        return is_finite and merged_bias_is_finite(self, adapter_name)

    @torch.no_grad()
    def merge(self, adapter_names: list[str], keep_record: bool = True) -> None:
        """Add s·BA of each named adapter into the base weight (idempotent per adapter).

        The sum is taken in fp32 and rounded into the base dtype once; the few entries that
        subtracting the delta would not restore are recorded (see `ops.merge`), unless
        `keep_record` is False because the merge will never be undone.
        """
        weight = self.base_weight()
        check_bias_merge(self, adapter_names)
        # DoRA's norms against the weight before this call merges anything (as peft does)
        norms = {
            name: dora.weight_norm_of(self, name)
            for name in adapter_names
            if name in self.lora_magnitude_vector and name not in self.merged_adapters
        }
        for adapter_name in adapter_names:
            if adapter_name not in self.r or adapter_name in self.merged_adapters:
                continue
            if adapter_name in norms:
                record = dora.merge(self, adapter_name, norms[adapter_name], keep_record)
            else:
                record = merge_delta(weight, self.get_delta_weight(adapter_name), keep_record)
                merge_bias(self, adapter_name, keep_record)
            if record is not None:
                self.merge_records[adapter_name] = record
            self.merged_adapters.append(adapter_name)
        self.refresh_slots()

    def merged_module(self, adapter_names: list[str], requantize: bool = False) -> nn.Module:
        """Merge adapters for good and return the module that takes this wrapper's place.

        `merge_and_unload` calls this. A dense base is merged in place (without a record:
        the merge is never undone) and returned itself; a packed 4-bit base, which cannot
        hold the merged weight, returns a new layer instead (see `layers.packed`), which
        `requantize` makes 4-bit again. Dense bases ignore `requantize`.
        """
        self.merge(adapter_names, keep_record=False)
        return self.base_layer

    @torch.no_grad()
    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        """Subtract merged adapters from the base weight, newest first.

        Unmerging in the reverse order of merging (the default: all of them) restores the
        original weight bit for bit. Unmerging an adapter that others were merged on top of
        is exact only to rounding (one of the merge plus one of the unmerge per entry), and
        drops the records of the adapters merged after it, which no longer apply.
        """
        weight = self.base_weight()
        names = list(self.merged_adapters) if adapter_names is None else adapter_names
        dora.check_unmerge_order(self, names)
        for adapter_name in reversed(self.merged_adapters.copy()):
            if adapter_name not in names:
                continue
            is_last = self.merged_adapters[-1] == adapter_name
            position = self.merged_adapters.index(adapter_name)
            if not is_last:
                for later in self.merged_adapters[position:]:
                    self.merge_records.pop(later, None)
            record = self.merge_records.pop(adapter_name, None)
            if adapter_name in self.dora_merge_factors:
                dora.unmerge(self, adapter_name, record)
            else:
                unmerge_delta(weight, self.get_delta_weight(adapter_name), record)
                unmerge_bias(self, adapter_name)
            self.merged_adapters.remove(adapter_name)
        self.refresh_slots()
