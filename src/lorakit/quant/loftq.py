"""LoftQ for one layer: a full-precision linear map becomes a 4-bit `QuantLinear` plus A and B.

`LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=N))`
given to `get_peft_model` (or `PeftModel.add_adapter`) on a full-precision model replaces each
targeted `torch.nn.Linear` and transformers `Conv1D` by a `QuantLinear` (NF4, blocks of 64,
double quantization, computing in the layer's dtype) wrapped by a `LoraQuantLinear`, whose
adapter starts at the LoftQ factors: dequant(Q) + s · B A approximates the original weight
better than dequant(quantize(W)) alone, so the quantized model starts closer to the original
(see `lorakit.ops.loftq` for the math). Layers are converted one at a time and each
full-precision weight is released as soon as its layer is replaced, so peak memory stays near
the size of the full-precision model. Other targeted types are refused before anything changes.

Saving writes an ordinary PEFT adapter (A and B, with `init_lora_weights="loftq"` in its
config). Those A and B only make sense on the very same 4-bit base: keep the quantized base
the adapter was made with (`peft_model.unload()` returns it; save its `state_dict()`, which
holds the packed codes), and load the adapter onto that. Quantizing the original weights
again gives the same codes only with `loftq_iter=1`; with more iterations Q is the
quantization of W − s · B A, which cannot be rebuilt without the adapter. On the
full-precision base the adapter adds its correction to a weight that does not need it.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import TargetModuleError, UnsupportedModuleError
from ..layers.base import LoraLayer
from ..layers.registry import is_transformers_conv1d
from ..ops.loftq import LoftQResult, loftq_decompose
from ..ops.nf4 import FLOAT_DTYPES
from .linear import QuantConfig, QuantLinear

LOFTQ_LAYER_TYPES = ("torch.nn.Linear", "transformers.pytorch_utils.Conv1D")


def check_loftq_module(key: str, module: nn.Module) -> None:
    """Raise unless LoftQ can convert `module` (found at `key`) into a 4-bit layer.

    Raises:
        TargetModuleError: the module already carries adapters, or its weight has no data
            or a dtype that cannot be quantized.
        UnsupportedModuleError: the module is not a plain `nn.Linear` or `Conv1D`.
    """
    if isinstance(module, LoraLayer):
        raise TargetModuleError(
            f"init_lora_weights='loftq' replaces {key!r} by a 4-bit layer, but it already holds "
            f"adapters {module.adapter_names} that were made for its full-precision weight. "
            "Add the LoftQ adapter first, to a model without adapters on these layers."
        )
    if type(module) is not nn.Linear and not is_transformers_conv1d(module):
        hint = ""
        if isinstance(module, QuantLinear):
            hint = " It is already quantized: LoftQ needs the full-precision weight."
        raise UnsupportedModuleError(
            f"init_lora_weights='loftq' cannot convert {key!r}, a {type(module).__name__}; it "
            f"works on {list(LOFTQ_LAYER_TYPES)} holding full-precision weights.{hint} Leave "
            "it out of target_modules (or add it to exclude_modules), or apply LoftQ to the "
            "full-precision model."
        )
    weight = module.weight
    assert isinstance(weight, Tensor)
    if weight.dtype not in FLOAT_DTYPES or weight.is_meta or weight.numel() == 0:
        raise TargetModuleError(
            f"init_lora_weights='loftq' cannot quantize {key!r}: its weight is {weight.dtype} "
            f"on {weight.device} with shape {tuple(weight.shape)}; it needs a non-empty weight "
            f"in {FLOAT_DTYPES} holding data. Load the weights first, or leave it out of "
            "target_modules."
        )


def dense_weight(module: nn.Module) -> Tensor:
    """The (out, in) weight of an `nn.Linear`, or the transposed (in, out) weight of a `Conv1D`."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight.detach().t() if is_transformers_conv1d(module) else weight.detach()


def quant_linear_holding(
    result: LoftQResult, bias: nn.Parameter | None, config: QuantConfig
) -> QuantLinear:
    """A `QuantLinear` whose buffers are `result.quantized` (no copy) and whose bias is `bias`."""
    q = result.quantized
    out_features, in_features = q.shape
    layer = QuantLinear(
        in_features,
        out_features,
        bias=False,
        config=config,
        device=q.packed.device,
        weight_dtype=q.dtype,
    )
    layer.weight_packed = q.packed
    layer.weight_absmax = q.absmax
    layer.weight_nested_absmax = q.nested_absmax
    layer.weight_offset = q.offset
    layer.bias = bias
    return layer


def loftq_quant_linear(
    module: nn.Module,
    r: int,
    scale: float,
    num_iter: int,
    config: QuantConfig | None = None,
) -> tuple[QuantLinear, LoftQResult]:
    """Run LoftQ on one full-precision linear map; return its 4-bit layer and the factors.

    The module itself is not changed; its bias parameter is shared with the new layer.

    Args:
        module: a `torch.nn.Linear` or transformers `Conv1D` (checked by `check_loftq_module`).
        r: LoRA rank.
        scale: LoRA scale s (lora_alpha / r, or / √r with rsLoRA).
        num_iter: LoftQ iterations (`LoftQConfig.loftq_iter`).
        config: how to quantize; default NF4, blocks of 64, double quantization, computing in
            the module's weight dtype.

    Returns:
        (the `QuantLinear` holding Q, the `LoftQResult` with A (r, in), B (out, r) and errors).
    """
    weight = dense_weight(module)  # (out, in)
    if config is None:
        config = QuantConfig(compute_dtype=weight.dtype)
    result = loftq_decompose(
        weight,
        r,
        scale,
        num_iter,
        quant_type=config.quant_type,
        blocksize=config.blocksize,
        double_quant=config.double_quant,
    )
    bias = getattr(module, "bias", None)
    bias = bias if isinstance(bias, nn.Parameter) else None
    return quant_linear_holding(result, bias, config), result


__all__ = [
    "LOFTQ_LAYER_TYPES",
    "check_loftq_module",
    "dense_weight",
    "loftq_quant_linear",
    "quant_linear_holding",
]
