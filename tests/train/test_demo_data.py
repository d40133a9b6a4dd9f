"""The demo's sentiment split: sizes, balance, determinism and labels true to the ratings."""

from __future__ import annotations

import re
from collections import Counter
from importlib import resources

import pytest

from lorakit.train import demo_data
from lorakit.train.data_errors import DataError

pytest.importorskip(
    "vaderSentiment", reason="the demo data extra (vaderSentiment) is not installed"
)


def lexicon_means() -> dict[str, list[float]]:
    """word -> mean ratings of its lines, parsed here independently of demo_data."""
    text = resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_text("utf-8")
    means: dict[str, list[float]] = {}
    for line in text.splitlines():
        word, mean = line.split("\t")[:2]
        means.setdefault(word, []).append(float(mean))
    return means


def test_default_split_sizes_balance_and_labels() -> None:
    split = demo_data.load_vader_sentiment()
    assert (len(split.train), len(split.test)) == (4558, 1140)
    assert Counter(row["label"] for row in split.train) == {"negative": 2279, "positive": 2279}
    assert Counter(row["label"] for row in split.test) == {"negative": 570, "positive": 570}
    train_words = [row["text"] for row in split.train]
    test_words = [row["text"] for row in split.test]
    assert len(set(train_words)) == len(train_words)
    assert not set(train_words) & set(test_words)
    means = lexicon_means()
    for row in split.train + split.test:
        assert re.fullmatch(r"[a-z]+(?:['-][a-z]+)*", row["text"])
        ratings = means[row["text"]]
        if row["label"] == "positive":
            assert all(mean >= 0.5 for mean in ratings), row
        else:
            assert all(mean <= -0.5 for mean in ratings), row


def test_split_is_deterministic_and_seeded() -> None:
    first, again = demo_data.load_vader_sentiment(seed=1), demo_data.load_vader_sentiment(seed=1)
    assert first == again
    other = demo_data.load_vader_sentiment(seed=2)
    assert {row["text"] for row in other.test} != {row["text"] for row in first.test}


def test_smaller_demo_and_stricter_threshold() -> None:
    small = demo_data.load_vader_sentiment(max_per_class=100, test_fraction=0.25)
    assert Counter(row["label"] for row in small.train) == {"negative": 75, "positive": 75}
    assert Counter(row["label"] for row in small.test) == {"negative": 25, "positive": 25}
    strict = demo_data.load_vader_sentiment(threshold=2.0)
    means = lexicon_means()
    assert all(abs(means[row["text"]][0]) >= 2.0 for row in strict.train)
    assert len(strict.train) < 4558


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_data, "LEXICON_PACKAGE", "vaderSentiment_not_installed")
    with pytest.raises(DataError, match=r"not installed; run: pip install vaderSentiment==3\.3\.2"):
        demo_data.load_vader_sentiment()


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1"):
        demo_data.load_vader_sentiment(test_fraction=1)
    with pytest.raises(ValueError, match=r"1 words per class .* leaves an empty split"):
        demo_data.load_vader_sentiment(max_per_class=1)
