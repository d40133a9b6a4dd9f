"""Every file a training run and a merge leave behind was put in place by `lorakit.io.atomic`.

The one rename that ends each atomic write (`atomic._put_in_place`) is wrapped to record its
targets; afterwards each file on disk must be such a target or lie in a folder that was one
(a checkpoint is renamed into place whole). A writer that bypassed the helper (a plain
`write_text`, `savefig` or `save_pretrained` into the output folder) leaves a file that was
never a target, and the test names it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.cli import main
from lorakit.io import atomic
from lorakit.train import TrainConfig, Trainer

POSITIVE = ["great film", "loved it", "wonderful acting", "a delight"]
NEGATIVE = ["terrible film", "hated it", "awful acting", "a bore"]
ROWS = [{"text": text, "label": "pos"} for text in POSITIVE]
ROWS += [{"text": text, "label": "neg"} for text in NEGATIVE]


def _classifier(tokenizer: Any) -> torch.nn.Module:
    """A 2-layer BERT classifier over the MiniLM tokenizer's vocabulary, seeded."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _record_atomic_targets(monkeypatch: pytest.MonkeyPatch) -> set[Path]:
    targets: set[Path] = set()
    put_in_place = atomic._put_in_place

    def recording(source: Path, target: Path) -> None:
        put_in_place(source, target)
        targets.add(Path(target).resolve())

    monkeypatch.setattr(atomic, "_put_in_place", recording)
    return targets


def _not_written_atomically(folder: Path, targets: set[Path]) -> list[str]:
    files = [path.resolve() for path in folder.rglob("*") if path.is_file()]
    return [
        str(path.relative_to(folder.resolve()))
        for path in files
        if not any(path == target or target in path.parents for target in targets)
    ]


def test_a_run_and_a_merge_write_every_file_through_the_atomic_helper(
    tmp_path: Path, minilm_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_dir, run_dir, merged_dir = tmp_path / "base", tmp_path / "run", tmp_path / "merged"
    _classifier(minilm_tokenizer).save_pretrained(base_dir)  # the test's own files
    minilm_tokenizer.save_pretrained(base_dir)
    targets = _record_atomic_targets(monkeypatch)

    lora = LoraConfig(
        r=2,
        target_modules=["query", "value"],
        task_type="SEQ_CLS",
        base_model_name_or_path=str(base_dir),
    )
    model = get_peft_model(_classifier(minilm_tokenizer), lora)
    config = TrainConfig(
        max_steps=4,
        batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        eval_steps=2,
        save_steps=1,
        save_total_limit=2,
        output_dir=str(run_dir),
    )
    summary = Trainer(model, minilm_tokenizer, config, ROWS, ROWS).train()
    assert (
        main(
            [
                "merge",
                "--base",
                str(base_dir),
                "--adapter",
                str(run_dir / "adapter"),
                "--out",
                str(merged_dir),
            ]
        )
        == 0
    )

    assert sorted(path.name for path in run_dir.iterdir()) == [
        "adapter",
        "checkpoints",
        "labels.json",
        "metrics.jsonl",
        "summary.json",
        "training.png",
    ]
    assert summary["plot"] == str(run_dir / "training.png")
    assert json.loads((run_dir / "labels.json").read_text()) == {"neg": 0, "pos": 1}
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-3", "checkpoint-4"]
    merged_names = {path.name for path in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= merged_names
    for folder in (run_dir, merged_dir):
        assert _not_written_atomically(folder, targets) == []
        assert [p.name for p in folder.rglob("*") if atomic.is_temp_name(p.name)] == []
