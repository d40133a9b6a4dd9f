"""The demo's classification data: English words labelled by human sentiment ratings.

Source: ``vader_lexicon.txt`` shipped inside the ``vaderSentiment`` package on PyPI (version
3.3.2, MIT licence, (c) 2016 C.J. Hutto). Hutto & Gilbert, "VADER: A Parsimonious Rule-based
Model for Sentiment Analysis of Social Media Text", ICWSM 2014. Each of its 7,520 lines holds an
entry, its mean rating, the standard deviation, and the ten ratings on a -4 (extremely negative)
to +4 (extremely positive) scale given by independent human raters (Amazon Mechanical Turk).
No one in the lorakit project wrote these labels.

Rule (``load_vader_sentiment`` with its defaults):
1. Keep entries that are lower-case words: letters, optionally joined by ``'`` or ``-``
   (``[a-z]+(?:['-][a-z]+)*``). This drops emoticons (``:-)``) and entries with digits.
2. Label ``"negative"`` where the mean rating <= -0.5, ``"positive"`` where it >= +0.5; entries
   in between are dropped as neutral. A word listed more than once (8 are, e.g. ``lol``) is
   kept once if all its entries give the same label, else dropped.
3. Balance the classes by keeping, in each class, the ``n`` entries first in a seeded hash
   order, ``n`` being the smaller class's size (optionally capped by ``max_per_class``).
4. Per class, the first ``test_fraction`` of that order goes to the test split, the rest to
   training; each split is then put in seeded hash order.
The hash order (SHA-256 of ``"{seed}:{word}"``) makes the split identical on every platform and
Python version. Before balancing there are 3,692 negative and 2,849 positive words (676 neutral
ones dropped). With the defaults: 2,849 words per class, 4,558 training rows and 1,140 test
rows, each split exactly half positive.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from lorakit.train.data_errors import DataError

LEXICON_PACKAGE = "vaderSentiment"
LEXICON_FILE = "vader_lexicon.txt"
INSTALL_HINT = "pip install vaderSentiment==3.3.2 (or pip install 'lorakit[demo]')"
WORD_PATTERN = re.compile(r"[a-z]+(?:['-][a-z]+)*")
LABELS = ("negative", "positive")


@dataclass(frozen=True)
class LexiconEntry:
    """One line of the VADER lexicon."""

    word: str
    mean_rating: float
    ratings: tuple[int, ...]


@dataclass(frozen=True)
class DemoSplit:
    """Train and test rows of shape ``{"text": word, "label": "negative" | "positive"}``."""

    train: list[dict[str, Any]]
    test: list[dict[str, Any]]


def read_vader_lexicon() -> list[LexiconEntry]:
    """Read every entry of ``vader_lexicon.txt`` from the installed ``vaderSentiment`` package.

    Raises:
        DataError: The package is not installed, or the file's format is not the expected one.
    """
    try:
        lexicon = resources.files(LEXICON_PACKAGE).joinpath(LEXICON_FILE)
        text = lexicon.read_text(encoding="utf-8")
    except ModuleNotFoundError as error:
        raise DataError(
            f"the demo data comes from the {LEXICON_PACKAGE} package, which is not installed; "
            f"run: {INSTALL_HINT}"
        ) from error
    entries = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            word, mean, _, ratings = fields
            entries.append(
                LexiconEntry(
                    word, float(mean), tuple(int(r) for r in ratings.strip("[] ").split(","))
                )
            )
        except ValueError as error:
            raise DataError(
                f"{LEXICON_FILE} line {line_number} is not 'word<TAB>mean<TAB>std<TAB>[ratings]' "
                f"({line[:60]!r}); this demo expects vaderSentiment 3.3.2: {INSTALL_HINT}"
            ) from error
    return entries


def _hash_order(words: list[str], seed: int) -> list[str]:
    return sorted(words, key=lambda word: hashlib.sha256(f"{seed}:{word}".encode()).hexdigest())


def _rows(words: list[str], label_by_word: dict[str, str], seed: int) -> list[dict[str, Any]]:
    return [{"text": word, "label": label_by_word[word]} for word in _hash_order(words, seed)]


def load_vader_sentiment(
    *,
    threshold: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_per_class: int | None = None,
) -> DemoSplit:
    """A balanced, deterministic train/test split of sentiment-labelled words.

    Args:
        threshold: Mean rating <= -threshold is negative, >= +threshold positive.
        test_fraction: Share of each class put in the test split, in (0, 1).
        seed: Seed of the hash order (which words are kept and which are tested).
        max_per_class: Keep at most this many words per class (a smaller, faster demo).

    Returns:
        Rows ``{"text": word, "label": "negative" | "positive"}``; each split has equal
        numbers of both labels (up to one row of rounding).

    Raises:
        DataError: ``vaderSentiment`` is not installed (the message names the pip command).
        ValueError: An argument outside its range.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0 so that the classes are apart, got {threshold}.")
    labels_by_word: dict[str, set[str | None]] = {}
    for entry in read_vader_lexicon():
        if WORD_PATTERN.fullmatch(entry.word):
            is_polar = abs(entry.mean_rating) >= threshold
            label = LABELS[entry.mean_rating > 0] if is_polar else None
            labels_by_word.setdefault(entry.word, set()).add(label)
    label_by_word = {
        word: label
        for word, labels in labels_by_word.items()
        if len(labels) == 1 and (label := next(iter(labels))) is not None
    }
    by_label = {
        label: _hash_order([w for w, lab in label_by_word.items() if lab == label], seed)
        for label in LABELS
    }
    per_class = min(len(words) for words in by_label.values())
    if max_per_class is not None:
        per_class = min(per_class, max_per_class)
    test_count = round(per_class * test_fraction)
    if per_class < 2 or not 0 < test_count < per_class:
        raise ValueError(
            f"{per_class} words per class with test_fraction={test_fraction} leaves an empty "
            "split; raise max_per_class or lower threshold."
        )
    train_words = [w for words in by_label.values() for w in words[test_count:per_class]]
    test_words = [w for words in by_label.values() for w in words[:test_count]]
    return DemoSplit(
        _rows(train_words, label_by_word, seed), _rows(test_words, label_by_word, seed)
    )
