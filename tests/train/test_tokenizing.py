"""Token ids and labels for every row shape, checked against the tokenizer token by token."""

from __future__ import annotations

from typing import Any

import pytest

from lorakit.train.data_errors import (
    LabelTypeError,
    TokenizerCapabilityError,
    TruncationError,
    UnseenLabelError,
)
from lorakit.train.labels import build_label_map, check_labels_known, invert_label_map
from lorakit.train.reading import read_dataset
from lorakit.train.tokenizing import IGNORE_INDEX, EncodeSettings, encode_dataset

EOS = "<|endoftext|>"  # the causal test tokenizer's EOS (see conftest.py)


def encode(rows: list[dict[str, Any]], tokenizer: Any, **settings: Any) -> list[dict[str, Any]]:
    settings.setdefault("max_length", 64)
    return encode_dataset(read_dataset(rows), tokenizer, EncodeSettings(**settings))


def ids_of(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def labelled_runs(feature: dict[str, Any], tokenizer: Any) -> list[str]:
    """Decode each contiguous run of labelled positions (labels must equal the inputs there)."""
    runs: list[list[int]] = []
    previous_labelled = False
    for token, label in zip(feature["input_ids"], feature["labels"], strict=True):
        is_labelled = label != IGNORE_INDEX
        if is_labelled:
            assert label == token
            if not previous_labelled:
                runs.append([])
            runs[-1].append(label)
        previous_labelled = is_labelled
    return [tokenizer.decode(run) for run in runs]


def test_prompt_completion_loss_on_completion_and_eos(causal_tokenizer: Any) -> None:
    prompt, completion = "question: what is two plus two? answer:", " four"
    (feature,) = encode([{"prompt": prompt, "completion": completion}], causal_tokenizer)
    prompt_ids = ids_of(causal_tokenizer, prompt, special=True)
    completion_ids = ids_of(causal_tokenizer, completion, special=False)
    eos = causal_tokenizer.eos_token_id
    assert feature["input_ids"] == [*prompt_ids, *completion_ids, eos]
    assert feature["labels"] == [IGNORE_INDEX] * len(prompt_ids) + [*completion_ids, eos]
    assert labelled_runs(feature, causal_tokenizer) == [f" four{EOS}"]
    assert causal_tokenizer.decode(feature["input_ids"]) == prompt + completion + EOS


def test_text_rows_label_every_token_and_eos_is_not_doubled(causal_tokenizer: Any) -> None:
    plain, ends_with_eos = encode(
        [{"text": "the cat sat"}, {"text": f"the dog ran{EOS}"}], causal_tokenizer
    )
    eos = causal_tokenizer.eos_token_id
    assert plain["input_ids"] == [*ids_of(causal_tokenizer, "the cat sat", special=True), eos]
    assert plain["labels"] == plain["input_ids"]
    assert ends_with_eos["input_ids"].count(eos) == 1
    assert ends_with_eos["input_ids"][-1] == eos


def test_truncation_to_max_length(causal_tokenizer: Any) -> None:
    prompt, completion = "the cat", " sat on the mat and the dog ran in the park"
    (feature,) = encode(
        [{"prompt": prompt, "completion": completion}], causal_tokenizer, max_length=6
    )
    prompt_ids = ids_of(causal_tokenizer, prompt, special=True)
    full = [*prompt_ids, *ids_of(causal_tokenizer, completion, special=False)]
    assert feature["input_ids"] == full[:6]
    assert feature["labels"] == [IGNORE_INDEX] * len(prompt_ids) + full[len(prompt_ids) : 6]


def test_prompt_filling_max_length_is_an_error(causal_tokenizer: Any) -> None:
    prompt = "a dog ran in the park and the cat ran too"
    prompt_length = len(ids_of(causal_tokenizer, prompt, special=True))
    with pytest.raises(
        TruncationError,
        match=rf"list index 0: .*the prompt is {prompt_length} tokens and max_length=4 cuts off",
    ):
        encode([{"prompt": prompt, "completion": " x"}], causal_tokenizer, max_length=4)


CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "two plus two?"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "and the cat?"},
    {"role": "assistant", "content": "sat on the mat"},
]


def test_chat_rows_use_the_template_and_train_on_assistant_turns(chat_tokenizer: Any) -> None:
    (feature,) = encode([{"messages": CONVERSATION}], chat_tokenizer, max_length=256)
    rendered = chat_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert chat_tokenizer.decode(feature["input_ids"]) == rendered
    # The generation prompt "<|assistant|>" is context; the reply and its end marker are trained.
    assert labelled_runs(feature, chat_tokenizer) == ["four<|end|>", "sat on the mat<|end|>"]


def test_chat_without_template_names_the_fix(causal_tokenizer: Any) -> None:
    with pytest.raises(TokenizerCapabilityError, match=r"has none\. Set tokenizer\.chat_template"):
        encode([{"messages": CONVERSATION}], causal_tokenizer)


