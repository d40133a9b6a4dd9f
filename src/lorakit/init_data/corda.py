"""`preprocess_corda`: CorDA's covariance pass (PEFT's signature, files and semantics).

Hooks on the targeted linear layers sum, over the samples `run_model` feeds the model, the
covariance xᵀx of each layer's inputs (each sample's x divided by |max x|), then average it.
Each layer's weight is decomposed against its covariance (`ops.init_corda`) and the r
triplets CorDA keeps are left on the layer as `eigens`, where `get_peft_model` with
`init_lora_weights="corda"` reads them (`layers.init`): the adapter takes them and the base
weight becomes the residual. `cache_file` / `covariance_file` save (and, when present, reuse)
the triplets / covariances, with PEFT's keys, so either library reads the other's files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import ConfigSource, LoraConfig
from ..errors import ConfigError, UnsupportedOptionError
from ..inject.matching import plan_injection
from ..io.atomic import write_file
from ..layers.init import CORDA_EIGENS_ATTRIBUTE
from ..ops.init_corda import (
    CordaEigens,
    covariance_decomposition,
    sample_covariance,
    select_triplets,
)
from .inputs import first_tensor, model_device

logger = logging.getLogger(__name__)

EIGEN_FIELDS: tuple[str, ...] = ("S_WC", "U_WC", "V_WC")


def _targets(model: nn.Module, config: LoraConfig) -> dict[str, tuple[nn.Module, int]]:
    """Path -> (module, rank) of the nn.Linear / Conv1D modules `config` adapts."""
    modules = dict(model.named_modules())
    return {
        target.key: (modules[target.key], target.r)
        for target in plan_injection(model, config).targets
        if type(modules[target.key]) is nn.Linear or type(modules[target.key]).__name__ == "Conv1D"
    }


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight (Conv1D stores (in, out))."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def _is_present(path: str | None) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


def _load(path: str, device: torch.device | None, what: str) -> dict[str, torch.Tensor]:
    loaded = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(loaded, dict):
        raise UnsupportedOptionError(f"{what} {path!r} does not hold a dict of tensors.")
    return loaded


def _save(path: str, tensors: dict[str, torch.Tensor]) -> None:
    write_file(path, lambda temp: torch.save(tensors, temp))


def _missing(path: str, what: str, keys: list[str]) -> UnsupportedOptionError:
    return UnsupportedOptionError(
        f"{what} {path!r} lacks {keys[:4]} (made for another model or target_modules?). Fix: "
        f"delete it, or set {what} to another path, to build it again."
    )


def _sample_rows(x: torch.Tensor) -> torch.Tensor:
    """One layer input as samples of rows: (samples, tokens, in). A 2-D input is one
    sample; a (batch, tokens, in) input is `batch` samples, each normalised on its own."""
    return x[None] if x.ndim == 2 else x.reshape(-1, x.shape[-2], x.shape[-1])


class _CovarianceHook:
    """Sums one layer's sample covariances and counts the samples."""

    def __init__(self, name: str, keep_input_dtype: bool) -> None:
        self.name = name
        self.keep_input_dtype = keep_input_dtype
        self.total: torch.Tensor | None = None
        self.count = 0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        x = first_tensor(args, self.name).detach()
        if not self.keep_input_dtype:
            x = x.float()
        for sample in _sample_rows(x):
            covariance = sample_covariance(sample)
            if not torch.isfinite(covariance).all():
                raise UnsupportedOptionError(
                    f"CorDA: the input of {self.name!r} gives a non-finite covariance "
                    "(non-finite or all-zero inputs). Fix: check the data run_model feeds."
                )
            self.total = covariance if self.total is None else self.total + covariance
            self.count += 1


