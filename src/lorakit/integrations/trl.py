"""TRL's `SFTTrainer` with a lorakit `PeftModel`: pass the wrapped model, not `peft_config`.

`LorakitSFTTrainer` is `trl.SFTTrainer` with `LorakitTrainerMixin` (adapter checkpoints,
exact resumes) and two corrections TRL makes for peft's own classes only:

- TRL replaces the model's `forward` with a fused LM head (log-probabilities computed in
  chunks from the backbone's hidden states). It patches peft's inner model, but a lorakit
  wrapper itself, whose `base_model` returns logits, not hidden states. The patch is moved
  to the inner model, `PeftModel.get_base_model()`, where TRL puts it for peft.
- The fused head multiplies by `lm_head.weight` directly, so an adapter on `lm_head` would
  never act nor train: refused, as TRL refuses it for peft.

`peft_config=` hands the model to peft's `get_peft_model`, which takes only peft's configs: a
lorakit `LoraConfig` there, or any `peft_config` with a model lorakit already wrapped, raises
`UnsupportedOptionError` with the supported way, `LorakitSFTTrainer(model=get_peft_model(
model, config), ...)`. trl is imported only when `LorakitSFTTrainer` is first used.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..config import LoraConfig
from ..errors import UnsupportedOptionError
from ..extras import import_optional
from ..layers.base import LoraLayer
from ..model import PeftModel
from .transformers import LorakitTrainerMixin

# The per-token fields TRL 1.16's SFTTrainer asks of its fused LM head (`is_top1` feeds the
# `mean_token_accuracy` metric).
FUSED_HEAD_OUTPUTS = ("log_probs", "entropy", "is_top1")
# The attribute `add_fused_lm_head` sets on the model it patches.
PATCHED_FORWARD = "forward"


class LorakitSFTMixin(LorakitTrainerMixin):
    """`LorakitTrainerMixin` plus the `SFTTrainer` corrections of the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import trl

        bound = inspect.signature(trl.SFTTrainer.__init__).bind(self, *args, **kwargs)
        model = bound.arguments.get("model")
        check_sft_arguments(model, bound.arguments.get("peft_config"))
        super().__init__(*args, **kwargs)
        peft_model = self._lorakit_model()
        if peft_model is not None:
            _move_fused_head(peft_model)


def check_sft_arguments(model: object, peft_config: object) -> None:
    """Refuse what `SFTTrainer` would do wrong with lorakit objects (module docstring).

    Raises:
        UnsupportedOptionError: `peft_config` is a lorakit `LoraConfig`; a lorakit model comes
            with a `peft_config`; or its `lm_head` holds an adapter.
    """
    fix = "Fix: LorakitSFTTrainer(model=get_peft_model(model, config), ...) without peft_config."
    if isinstance(peft_config, LoraConfig):
        raise UnsupportedOptionError(
            "SFTTrainer(peft_config=<lorakit LoraConfig>): TRL wraps the model with peft's "
            f"get_peft_model, which takes only peft's configs. {fix}"
        )
    if isinstance(model, PeftModel) and peft_config is not None:
        raise UnsupportedOptionError(
            f"SFTTrainer(peft_config={type(peft_config).__name__}(...)) with a lorakit "
            "PeftModel: TRL would wrap it in a second, peft adapter. Fix: leave out "
            "peft_config; the lorakit model trains its own adapters."
        )
    if isinstance(model, PeftModel):
        head = model.get_base_model().get_output_embeddings()  # type: ignore[operator]
        if isinstance(head, LoraLayer):
            raise UnsupportedOptionError(
                "An adapter on lm_head under SFTTrainer: TRL computes log-probabilities from "
                "lm_head.weight directly, so the adapter would neither act nor train. Fix: "
                "leave lm_head out of target_modules."
            )


def _move_fused_head(model: PeftModel) -> None:
    """Put TRL's fused LM head on the inner model, where it patches peft's models."""
    from trl.trainer.utils import add_fused_lm_head

    if PATCHED_FORWARD not in model.__dict__:
        return  # this TRL patched nothing on the wrapper
    del model.__dict__[PATCHED_FORWARD]
    inner: Any = model.get_base_model()  # a transformers causal LM
    add_fused_lm_head(inner, outputs=FUSED_HEAD_OUTPUTS)


def __getattr__(name: str) -> Any:
    """`LorakitSFTTrainer`: `trl.SFTTrainer` with `LorakitSFTMixin`, built on first use."""
    if name != "LorakitSFTTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    trl = import_optional("trl", "trl", f"{__name__}.{name}")
    trainer_class = type(
        name,
        (LorakitSFTMixin, trl.SFTTrainer),
        {"__module__": __name__, "__doc__": "`trl.SFTTrainer` for lorakit models (module doc)."},
    )
    globals()[name] = trainer_class
    return trainer_class
