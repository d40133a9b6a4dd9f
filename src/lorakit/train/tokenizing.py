"""Turning checked rows into token ids and labels, one encoder per row shape.

Features hold ``input_ids`` and ``labels`` only; the collator builds attention masks from the
lengths. Label value ``IGNORE_INDEX`` (-100) marks positions that carry no loss, as in
``transformers`` and ``torch.nn.CrossEntropyLoss``.

Causal LM rules:
- ``text`` rows: the tokenizer's special tokens (e.g. BOS), then the text, then EOS; every token
  is a label.
- ``prompt``/``completion`` rows: the prompt with the tokenizer's special tokens, the completion
  without them, then EOS; prompt positions are labelled -100 so loss falls on the completion only.
- ``messages`` rows: rendered with the tokenizer's chat template; only the assistant turns carry
  labels. Each turn's text is found by rendering the conversation up to it, so the template must
  render a prefix of a conversation as a prefix of the whole (true of common templates).
EOS is appended only where the tokenizer did not already end the ids with it. Sequences are
truncated on the right to ``max_length``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lorakit.train.data_errors import TokenizerCapabilityError, TruncationError
from lorakit.train.labels import check_labels_known, dataset_labels
from lorakit.train.reading import RawDataset
from lorakit.train.row_fields import Label
from lorakit.train.shapes import RowShapeName

IGNORE_INDEX = -100

# A transformers PreTrainedTokenizerBase; typed loosely so this module never imports transformers.
Tokenizer = Any
Feature = dict[str, Any]


@dataclass(frozen=True)
class EncodeSettings:
    """What every encoder needs besides the row.

    Attributes:
        max_length: Longest input (and, unless ``max_target_length`` is set, target) in tokens.
        max_target_length: Longest seq2seq target in tokens; ``None`` uses ``max_length``.
        label_to_id: Class label -> id for classification shapes.
    """

    max_length: int
    max_target_length: int | None = None
    label_to_id: Mapping[Label, int] | None = None


def _ids(tokenizer: Tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _append_eos(ids: list[int], tokenizer: Tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None or (ids and ids[-1] == eos):
        return ids
    return [*ids, eos]


def _require_labels(labels: list[int], location: str, reason: str) -> None:
    if all(label == IGNORE_INDEX for label in labels):
        raise TruncationError(f"{location}: no token is left to train on: {reason}")


def _encode_text(
    row: Mapping[str, Any], location: str, tokenizer: Tokenizer, settings: EncodeSettings
) -> Feature:
    ids = _append_eos(_ids(tokenizer, row["text"], add_special_tokens=True), tokenizer)
    ids = ids[: settings.max_length]
    _require_labels(ids or [IGNORE_INDEX], location, "the text encodes to no tokens.")
    return {"input_ids": ids, "labels": list(ids)}


def _encode_prompt_completion(
    row: Mapping[str, Any], location: str, tokenizer: Tokenizer, settings: EncodeSettings
) -> Feature:
    prompt = _ids(tokenizer, row["prompt"], add_special_tokens=True)
    completion = _append_eos(
        _ids(tokenizer, row["completion"], add_special_tokens=False), tokenizer
    )
    ids = [*prompt, *completion][: settings.max_length]
    labels = [*([IGNORE_INDEX] * len(prompt)), *completion][: settings.max_length]
    _require_labels(
        labels,
        location,
        f"the prompt is {len(prompt)} tokens and max_length={settings.max_length} cuts off the "
        f"whole completion ({len(completion)} tokens). Raise max_length or shorten the prompt.",
    )
    return {"input_ids": ids, "labels": labels}


def _render_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, str]],
    location: str,
    *,
    add_generation_prompt: bool,
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as error:  # Jinja templates raise arbitrary errors; add the row's location.
        raise TokenizerCapabilityError(
            f"{location}: the tokenizer's chat template failed on this conversation "
            f"({type(error).__name__}: {error}). Check the roles' order the template expects."
        ) from error
    return str(text)


def _chat_segments(
    messages: list[dict[str, str]], location: str, tokenizer: Tokenizer
) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant_turn) pieces."""
    full = _render_chat(tokenizer, messages, location, add_generation_prompt=False)
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_chat(tokenizer, messages[:index], location, add_generation_prompt=True)
        through = _render_chat(
            tokenizer, messages[: index + 1], location, add_generation_prompt=False
        )
        if not (full.startswith(before) and full.startswith(through) and cursor <= len(before)):
            raise TokenizerCapabilityError(
                f"{location}: the chat template renders the conversation up to message {index} "
                "differently from the whole conversation, so the assistant's tokens cannot be "
                "located. Convert these rows to prompt/completion rows instead."
            )
        segments += [(full[cursor : len(before)], False), (full[len(before) : len(through)], True)]
        cursor = len(through)
    segments.append((full[cursor:], False))
    return [(text, is_assistant) for text, is_assistant in segments if text]