def test_chat_template_that_is_not_prefix_stable_is_refused(make_causal_tokenizer: Any) -> None:
    counting = make_causal_tokenizer(
        "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(TokenizerCapabilityError, match="renders the conversation up to message 2"):
        encode([{"messages": CONVERSATION}], counting)


def test_chat_template_error_gets_the_row_location(make_causal_tokenizer: Any) -> None:
    failing = make_causal_tokenizer("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerCapabilityError, match=r"list index 0: .*roles must alternate"):
        encode([{"messages": CONVERSATION}], failing)


def test_sequence_classification(minilm_tokenizer: Any) -> None:
    rows = [{"text": "what a great film", "label": "pos"}, {"text": "dull", "label": "neg"}]
    label_to_id = {"neg": 0, "pos": 1}
    features = encode(rows, minilm_tokenizer, max_length=4, label_to_id=label_to_id)
    # [CLS] what a [SEP]: truncation keeps the special tokens
    assert [minilm_tokenizer.convert_ids_to_tokens(f["input_ids"]) for f in features] == [
        ["[CLS]", "what", "a", "[SEP]"],
        ["[CLS]", "dull", "[SEP]"],
    ]
    assert [f["labels"] for f in features] == [1, 0]


def test_token_classification_tags_first_sub_token(minilm_tokenizer: Any) -> None:
    rows = [{"tokens": ["unbelievably", "good", "Paris"], "tags": ["O", "O", "B-LOC"]}]
    (feature,) = encode(rows, minilm_tokenizer, label_to_id={"B-LOC": 0, "O": 1})
    pieces = minilm_tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert pieces == ["[CLS]", "un", "##bel", "##ie", "##va", "##bly", "good", "paris", "[SEP]"]
    assert feature["labels"] == [-100, 1, -100, -100, -100, -100, 1, 0, -100]


def test_token_classification_truncation_keeps_alignment(minilm_tokenizer: Any) -> None:
    rows = [{"tokens": ["unbelievably", "good", "Paris"], "tags": ["O", "O", "B-LOC"]}]
    (feature,) = encode(rows, minilm_tokenizer, max_length=4, label_to_id={"B-LOC": 0, "O": 1})
    assert minilm_tokenizer.convert_ids_to_tokens(feature["input_ids"]) == [
        "[CLS]",
        "un",
        "##bel",
        "[SEP]",
    ]
    assert feature["labels"] == [-100, 1, -100, -100]


class SlowTokenizer:
    is_fast = False


def test_token_classification_needs_fast_tokenizer() -> None:
    rows = [{"tokens": ["a"], "tags": ["O"]}]
    with pytest.raises(TokenizerCapabilityError, match=r"SlowTokenizer is not fast.*use_fast=True"):
        encode(rows, SlowTokenizer(), label_to_id={"O": 0})


def test_seq2seq_targets_and_their_length(minilm_tokenizer: Any) -> None:
    rows = [{"source": "Guten Tag", "target": "Good day to you"}]
    (feature,) = encode(rows, minilm_tokenizer, max_length=16, max_target_length=4)
    assert feature["input_ids"] == list(minilm_tokenizer("Guten Tag")["input_ids"])
    assert minilm_tokenizer.convert_ids_to_tokens(feature["labels"]) == [
        "[CLS]",
        "good",
        "day",
        "[SEP]",
    ]


def test_classification_needs_a_label_map(minilm_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="pass label_to_id"):
        encode([{"text": "a", "label": 1}], minilm_tokenizer)


def test_label_maps_sort_labels() -> None:
    assert build_label_map(["pos", "neg", "pos", "neutral"]) == {"neg": 0, "neutral": 1, "pos": 2}
    assert build_label_map([10, 2, 1, 2]) == {1: 0, 2: 1, 10: 2}
    assert invert_label_map({"neg": 0, "pos": 1}) == {0: "neg", 1: "pos"}
    with pytest.raises(LabelTypeError, match=r"mix integers and strings \('1', 1\)"):
        build_label_map([1, "1"])


def test_unseen_labels_are_listed_with_first_location() -> None:
    pairs = [
        ("pos", "eval.jsonl line 1"),
        ("meh", "eval.jsonl line 2"),
        ("wow", "eval.jsonl line 3"),
        ("meh", "eval.jsonl line 4"),
    ]
    with pytest.raises(
        UnseenLabelError,
        match=r"eval\.jsonl has 2 label\(s\) never seen in the training data: 'meh' \(first at "
        r"eval\.jsonl line 2\), 'wow' \(first at eval\.jsonl line 3\)\. "
        r"Training labels: 'neg', 'pos'",
    ):
        check_labels_known(pairs, {"neg": 0, "pos": 1}, "eval.jsonl")
