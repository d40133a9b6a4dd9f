"""End to end: files -> tokenised datasets -> padded batches that models accept."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from lorakit.train.data import BatchLoader, make_loader, prepare_datasets
from lorakit.train.data_errors import UnseenLabelError
from lorakit.train.tokenizing import IGNORE_INDEX

TRAIN_ROWS = [
    {"text": "a wonderful film", "label": "pos"},
    {"text": "boring", "label": "neg"},
    {"text": "I loved every minute of it", "label": "pos"},
    {"text": "dreadful acting", "label": "neg"},
    {"text": "fine", "label": "neutral"},
]
LOSS_TOLERANCE = 1e-5  # float32 model logits vs a float64 recomputation


def test_classification_files_to_batches(
    write_jsonl: Any, tmp_path: Path, minilm_tokenizer: Any
) -> None:
    train_path = write_jsonl(TRAIN_ROWS, name="train.jsonl")
    eval_path = tmp_path / "eval.csv"
    eval_path.write_text("sentence,label\nsuperb,pos\nawful,neg\n", encoding="utf-8")
    train, evaluation = prepare_datasets(
        train_path, minilm_tokenizer, eval_path, max_length=8, column_map={"text": "sentence"}
    )
    assert evaluation is not None
    assert (train.task, train.shape_name, len(train), len(evaluation)) == (
        "SEQ_CLS",
        "text_label",
        5,
        2,
    )
    assert train.label_to_id == {"neg": 0, "neutral": 1, "pos": 2}
    assert evaluation.label_to_id == train.label_to_id
    assert (train.num_labels, train.id_to_label) == (3, {0: "neg", 1: "neutral", 2: "pos"})
    assert [feature["labels"] for feature in evaluation] == [2, 0]
    assert train.num_tokens() == sum(
        len(minilm_tokenizer(row["text"], truncation=True, max_length=8)["input_ids"])
        for row in TRAIN_ROWS
    )

    loader = make_loader(evaluation, minilm_tokenizer, batch_size=2, shuffle=False)
    (batch,) = list(loader)
    superb = minilm_tokenizer("superb")["input_ids"]
    awful = minilm_tokenizer("awful")["input_ids"]
    width = max(len(superb), len(awful))
    assert batch["input_ids"].tolist() == [
        superb + [minilm_tokenizer.pad_token_id] * (width - len(superb)),
        awful + [minilm_tokenizer.pad_token_id] * (width - len(awful)),
    ]
    assert batch["labels"].tolist() == [2, 0]


def test_evaluation_labels_unseen_in_training_are_listed(
    write_jsonl: Any, minilm_tokenizer: Any
) -> None:
    eval_path = write_jsonl(
        [
            {"text": "meh", "label": "mixed"},
            {"text": "ok", "label": "pos"},
            {"text": "?", "label": "unsure"},
        ],
        name="eval.jsonl",
    )
    with pytest.raises(
        UnseenLabelError,
        match=r"eval\.jsonl has 2 label\(s\) never seen in the training data: 'mixed' \(first at "
        r".*eval\.jsonl line 1\), 'unsure' \(first at .*eval\.jsonl line 3\)",
    ):
        prepare_datasets(TRAIN_ROWS, minilm_tokenizer, eval_path)


def test_token_classification_label_map_comes_from_training_tags(minilm_tokenizer: Any) -> None:
    rows = [{"tokens": ["Paris", "is", "big"], "tags": ["B-LOC", "O", "O"]}]
    train, _ = prepare_datasets(rows, minilm_tokenizer)
    assert (train.task, train.label_to_id) == ("TOKEN_CLS", {"B-LOC": 0, "O": 1})
    with pytest.raises(UnseenLabelError, match=r"'B-PER' \(first at list index 0\)"):
        prepare_datasets(rows, minilm_tokenizer, [{"tokens": ["Ann"], "tags": ["B-PER"]}])


def test_loader_resumes_at_the_same_batch(minilm_tokenizer: Any) -> None:
    train, _ = prepare_datasets(TRAIN_ROWS * 3, minilm_tokenizer)
    uninterrupted = make_loader(train, minilm_tokenizer, batch_size=4, seed=9)
    reference = [batch["input_ids"] for _ in range(2) for batch in uninterrupted]  # 2 epochs
    first = make_loader(train, minilm_tokenizer, batch_size=4, seed=9)
    received = [batch["input_ids"] for batch in itertools.islice(first, 2)]
    resumed = make_loader(train, minilm_tokenizer, batch_size=4, seed=9)
    resumed.load_state_dict(first.state_dict())
    received += [batch["input_ids"] for _ in range(2) for batch in resumed]
    assert len(received) == len(reference) == 8
    assert all(torch.equal(a, b) for a, b in zip(received, reference, strict=True))


def test_loader_refuses_a_sampler_of_another_size(minilm_tokenizer: Any) -> None:
    train, _ = prepare_datasets(TRAIN_ROWS, minilm_tokenizer)
    other = make_loader(list(train.features) * 2, minilm_tokenizer, batch_size=2)
    with pytest.raises(ValueError, match="sampler covers 10 examples but the dataset has 5"):
        BatchLoader(train, other.collator, other.sampler)


def test_causal_lm_loss_falls_on_completion_tokens_only(causal_tokenizer: Any) -> None:
    transformers = pytest.importorskip("transformers")
    rows = [
        {"prompt": "question: what is two plus two? answer:", "completion": " four"},
        {"prompt": "the cat", "completion": " sat on the mat"},
    ]
    train, _ = prepare_datasets(rows, causal_tokenizer, task="CAUSAL_LM")
    (batch,) = list(make_loader(train, causal_tokenizer, batch_size=2, shuffle=False))
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(causal_tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        output = model(**batch)
    # By hand: position t predicts token t+1; keep targets whose label is not -100.
    logits = output.logits[:, :-1].double()  # (batch, length-1, vocab)
    targets = batch["labels"][:, 1:]  # (batch, length-1)
    keep = targets != IGNORE_INDEX
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs[keep].gather(1, targets[keep].unsqueeze(1))
    completion_tokens = sum(
        len(causal_tokenizer(row["completion"], add_special_tokens=False)["input_ids"]) + 1
        for row in rows
    )
    assert int(keep.sum()) == completion_tokens  # completion + EOS per row, no prompt, no padding
    assert float(output.loss) == pytest.approx(float(-picked.mean()), abs=LOSS_TOLERANCE)
