"""EVA's pass over data: `get_eva_state_dict` (PEFT's name, signature and result).

Hooks on the targeted linear layers fold each batch's layer inputs into an incremental SVD
(`ops.init_eva`). A first forward finds layers whose inputs are identical (q/k/v of one
attention block): one SVD serves each such group. Batches are then cycled until, for every
layer, the components its current share of the rank budget needs have converged (cosine
similarity to the previous batch's >= tau); after each batch the budget (the sum of the
layers' ranks) is redistributed to the components that explain the most variance, at most
round(rho · r) per layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigSource, LoraConfig
from ..errors import ConfigError, UnsupportedOptionError
from ..inject.matching import plan_injection
from ..layers.linear import LoraLinear
from ..ops.init_eva import (
    IncrementalSVD,
    converged_components,
    distribute_ranks,
    group_ranks_to_leader,
    incremental_svd_update,
    whitened,
)
from .inputs import (
    ForwardFunction,
    LayerInputsFunction,
    ModelInputsFunction,
    forward_fn_dict,
    gathered_rows,
    model_device,
    model_inputs_for_layers,
    prepare_layer_inputs_default,
    prepare_layer_inputs_fn_language_modeling,
    prepare_model_inputs_fn_language_modeling,
    to_device,
)

logger = logging.getLogger(__name__)

# Above this rho, a layer's largest rank is capped by the model's largest dimension / r.
RHO_CAP_THRESHOLD = 1000


@dataclass
class _Target:
    name: str
    module: nn.Module
    r: int


@dataclass
class _LayerSVD:
    """The forward hook of one layer (or group of layers with equal inputs)."""

    name: str
    n_components: int
    tau: float
    prepare: LayerInputsFunction
    gather: bool
    model_input: Any = None
    state: IncrementalSVD | None = None
    converged: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    is_active: bool = True

    def __post_init__(self) -> None:
        self.converged = torch.zeros(self.n_components, dtype=torch.bool)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.is_active:
            return
        rows = gathered_rows(self.prepare(args, self.model_input, self.name), self.gather)
        if rows.shape[0] < self.n_components:
            logger.info(
                "EVA: %s skips a batch of %d rows (< %d components)",
                self.name,
                rows.shape[0],
                self.n_components,
            )
            return
        previous = None if self.state is None else self.state.components
        self.state = incremental_svd_update(self.state, rows, self.n_components)
        if previous is not None:
            self.converged = converged_components(previous, self.state.components, self.tau).cpu()


def _eva_targets(
    model: nn.Module, config: LoraConfig, adapter_name: str, is_peft_model: bool
) -> list[_Target]:
    """The layers EVA decomposes: a PeftModel's LoRA linear layers holding the adapter, or
    the nn.Linear / Conv1D modules get_peft_model would adapt with `config`."""
    if is_peft_model:
        return [
            _Target(name, module, module.r[adapter_name])
            for name, module in model.named_modules()
            if isinstance(module, LoraLinear) and adapter_name in module.r
        ]
    plan = plan_injection(model, config)
    modules = dict(model.named_modules())
    return [
        _Target(target.key, modules[target.key], target.r)
        for target in plan.targets
        if type(modules[target.key]) is nn.Linear or type(modules[target.key]).__name__ == "Conv1D"
    ]


def _layer_functions(
    targets: list[_Target],
    prepare_layer_inputs_fn: LayerInputsFunction | Mapping[str, LayerInputsFunction] | None,
) -> dict[str, LayerInputsFunction]:
    if not isinstance(prepare_layer_inputs_fn, Mapping):
        function = prepare_layer_inputs_fn or prepare_layer_inputs_default
        return {target.name: function for target in targets}
    unknown = sorted(set(prepare_layer_inputs_fn) - {target.name for target in targets})
    if unknown:
        raise UnsupportedOptionError(
            f"prepare_layer_inputs_fn names {unknown}, which are not EVA layers of this model; "
            f"they are {[target.name for target in targets][:6]}... Fix: use those names."
        )
    return {
        target.name: prepare_layer_inputs_fn.get(target.name, prepare_layer_inputs_default)
        for target in targets
    }


def _digest(rows: torch.Tensor) -> str:
    data = rows.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return f"{tuple(rows.shape)}{rows.dtype}" + hashlib.blake2b(data, digest_size=16).hexdigest()


@contextlib.contextmanager
def _hooks(modules_and_hooks: Iterable[tuple[nn.Module, Any]]) -> Iterator[None]:
    handles = [module.register_forward_hook(hook) for module, hook in modules_and_hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _equal_input_groups(
    model: nn.Module,
    targets: list[_Target],
    functions: dict[str, LayerInputsFunction],
    run: Any,
    model_input: Any,
    gather: bool,
) -> list[list[str]]:
    """Layers grouped by identical prepared inputs on the first batch, in target order."""
    digests: dict[str, str] = {}

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name not in digests:
                rows = functions[name](args, model_input, name)
                digests[name] = _digest(gathered_rows(rows, gather))

        return hook

    with _hooks((target.module, hook_for(target.name)) for target in targets):
        run()
    unused = [target.name for target in targets if target.name not in digests]
    if unused:
        raise UnsupportedOptionError(
            f"EVA: the layers {unused[:6]} got no input from the first batch. Fix: leave them "
            "out of target_modules, or pass a forward_fn that runs them."
        )
    groups: dict[str, list[str]] = {}
    for target in targets:
        groups.setdefault(digests[target.name], []).append(target.name)
    return list(groups.values())


def _progress(items: Iterable[Any], show: bool) -> Any:
    """`items`, through a tqdm bar when `show` (tqdm is imported only then)."""
    if not show:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise UnsupportedOptionError(
            "show_progress_bar=True needs tqdm, which is not installed. Fix: pip install "
            "tqdm, or pass show_progress_bar=False."
        ) from error
    return tqdm(items, leave=False)


def _is_main_process() -> bool:
    """Rank 0 under torch.distributed (the one that shows the progress bar), else True."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _config_for(
    model: nn.Module, peft_config: ConfigSource | None, adapter_name: str, is_peft_model: bool
) -> LoraConfig:
    if peft_config is None:
        if not is_peft_model:
            raise ConfigError(
                "get_eva_state_dict(model, ...) on a model that is not a PeftModel needs "
                "peft_config. Fix: pass peft_config=LoraConfig(init_lora_weights='eva', ...)."
            )
        peft_model: Any = model
        if adapter_name not in peft_model.peft_config:
            raise ConfigError(
                f"No adapter {adapter_name!r}; adapters: {list(peft_model.peft_config)}. Fix: "
                "pass adapter_name=<one of them>."
            )
        config = peft_model.peft_config[adapter_name]
        assert isinstance(config, LoraConfig)
        return config
    config = LoraConfig.from_config(peft_config)
    if config.eva_config is None:
        raise ConfigError(
            f"peft_config has init_lora_weights={config.init_lora_weights!r} and no eva_config. "
            "Fix: set init_lora_weights='eva' (and eva_config=EvaConfig(...) if not the "
            "defaults)."
        )
    return config