def _encode_chat(
    row: Mapping[str, Any], location: str, tokenizer: Tokenizer, settings: EncodeSettings
) -> Feature:
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerCapabilityError(
            f"{location}: chat rows ('messages') need a tokenizer with a chat template, and "
            f"{type(tokenizer).__name__} has none. Set tokenizer.chat_template to a Jinja "
            "template (or load the model's instruct tokenizer), or convert the rows to "
            "prompt/completion rows."
        )
    ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in _chat_segments(row["messages"], location, tokenizer):
        # The template writes special tokens such as BOS as text; do not add them twice.
        piece = _ids(tokenizer, text, add_special_tokens=False)
        ids += piece
        labels += piece if is_assistant else [IGNORE_INDEX] * len(piece)
    ids, labels = ids[: settings.max_length], labels[: settings.max_length]
    _require_labels(
        labels,
        location,
        f"max_length={settings.max_length} cuts off every assistant turn. Raise max_length.",
    )
    return {"input_ids": ids, "labels": labels}


def _truncated_ids(tokenizer: Tokenizer, text: Any, max_length: int, **kwargs: Any) -> Any:
    return tokenizer(text, truncation=True, max_length=max_length, **kwargs)


def _class_id(label: Label, settings: EncodeSettings) -> int:
    assert settings.label_to_id is not None, "encode_dataset checks classification label maps"
    return settings.label_to_id[label]


def _encode_text_label(
    row: Mapping[str, Any], location: str, tokenizer: Tokenizer, settings: EncodeSettings
) -> Feature:
    ids = list(_truncated_ids(tokenizer, row["text"], settings.max_length)["input_ids"])
    return {"input_ids": ids, "labels": _class_id(row["label"], settings)}


def _encode_tokens_tags(
    row: Mapping[str, Any], location: str, tokenizer: Tokenizer, settings: EncodeSettings
) -> Feature:
    encoding = _truncated_ids(
        tokenizer, row["tokens"], settings.max_length, is_split_into_words=True
    )
    labels: list[int] = []
    previous_word = None
    # The first sub-token of each word carries the word's tag; later sub-tokens and special
    # tokens (word id None) carry no loss.
    for word_id in encoding.word_ids():
        is_first_piece = word_id is not None and word_id != previous_word
        labels.append(_class_id(row["tags"][word_id], settings) if is_first_piece else IGNORE_INDEX)
        previous_word = word_id
    return {"input_ids": list(encoding["input_ids"]), "labels": labels}


def _encode_source_target(
    row: Mapping[str, Any], location: str, tokenizer: Tokenizer, settings: EncodeSettings
) -> Feature:
    target_length = settings.max_target_length or settings.max_length
    ids = _truncated_ids(tokenizer, row["source"], settings.max_length)["input_ids"]
    labels = tokenizer(text_target=row["target"], truncation=True, max_length=target_length)
    return {"input_ids": list(ids), "labels": list(labels["input_ids"])}


Encoder = Callable[[Mapping[str, Any], str, Tokenizer, EncodeSettings], Feature]
ENCODERS: dict[RowShapeName, Encoder] = {
    "text": _encode_text,
    "prompt_completion": _encode_prompt_completion,
    "chat": _encode_chat,
    "text_label": _encode_text_label,
    "tokens_tags": _encode_tokens_tags,
    "source_target": _encode_source_target,
}


def _check_tokenizer(dataset: RawDataset, tokenizer: Tokenizer, settings: EncodeSettings) -> None:
    if settings.max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {settings.max_length}.")
    if dataset.shape.name == "tokens_tags" and not getattr(tokenizer, "is_fast", False):
        raise TokenizerCapabilityError(
            f"token classification aligns word tags to sub-word tokens with word_ids(), which "
            f"only fast tokenizers provide; {type(tokenizer).__name__} is not fast. Load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    if dataset.shape.name in ("text_label", "tokens_tags"):
        if settings.label_to_id is None:
            raise ValueError(
                f"{dataset.source_name} is a classification dataset; pass label_to_id (build it "
                "from the training data with lorakit.train.labels.build_label_map)."
            )
        check_labels_known(dataset_labels(dataset), settings.label_to_id, dataset.source_name)


def encode_dataset(
    dataset: RawDataset, tokenizer: Tokenizer, settings: EncodeSettings
) -> list[Feature]:
    """Tokenise every row of a dataset.

    Args:
        dataset: Rows read by ``read_dataset``.
        tokenizer: A ``transformers`` tokenizer (a fast one for token classification).
        settings: Lengths and, for classification, the label map from the training data.

    Returns:
        One feature dict per row: ``input_ids`` (list of ints) and ``labels`` (an int class id
        for sequence classification, else a list of ints with -100 where there is no loss).

    Raises:
        UnseenLabelError: A label missing from ``settings.label_to_id``.
        TokenizerCapabilityError: No chat template for chat rows; a slow tokenizer for tags.
        TruncationError: A causal LM row with no token left to train on.
    """
    _check_tokenizer(dataset, tokenizer, settings)
    encoder = ENCODERS[dataset.shape.name]
    return [
        encoder(row, location, tokenizer, settings)
        for row, location in zip(dataset.rows, dataset.locations, strict=True)
    ]