def _covariances(
    model: nn.Module,
    config: LoraConfig,
    targets: dict[str, tuple[nn.Module, int]],
    run_model: Callable[[], Any] | None,
    hooked_model: nn.Module | None,
) -> dict[str, torch.Tensor]:
    corda_config = config.corda_config
    assert corda_config is not None
    path = corda_config.covariance_file
    if path is not None and _is_present(path):
        loaded = _load(path, model_device(model), "covariance_file")
        missing = [name for name in targets if name not in loaded]
        if missing:
            raise _missing(path, "covariance_file", missing)
        return {name: loaded[name] for name in targets}
    if run_model is None:
        raise UnsupportedOptionError(
            "preprocess_corda needs run_model (a callable that runs the model on your samples) "
            "when neither corda_config.cache_file nor corda_config.covariance_file exists yet."
        )
    hooked = model if hooked_model is None else hooked_model
    hooked_targets = _targets(hooked, config)
    hooks = {
        name: _CovarianceHook(name, corda_config.use_float16_for_covariance)
        for name in hooked_targets
        if name in targets
    }
    handles = [hooked_targets[name][0].register_forward_hook(hook) for name, hook in hooks.items()]
    was_training = hooked.training
    hooked.eval()
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
        hooked.train(was_training)
    unseen = [name for name in targets if name not in hooks or hooks[name].count == 0]
    if unseen:
        raise UnsupportedOptionError(
            f"CorDA: run_model ran no input through {unseen[:4]}. Fix: run the model on your "
            "samples in run_model, or leave those layers out of target_modules."
        )
    covariances = {}
    for name, hook in hooks.items():
        assert hook.total is not None
        covariances[name] = hook.total / hook.count
        if not corda_config.prune_temporary_fields:  # PEFT's temporary fields, kept
            module: Any = targets[name][0]  # plain attributes, as PEFT leaves them
            module.sample_count = hook.count
            module.covariance_matrix = covariances[name]
    if path is not None:
        _save(path, covariances)
    return covariances


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: ConfigSource,
    run_model: Callable[[], Any] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Leave CorDA's triplets on each targeted layer, for `get_peft_model` to use.

    Call it on the plain model with the config you then pass to `get_peft_model`
    (`init_lora_weights="corda"`). Each M x N linear layer holds an N x N covariance during
    the pass.

    Args:
        model: The plain model (its targeted nn.Linear / Conv1D layers get `eigens`).
        lora_config: The adapter's config (lorakit or peft `LoraConfig`, or a dict) with
            `corda_config`; its targets and ranks are used.
        run_model: Runs the model on your samples (inference); not needed when
            `cache_file` or `covariance_file` already exists.
        hooked_model: Another model with the same module paths to run instead (e.g. one
            sharing the weights on other devices); its covariances are used for `model`.

    Raises:
        ConfigError: the config has no corda_config.
        UnsupportedOptionError: no run_model and no file to read, files made for another
            model, a targeted layer run_model never reaches, non-finite inputs.
    """
    config = LoraConfig.from_config(lora_config)
    corda_config = config.corda_config
    if corda_config is None:
        raise ConfigError(
            f"preprocess_corda needs corda_config; the config has init_lora_weights="
            f"{config.init_lora_weights!r}. Fix: LoraConfig(init_lora_weights='corda', "
            "corda_config=CordaConfig(...))."
        )
    targets = _targets(model, config)
    device = model_device(model)
    cache = corda_config.cache_file
    if cache is not None and _is_present(cache):
        loaded = _load(cache, device, "cache_file")
        keys = [f"{name}.eigens.{field}" for name in targets for field in EIGEN_FIELDS]
        missing = [key for key in keys if key not in loaded]
        if missing:
            raise _missing(cache, "cache_file", missing)
        for name, (cached, _) in targets.items():
            fields = {field: loaded[f"{name}.eigens.{field}"] for field in EIGEN_FIELDS}
            setattr(cached, CORDA_EIGENS_ATTRIBUTE, CordaEigens(**fields))
        return
    covariances = _covariances(model, config, targets, run_model, hooked_model)
    for name, (layer, r) in targets.items():
        decomposed: Any = layer  # plain attributes, as PEFT leaves them
        if corda_config.verbose:
            logger.info("CorDA: decomposing %s (r=%d, %s)", name, r, corda_config.corda_method)
        U, S, V = covariance_decomposition(_dense_weight(decomposed), covariances[name])
        eigens = select_triplets(U, S, V, r, corda_config.corda_method)
        setattr(decomposed, CORDA_EIGENS_ATTRIBUTE, eigens)
        if not corda_config.prune_temporary_fields:
            decomposed.corda_method = corda_config.corda_method
            decomposed.rank = r
    if cache is not None:
        _save(
            cache,
            {
                f"{name}.eigens.{field}": getattr(getattr(module, CORDA_EIGENS_ATTRIBUTE), field)
                for name, (module, _) in targets.items()
                for field in EIGEN_FIELDS
            },
        )
