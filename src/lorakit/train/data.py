"""From data files to batches: the entry points the trainer and users call.

``prepare_datasets`` reads training (and evaluation) data, picks the row shape, builds the label
map from the training data only, checks the evaluation labels against it and tokenises both.
``make_loader`` then yields padded batches in a deterministic, resumable, shardable order::

    train, evaluation = prepare_datasets("train.jsonl", tokenizer, "test.jsonl", max_length=128)
    loader = make_loader(train, tokenizer, batch_size=16, seed=0)
    for batch in loader:  # dict of tensors: input_ids, attention_mask, labels
        ...
    checkpoint["data"] = loader.state_dict()

The accepted row shapes are described in ``docs/data.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.train.collate import DataCollator
from lorakit.train.labels import build_label_map, dataset_labels, invert_label_map
from lorakit.train.reading import DataSource, RawDataset, read_dataset
from lorakit.train.row_fields import Label
from lorakit.train.sampling import ShuffledBatchSampler
from lorakit.train.shapes import RowShapeName, TaskName
from lorakit.train.tokenizing import EncodeSettings, Feature, Tokenizer, encode_dataset


@dataclass
class TokenizedDataset:
    """Tokenised rows ready for the collator.

    Attributes:
        features: One dict per row with ``input_ids`` and ``labels``.
        task: The PEFT task type.
        shape_name: The row shape the data was read as.
        source_name: Where the rows came from.
        label_to_id: Class label -> id for classification tasks, else ``None``.
    """

    features: list[Feature]
    task: TaskName
    shape_name: RowShapeName
    source_name: str
    label_to_id: dict[Label, int] | None = None

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> Feature:
        return self.features[index]

    @property
    def id_to_label(self) -> dict[int, Label] | None:
        """Class id -> label (``id2label`` in ``transformers`` configs), or ``None``."""
        return None if self.label_to_id is None else invert_label_map(self.label_to_id)

    @property
    def num_labels(self) -> int | None:
        """Number of classes for classification tasks, else ``None``."""
        return None if self.label_to_id is None else len(self.label_to_id)

    def num_tokens(self) -> int:
        """Total input tokens (unpadded), e.g. for tokens/s reporting."""
        return sum(len(feature["input_ids"]) for feature in self.features)


def _tokenize(raw: RawDataset, tokenizer: Tokenizer, settings: EncodeSettings) -> TokenizedDataset:
    features = encode_dataset(raw, tokenizer, settings)
    label_to_id = dict(settings.label_to_id) if settings.label_to_id is not None else None
    return TokenizedDataset(features, raw.task, raw.shape.name, raw.source_name, label_to_id)


def prepare_datasets(
    train_data: DataSource,
    tokenizer: Tokenizer,
    eval_data: DataSource | None = None,
    *,
    task: object = None,
    max_length: int = 512,
    max_target_length: int | None = None,
    column_map: Mapping[str, str] | None = None,
    label_to_id: Mapping[Label, int] | None = None,
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Read, check and tokenise training and (optional) evaluation data.

    Args:
        train_data: Training rows: a ``.jsonl``/``.json``/``.csv``/``.tsv`` path, a list of
            dicts, or a ``datasets.Dataset``.
        tokenizer: A ``transformers`` tokenizer.
        eval_data: Evaluation rows in any of the same forms, or ``None``.
        task: A PEFT task type, or ``None`` to detect it from the first training row. The
            evaluation data is read with the training data's task.
        max_length: Truncate inputs (and seq2seq targets unless ``max_target_length``) to this.
        max_target_length: Truncation length for seq2seq targets.
        column_map: lorakit field -> your column name, e.g. ``{"text": "sentence"}``.
        label_to_id: A fixed label map (e.g. from a run being resumed); ``None`` builds one
            from the training labels.

    Returns:
        (training dataset, evaluation dataset or ``None``).

    Raises:
        DataError: Any of its subclasses; see ``lorakit.train.data_errors``.
    """
    train_raw = read_dataset(train_data, task=task, column_map=column_map)
    is_classification = train_raw.shape.name in ("text_label", "tokens_tags")
    if is_classification and label_to_id is None:
        label_to_id = build_label_map(label for label, _ in dataset_labels(train_raw))
    settings = EncodeSettings(
        max_length=max_length,
        max_target_length=max_target_length,
        label_to_id=label_to_id if is_classification else None,
    )
    train = _tokenize(train_raw, tokenizer, settings)
    if eval_data is None:
        return train, None
    eval_raw = read_dataset(eval_data, task=train_raw.task, column_map=column_map)
    return train, _tokenize(eval_raw, tokenizer, settings)


class BatchLoader:
    """Iterates padded batches of a dataset in a sampler's order.

    Collation happens in the calling process (no worker prefetch), so the sampler's position
    always equals the number of batches the loop has received, and a checkpoint's
    ``state_dict()`` resumes at exactly the next batch.
    """

    def __init__(
        self,
        dataset: Sequence[Feature] | TokenizedDataset,
        collator: DataCollator,
        sampler: ShuffledBatchSampler,
    ) -> None:
        if sampler.num_examples != len(dataset):
            raise ValueError(
                f"the sampler covers {sampler.num_examples} examples but the dataset has "
                f"{len(dataset)}; build the sampler with num_examples=len(dataset)."
            )
        self.dataset = dataset
        self.collator = collator
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for indices in self.sampler:
            yield self.collator([self.dataset[index] for index in indices])

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position and settings."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position (see ``ShuffledBatchSampler.load_state_dict``)."""
        self.sampler.load_state_dict(state)


def make_loader(
    dataset: TokenizedDataset | Sequence[Feature],
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    pad_to_multiple_of: int | None = None,
) -> BatchLoader:
    """A ``BatchLoader`` padding with the tokenizer's pad id.

    Args:
        dataset: Tokenised features.
        tokenizer: Supplies the pad id (EOS when it has no pad token).
        batch_size: Examples per batch on this rank.
        seed: Shuffle seed; epoch ``e`` uses ``seed + e``.
        shuffle: ``False`` for evaluation.
        drop_last: Drop the last incomplete batch.
        rank: This process's rank for sharding.
        world_size: Number of processes; see ``lorakit.train.sampling``.
        pad_to_multiple_of: Round padded lengths up to a multiple of this.
    """
    sampler = ShuffledBatchSampler(
        len(dataset),
        batch_size,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
    )
    collator = DataCollator.for_tokenizer(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    return BatchLoader(dataset, collator, sampler)