def _rho(model: nn.Module, rho: float, r: int) -> float:
    """rho, capped at (largest parameter dimension) // r when above `RHO_CAP_THRESHOLD`."""
    if rho <= RHO_CAP_THRESHOLD:
        return rho
    largest = max(max(p.shape) for p in model.parameters() if p.ndim)
    return min(rho, largest // r)


def _batches(dataloader: Iterable[Any]) -> None:
    """Check that the data can be iterated more than once and is not empty."""
    if iter(dataloader) is dataloader:
        raise UnsupportedOptionError(
            "EVA cycles over the data until the components converge; a one-shot iterator "
            "cannot be repeated. Fix: pass a list of batches or a torch DataLoader."
        )
    if next(iter(dataloader), None) is None:
        raise UnsupportedOptionError("EVA got an empty dataloader. Fix: pass some batches.")


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable[Any],
    peft_config: ConfigSource | None = None,
    forward_fn: ForwardFunction | None = forward_fn_dict,
    prepare_model_inputs_fn: ModelInputsFunction | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: LayerInputsFunction
    | Mapping[str, LayerInputsFunction]
    | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """The EVA components of each layer: A's rows, with the redistributed ranks.

    Args:
        model: A lorakit `PeftModel` with an `init_lora_weights="eva"` adapter (run with
            its adapters disabled), or a plain model with `peft_config`.
        dataloader: Batches, iterated again and again (a list or a `DataLoader`).
        peft_config: The adapter's config (a lorakit or peft `LoraConfig` or a dict); only
            for a plain model, whose targets are then the nn.Linear / Conv1D modules
            `get_peft_model` would adapt.
        forward_fn: `forward_fn(model, batch)` runs one batch (default `model(**batch)`).
        prepare_model_inputs_fn: `(batch, config) -> model_input` for the layer functions;
            the default picks the attended (and, with `use_label_mask`, labelled) tokens.
            None passes a copy of the batch.
        prepare_layer_inputs_fn: `(layer_input, model_input, layer_name) -> rows (n, in)`,
            or a dict of them by layer name (the others take every row); the default takes
            the tokens picked above. None takes every row.
        adapter_name: The adapter whose layers and ranks are used (PeftModel).
        gather_distributed_inputs: Under `torch.distributed`, gather every process's rows
            (set False when each process sees the same data).
        show_progress_bar: A tqdm bar with the number of converged layers (on rank 0 only
            under torch.distributed).

    Returns:
        Layer name (as `model.named_modules()` names it) -> components (rank, in), float32,
        on the model's device; a layer given rank 0 maps to an empty (0, in) tensor.

    Raises:
        ConfigError: no config, or one without eva_config.
        UnsupportedOptionError: the data or the functions do not fit (named).
    """
    is_peft_model = hasattr(model, "peft_config") and hasattr(model, "disable_adapter")
    config = _config_for(model, peft_config, adapter_name, is_peft_model)
    eva_config = config.eva_config
    assert eva_config is not None, "LoraConfig fills eva_config for init_lora_weights='eva'"
    _batches(dataloader)
    targets = _eva_targets(model, config, adapter_name, is_peft_model)
    if not targets:
        raise ConfigError(
            f"EVA found no linear LoRA layer of adapter {adapter_name!r} (nn.Linear and Conv1D "
            "only; embeddings and convolutions keep init_lora_weights=True)."
        )
    functions = _layer_functions(targets, prepare_layer_inputs_fn)
    run = forward_fn or forward_fn_dict
    peft_model: Any = model
    context = peft_model.disable_adapter() if is_peft_model else contextlib.nullcontext()
    was_training = model.training
    device = model_device(model)
    model.eval()
    try:
        with context:
            return _run_eva(
                model,
                dataloader,
                config,
                targets,
                functions,
                run,
                prepare_model_inputs_fn,
                gather_distributed_inputs,
                show_progress_bar and _is_main_process(),
                device,
            )
    finally:
        model.train(was_training)


def _run_eva(
    model: nn.Module,
    dataloader: Iterable[Any],
    config: LoraConfig,
    targets: list[_Target],
    functions: dict[str, LayerInputsFunction],
    run: ForwardFunction,
    prepare_model_inputs_fn: ModelInputsFunction | None,
    gather: bool,
    show_progress_bar: bool,
    device: torch.device | None,
) -> dict[str, torch.Tensor]:
    eva_config = config.eva_config
    assert eva_config is not None
    rho = _rho(model, eva_config.rho, config.r)
    first = to_device(next(iter(dataloader)), device)
    model_input = model_inputs_for_layers(first, prepare_model_inputs_fn, config)
    groups = _equal_input_groups(
        model, targets, functions, lambda: run(model, first), model_input, gather
    )
    largest_rank = {target.name: round(target.r * rho) for target in targets}
    for group in groups:  # one SVD per group: its layers may take as many components
        shared = max(largest_rank[name] for name in group)
        largest_rank.update(dict.fromkeys(group, shared))
    leader_of = {name: group[0] for group in groups for name in group}
    modules = {target.name: target.module for target in targets}
    svds = {
        group[0]: _LayerSVD(
            group[0], largest_rank[group[0]], eva_config.tau, functions[group[0]], gather
        )
        for group in groups
    }
    # Leaders, then the layers sharing their SVD: ties in the ranking break in this order.
    order = list(svds) + [name for group in groups for name in group[1:]]
    ranks = {target.name: largest_rank[target.name] for target in targets}
    rank_budget = sum(target.r for target in targets)
    with _hooks((modules[leader], svd) for leader, svd in svds.items()):
        bar = _progress(itertools.cycle(dataloader), show_progress_bar)
        for batch in bar:
            batch = to_device(batch, device)
            model_input = model_inputs_for_layers(batch, prepare_model_inputs_fn, config)
            for leader, svd in svds.items():
                svd.is_active = not bool(svd.converged[: ranks[leader]].all())
                svd.model_input = model_input
            done = sum(len(group) for group in groups if not svds[group[0]].is_active)
            if show_progress_bar:
                bar.set_description(f"{done}/{len(targets)} layers have converged")
            if done == len(targets):
                break
            run(model, batch)
            if any(svd.state is None for svd in svds.values()):
                continue  # a layer skipped every batch so far: too few rows
            ratios = {
                name: _state(svds[leader_of[name]]).explained_variance_ratio[: largest_rank[name]]
                for name in order
            }
            ranks = distribute_ranks(ratios, rank_budget)
            group_ranks_to_leader(ranks, groups)
        if show_progress_bar:
            bar.close()
    result: dict[str, torch.Tensor] = {}
    for name in order:
        state, rank = _state(svds[leader_of[name]]), ranks[name]
        components = state.components[:rank]
        if eva_config.whiten:
            components = whitened(components, state.singular_values[:rank])
        result[name] = components.to(dtype=torch.float32, device=device)
    return result


def _state(svd: _LayerSVD) -> IncrementalSVD:
    assert svd.state is not None, "ranks are distributed once every layer has components"
    return svd.state
