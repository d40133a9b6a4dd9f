"""The training loop: AdamW on the adapters, evaluation, checkpoints, logs and the final adapter.

Usage, the files a run writes and how resuming works: ``docs/training.md``.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.atomic import replace_folder
from . import fsdp
from .checkpoint import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_FOLDER,
    GatheredState,
    TrainerState,
    capture_rng_state,
    check_resume_config,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
    saves_adapters,
    seed_everything,
)
from .config import TrainConfig
from .data import BatchLoader, TokenizedDataset, make_loader
from .distributed import (
    SINGLE_PROCESS,
    DistributedRun,
    detect_launch,
    gradient_sync,
    start_process_group,
    stop_process_group,
    training_device,
    wrap_model,
)
from .evaluation import autocast_context, evaluate, label_count, main_metric
from .inputs import resolve_datasets
from .reading import DataSource
from .reporting import (
    ADAPTER_FOLDER,
    METRICS_FILE,
    MODEL_FOLDER,
    LogWindow,
    MetricsLog,
    Progress,
    build_summary,
    write_run_outputs,
)
from .schedule import build_optimizer, build_scheduler
from .tokenizing import Tokenizer
from .train_errors import DistributedSetupError, NonFiniteLossError, UnsavableModelError

logger = logging.getLogger("lorakit.train")

# Key of every rank's RNG states in a checkpoint of a run on many processes.
RANK_RNG_KEY = "rng_by_rank"


def _endless(loader: BatchLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:  # the sampler moves to the next epoch each time one ends
        yield from loader


class Trainer:
    """Trains a model's trainable parameters on a dataset.

    A ``PeftModel`` trains its adapters and saves them to ``<output_dir>/adapter``. Any other
    transformers model trains every parameter with ``requires_grad`` (all of them: full
    fine-tuning) and is saved whole, with its tokenizer, to ``<output_dir>/model``.

    Args:
        model: A ``PeftModel``, or a transformers model (``save_pretrained``) for full
            fine-tuning. Only parameters with ``requires_grad`` are trained.
        tokenizer: The model's tokenizer (tokenises file/list data, pads batches).
        config: The run's options.
        train_data: A ``TokenizedDataset`` or any source ``prepare_datasets`` reads.
        eval_data: Same forms, or ``None``.
        task: PEFT task type of file/list data; ``None`` detects it from the rows.
        callbacks: Called with the trainer after every optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        config: TrainConfig,
        train_data: TokenizedDataset | DataSource,
        eval_data: TokenizedDataset | DataSource | None = None,
        *,
        task: object = None,
        callbacks: Sequence[Callable[[Trainer], None]] = (),
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.train_dataset, self.eval_dataset = resolve_datasets(
            train_data, eval_data, tokenizer, task=task, max_length=config.max_length
        )
        self.task = self.train_dataset.task
        self.device = next(model.parameters()).device
        self.output_dir = Path(config.output_dir)
        self.callbacks = list(callbacks)
        self.state = TrainerState()
        self.run: DistributedRun = SINGLE_PROCESS
        self.training_model: nn.Module = model  # the DDP wrapper on many processes
        self.is_sharded = False  # FSDP: every rank joins every forward, backward and save
        self.log: MetricsLog | None = None
        self._clock = time.perf_counter()

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: ``max_steps``, or enough for ``epochs`` epochs."""
        if self.config.max_steps is not None:
            return self.config.max_steps
        micro_batches = self.config.epochs * batches_per_epoch
        return -(-micro_batches // self.config.gradient_accumulation_steps)

    def train(self) -> dict[str, Any]:
        """Run (or resume) training; save the adapter, plot and summary.

        Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) this process is one
        rank of a data-parallel run: see ``lorakit.train.distributed``. Only rank 0 writes
        files; the process group is stopped at the end and on error. With ``strategy="fsdp"``
        the model is sharded in place and stays so after training (its adapter is saved whole).

        Returns:
            The summary (also written to ``<output_dir>/summary.json``).

        Raises:
            NonFiniteLossError: The loss became NaN/inf; the last good checkpoint is kept.
            CheckpointError: ``resume`` names no checkpoint, or one that does not fit.
            DistributedSetupError: A ``torchrun`` environment training cannot use.
        """
        run = detect_launch()
        device = training_device(run, self.model)
        is_started = start_process_group(run, device)
        has_finished = False
        try:
            self.run = run
            self.is_sharded = run.is_distributed and self.config.strategy == "fsdp"
            if device != self.device and not self.is_sharded:  # FSDP moves only the shards
                self.model.to(device)
            self.device = device
            summary = self._train()
            has_finished = True
            return summary
        except Exception as error:
            if run.is_distributed:
                logger.error("rank %d of %d failed: %r", run.rank, run.world_size, error)
            raise
        finally:
            # Drop the DDP wrapper while the process group is still registered: freed later
            # (with the GIL held), its reducer could deadlock with gloo's worker threads.
            if self.training_model is not self.model:
                self.training_model = self.model
                gc.collect()  # DDP's hooks form cycles: collect it now, not at exit
            if is_started:
                stop_process_group(wait_for_all=has_finished)

    def _train(self) -> dict[str, Any]:
        config, run = self.config, self.run
        self._check_saveable()
        seed_everything(config.seed + run.rank)  # rank 0 draws what a single process draws
        if run.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        loader = make_loader(
            self.train_dataset,
            self.tokenizer,
            batch_size=config.batch_size,
            seed=config.seed,
            rank=run.rank,
            world_size=run.world_size,
        )
        total_steps = self.total_steps(len(loader))
        if config.gradient_checkpointing:
            # Reentrant checkpointing: the fused LoRA autograd function reads its saved
            # tensors in a way the non-reentrant variant refuses.
            self.model.gradient_checkpointing_enable(  # type: ignore[operator]
                gradient_checkpointing_kwargs={"use_reentrant": True}
            )
        # Before the optimizer: FSDP replaces the parameters by their shards.
        self.training_model = wrap_model(self.model, run, self.device, config.strategy)
        optimizer = build_optimizer(self.model, config)
        scheduler = build_scheduler(optimizer, config, total_steps)
        resume_path = resolve_resume(config.resume, config.output_dir)
        rng_state = None
        if resume_path is not None:
            saved = load_checkpoint(resume_path, self.model, optimizer, scheduler)
            check_resume_config(saved.get("config", {}), config.to_dict(), resume_path)
            loader.load_state_dict(saved["loader"])
            self.state = TrainerState(**saved["trainer"])
            rng_state = saved.get(RANK_RNG_KEY, [saved["rng"]])[run.rank]
            logger.info("resuming from %s at step %d", resume_path, self.state.step)
        keep = self.state.step if resume_path is not None else None
        if run.is_main:
            self.log = MetricsLog(self.output_dir / METRICS_FILE, keep_until_step=keep)
        if rng_state is not None:
            restore_rng_state(rng_state)  # last: nothing after this may draw random numbers
        self._clock = time.perf_counter() - self.state.elapsed
        self.model.train()
        self._loop(loader, optimizer, scheduler, total_steps)
        summary = self._finish()
        self.run.barrier()  # every rank returns once rank 0's files are written
        return summary

    def _loop(
        self,
        loader: BatchLoader,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        total_steps: int,
    ) -> None:
        config, state = self.config, self.state
        total_micro = None if config.max_steps else config.epochs * len(loader)
        progress = Progress(
            total_steps, state.step, is_shown=self.run.is_main, logging_steps=config.logging_steps
        )
        batches = _endless(loader)
        window = LogWindow()
        try:
            while state.step < total_steps:
                count = config.gradient_accumulation_steps
                if total_micro is not None:
                    count = min(count, total_micro - state.micro_batches)
                group = [next(batches) for _ in range(count)]
                learning_rate = float(scheduler.get_last_lr()[0])
                loss, grad_norm, tokens = self._optimizer_step(group, optimizer)
                scheduler.step()
                state.step += 1
                state.micro_batches += count
                state.trained_tokens += tokens
                window.add(loss, tokens)
                progress.step(state.step, loss, learning_rate, window.tokens_per_second())
                if state.step % config.logging_steps == 0 or state.step == total_steps:
                    event = window.event(state.step, learning_rate, grad_norm)
                    event["epoch"] = round(state.micro_batches / len(loader), 4)
                    self._write(event)
                    progress.line(
                        state.step, event["loss"], learning_rate, event["tokens_per_second"]
                    )
                    window = LogWindow()
                self._maybe_evaluate(total_steps)
                if config.save_steps and state.step % config.save_steps == 0:
                    self._save(loader, optimizer, scheduler)
                for callback in self.callbacks:
                    callback(self)
        finally:
            progress.close()
            state.elapsed = self.elapsed()

    def _optimizer_step(
        self, group: list[dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer
    ) -> tuple[float, float, int]:
        """Forward/backward over the micro-batches, clip, step; return (loss, grad norm, tokens).

        Each micro-batch's mean loss is weighted by its share of the group's label items, so
        the step equals one step on the concatenated batch.
        """
        batches = [{key: value.to(self.device) for key, value in b.items()} for b in group]
        counts = [label_count(batch, self.task) for batch in batches]
        (total,) = self.run.sum([sum(counts)], self.device)  # label items of all ranks
        if total == 0:
            raise ValueError(
                f"step {self.state.step + 1}: the batch has no label to train on (all -100); "
                "check max_length and the rows' completions."
            )
        loss_sum = 0.0  # this rank's sum of micro-batch mean loss x label items
        for index, (batch, count) in enumerate(zip(batches, counts, strict=True)):
            is_last = index == len(batches) - 1
            # A rank must join every collective: DDP's reduction in the last backward, FSDP's
            # all-gathers in every forward and backward.
            if count == 0 and not self.is_sharded and not (is_last and self.run.is_distributed):
                continue
            with gradient_sync(self.training_model, is_last):
                with autocast_context(self.device, self.config.precision):
                    output = self.training_model(**batch)
                if count == 0:  # every rank must join the last backward (it reduces)
                    (output.logits.sum() * 0.0).backward()
                    continue
                loss = output.loss
                if not torch.isfinite(loss):
                    self._fail_non_finite("loss", float(loss.detach()))
                # DDP averages gradients over ranks; x world_size turns that into the sum.
                (loss * (count * self.run.world_size / total)).backward()
            loss_sum += float(loss.detach()) * count
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        limit = self.config.max_grad_norm or float("inf")
        grad_norm = fsdp.total_norm(torch.nn.utils.clip_grad_norm_(parameters, limit))
        if not torch.isfinite(torch.tensor(grad_norm)):
            self._fail_non_finite("gradient norm", grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        local_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
        loss_sum, tokens = self.run.sum([loss_sum, local_tokens], self.device)
        return loss_sum / total, grad_norm, int(tokens)

    def _fail_non_finite(self, what: str, value: float) -> None:
        step = self.state.step + 1
        kept = self.state.last_checkpoint or "none was written (set save_steps)"
        self._write({"event": "error", "step": step, "error": f"non-finite {what}: {value}"})
        raise NonFiniteLossError(
            f"the training {what} became {value} at step {step}; training stopped. The last good "
            f"checkpoint: {kept}. Fix: lower learning_rate (now {self.config.learning_rate}), "
            "set max_grad_norm, use precision 'fp32', or check the data; then resume."
        )

    def _maybe_evaluate(self, total_steps: int) -> None:
        step, every = self.state.step, self.config.eval_steps
        # Rank 0 evaluates the whole set; the others wait for it. Under FSDP every rank runs the
        # same batches (each forward all-gathers the weights), and rank 0 records the result.
        if not (self.run.is_main or self.is_sharded):
            return
        if self.eval_dataset is None or not (step == total_steps or (every and step % every == 0)):
            return
        loader = make_loader(
            self.eval_dataset, self.tokenizer, batch_size=self.config.batch_size, shuffle=False
        )
        metrics = evaluate(self.model, loader, self.task, self.device, self.config.precision)
        name, higher_is_better = main_metric(self.task)
        best = self.state.best_metric
        if best is None or (metrics[name] > best if higher_is_better else metrics[name] < best):
            self.state.best_metric, self.state.best_step = metrics[name], step
        self._write({"event": "eval", "step": step, **metrics})
        if self.run.is_main:
            logger.info("step %d  %s", step, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def _save(
        self,
        loader: BatchLoader,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> None:
        rng_by_rank = self.run.gather(capture_rng_state())  # every rank joins
        gathered = None
        if self.is_sharded:  # every rank joins the all-gathers; rank 0 writes
            gathered = GatheredState(
                trainable=fsdp.gather_trainable(self.model),
                optimizer=fsdp.gather_optimizer_state(optimizer),
                adapter=fsdp.gather_adapter_state(self.model),
            )
        state = dataclasses.replace(self.state, elapsed=self.elapsed())
        payload = {
            "step": state.step,
            "loader": loader.state_dict(),
            "trainer": dataclasses.asdict(state),
            "config": self.config.to_dict(),
        }
        path = self.output_dir / CHECKPOINTS_FOLDER / f"{CHECKPOINT_PREFIX}{state.step}"
        if self.run.is_main:
            extra = {RANK_RNG_KEY: rng_by_rank} if self.run.is_distributed else None
            path = save_checkpoint(
                self.output_dir,
                self.model,
                optimizer,
                scheduler,
                payload,
                self.config.save_total_limit,
                extra,
                gathered,
            )
        self.run.barrier()  # no rank runs ahead of a checkpoint that is not written yet
        self.state.last_checkpoint = str(path)

    def elapsed(self) -> float:
        """Wall seconds of the run so far, earlier (interrupted) parts included."""
        return time.perf_counter() - self._clock

    def _write(self, event: dict[str, Any]) -> None:
        if not self.run.is_main:  # rank 0 keeps the log
            return
        assert self.log is not None, "the metrics log is opened by train()"
        self.log.write(event)

    def _check_saveable(self) -> None:
        """Refuse, before any step, a model whose end-of-run save would fail.

        Raises:
            UnsavableModelError: Neither a ``PeftModel`` nor a model with ``save_pretrained``.
            DistributedSetupError: Full fine-tuning under ``strategy="fsdp"``.
        """
        if saves_adapters(self.model):
            return
        if not callable(getattr(self.model, "save_pretrained", None)):
            raise UnsavableModelError(
                f"the Trainer saves a {type(self.model).__name__} at the end of the run, but it "
                "has no save_pretrained; wrap it with lorakit.get_peft_model (LoRA), or pass a "
                "transformers model (full fine-tuning)."
            )
        if self.is_sharded:
            raise DistributedSetupError(
                f"strategy='fsdp' gathers and saves adapters only; this {type(self.model).__name__}"
                " is not a PeftModel (full fine-tuning). Use strategy='ddp', or wrap the model "
                "with lorakit.get_peft_model."
            )

    def _finish(self) -> dict[str, Any]:
        is_adapter = saves_adapters(self.model)
        # Under FSDP every rank joins the gathering of the adapter's shards.
        adapter_state = fsdp.gather_adapter_state(self.model) if self.is_sharded else None
        if not self.run.is_main:  # files are rank 0's; the others report their counters
            return build_summary(self.model, self.state, main_metric(self.task)[0], [])
        saved_folder = ADAPTER_FOLDER if is_adapter else MODEL_FOLDER
        folder = self.output_dir / saved_folder
        if is_adapter:
            self.model.save_pretrained(folder, state_dict=adapter_state)  # type: ignore[operator]
        else:  # full fine-tuning: the whole model and its tokenizer, for from_pretrained
            with replace_folder(folder) as staging:
                self.model.save_pretrained(staging)  # type: ignore[operator]
                save_tokenizer = getattr(self.tokenizer, "save_pretrained", None)
                if callable(save_tokenizer):
                    save_tokenizer(staging)
        events = self.log.events if self.log is not None else []
        return write_run_outputs(
            self.model,
            self.state,
            events,
            self.output_dir,
            main_metric(self.task)[0],
            self.train_dataset.label_to_id,
            saved_folder=saved_folder,
        )


def finetune(
    model: nn.Module,
    tokenizer: Tokenizer,
    train_data: TokenizedDataset | DataSource,
    eval_data: TokenizedDataset | DataSource | None = None,
    config: TrainConfig | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train ``model`` in one call: ``Trainer(...).train()`` with ``config`` + ``overrides``.

    Example: ``finetune(peft_model, tokenizer, "train.jsonl", max_steps=100, output_dir="run")``.

    Returns:
        The run's summary.
    """
    config = (config or TrainConfig()).with_overrides(overrides)
    return Trainer(model, tokenizer, config, train_data, eval_data).train()
