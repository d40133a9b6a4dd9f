"""`transformers.Trainer` with a lorakit `PeftModel`: adapter checkpoints, exact resumes.

transformers' `Trainer` knows peft's own classes (`isinstance(model, peft.PeftModel)` in its
`_save`, `_load_from_checkpoint` and `_load_best_model`): for them a checkpoint holds the
adapter only. A lorakit `PeftModel` is not peft's class, so the plain `Trainer` saves it as
any unknown `nn.Module`, the whole state dict (frozen base included) in `model.safetensors`.
`LorakitTrainerMixin` gives any `Trainer` class the adapter path for lorakit models, by
overriding those three methods (documented points of extension: "subclass and override"):

- checkpoints and `save_model` write the adapters with `PeftModel.save_pretrained`
  (PEFT's files, atomically), plus what `Trainer` writes beside a model (tokenizer or
  processor, `training_args.bin`);
- `resume_from_checkpoint` and `load_best_model_at_end` put the saved weights back into the
  model's adapters in place, after checking they fit (`integrations.checkpoints`); with the
  optimizer, scheduler and RNG states `Trainer` restores, training continues exactly.

Other models pass through to the `Trainer` methods unchanged. The plain `Trainer` (or any
subclass without the mixin) given a lorakit model raises when it is built, naming these
classes (`integrations.trainer_guard` says why no cleaner way exists). transformers is
imported only when `LorakitTrainer` is first used.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from ..errors import UnsupportedOptionError
from ..extras import import_optional
from ..io.atomic import write_file
from ..model import PeftModel
from .checkpoints import load_checkpoint_adapters
from .trainer_guard import lorakit_trainer_building

# Trainer writes its arguments beside every saved model under this name (transformers'
# `TRAINING_ARGS_NAME`).
TRAINING_ARGS_NAME = "training_args.bin"


class LorakitTrainerMixin:
    """Put first among a `Trainer` class's bases: `class T(LorakitTrainerMixin, Trainer)`.

    With a lorakit `PeftModel`, checkpoints are adapter folders and resuming loads them (see
    the module docstring); with any other model the `Trainer` behaves as without the mixin.

    Raises:
        UnsupportedOptionError: (at construction) `label_smoothing_factor` with a lorakit
            causal LM under `Trainer`'s own `compute_loss`, which finds causal LMs by the class
            name of peft's wrappers only and would smooth unshifted labels.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with lorakit_trainer_building():  # the plain Trainer is refused (trainer_guard)
            super().__init__(*args, **kwargs)
        model = self._lorakit_model()
        if model is not None:
            _inspect_inner_model(self, model)
            _check_label_smoothing(self, model)

    def _set_signature_columns_if_needed(self) -> None:
        """`Trainer`'s rule with a lorakit model: keep the columns the inner model's `forward`
        names (as `Trainer` does for peft's models), not only those the wrapper names."""
        import transformers

        trainer: Any = self
        inherited = super()._set_signature_columns_if_needed  # type: ignore[misc]
        model = self._lorakit_model()
        own_rule = inherited.__func__ is transformers.Trainer._set_signature_columns_if_needed
        if model is None or not own_rule or trainer._signature_columns is not None:
            inherited()
            return
        forward = inspect.signature(model.get_base_model().forward)
        labels = {"label", "label_ids", *trainer.label_names}
        trainer._signature_columns = [*forward.parameters, *sorted(labels)]

    def _lorakit_model(self) -> PeftModel | None:
        """The lorakit `PeftModel` being trained (unwrapped from accelerate), or None."""
        trainer: Any = self
        model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        return model if isinstance(model, PeftModel) else None

    def _save(
        self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """`Trainer._save`, writing a lorakit model's adapters instead of its state dict."""
        trainer: Any = self
        model = self._lorakit_model()
        if model is None:
            super()._save(output_dir, state_dict)  # type: ignore[misc]
            return
        if not trainer.args.should_save:
            return
        folder = output_dir if output_dir is not None else trainer.args.output_dir
        os.makedirs(folder, exist_ok=True)
        model.save_pretrained(folder, state_dict=state_dict)
        processor = trainer.processing_class
        if processor is None:
            processor = getattr(trainer.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(folder)
        write_file(
            os.path.join(folder, TRAINING_ARGS_NAME),
            lambda temp: torch.save(trainer.args, temp),
        )

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        """`Trainer._load_from_checkpoint`: a lorakit model's adapters are loaded in place."""
        trainer: Any = self
        target = model if model is not None else trainer.model
        unwrapped = trainer.accelerator.unwrap_model(target, keep_torch_compile=False)
        if not isinstance(unwrapped, PeftModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
            return
        load_checkpoint_adapters(unwrapped, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """`Trainer._load_best_model`: a lorakit model's adapters are loaded in place."""
        trainer: Any = self
        model = self._lorakit_model()
        if model is None:
            super()._load_best_model()  # type: ignore[misc]
            return
        load_checkpoint_adapters(model, trainer.state.best_model_checkpoint)


def _inspect_inner_model(trainer: Any, model: PeftModel) -> None:
    """Label names and `can_return_loss` from the inner model's class, as `Trainer` takes
    them for peft's models (from the wrapper they would be `["labels"]` for every model)."""
    from transformers.utils import can_return_loss, find_labels

    inner_class = type(model.get_base_model())
    if trainer.args.label_names is None:
        trainer.label_names = find_labels(inner_class)
    trainer.can_return_loss = can_return_loss(inner_class)


def _check_label_smoothing(trainer: Any, model: PeftModel) -> None:
    """Refuse what `Trainer.compute_loss` would get wrong for a lorakit causal LM."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    own_loss = inspect.getattr_static(type(trainer), "compute_loss")
    is_causal = model.get_base_model()._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    smooths_here = trainer.label_smoother is not None and trainer.compute_loss_func is None
    if smooths_here and is_causal and own_loss is transformers.Trainer.compute_loss:
        raise UnsupportedOptionError(
            f"label_smoothing_factor={trainer.args.label_smoothing_factor}: transformers.Trainer "
            "shifts the labels of a causal LM for label smoothing only when it is wrapped in "
            "peft's own classes, so it would smooth the loss of unshifted labels here. Fix: "
            "set label_smoothing_factor=0, or pass a compute_loss_func that shifts them."
        )


def lorakit_trainer_class(trainer_class: type) -> type:
    """`trainer_class` with `LorakitTrainerMixin` first among its bases, named "Lorakit" + its name.

    For a `Trainer` subclass of another library, e.g. `lorakit_trainer_class(SomeTrainer)`.
    """
    name = f"Lorakit{trainer_class.__name__}"
    doc = (
        f"`{trainer_class.__name__}` saving and resuming lorakit adapters (`LorakitTrainerMixin`)."
    )
    return type(
        name, (LorakitTrainerMixin, trainer_class), {"__module__": __name__, "__doc__": doc}
    )


def __getattr__(name: str) -> Any:
    """`LorakitTrainer`: `transformers.Trainer` with the mixin, built on first use."""
    if name != "LorakitTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    transformers = import_optional("transformers", "transformers", f"{__name__}.{name}")
    trainer_class = lorakit_trainer_class(transformers.Trainer)
    globals()[name] = trainer_class
    return trainer_class
