"""Errors raised while reading and preparing training data.

Each one tells a person what was received, what is allowed, and how to fix it. They subclass the
built-in exception a caller would expect (``ValueError``, ``FileNotFoundError``) so generic
handlers keep working.
"""

from __future__ import annotations

from ..errors import LorakitError


class DataError(LorakitError, ValueError):
    """Base class for problems with a dataset's files or rows."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file named by the user does not exist."""


class UnsupportedSourceError(DataError):
    """A data source of a type or file extension lorakit cannot read."""


class MalformedRowError(DataError):
    """A line or row that cannot be parsed (bad JSON, a value of the wrong type)."""


class MissingFieldError(DataError):
    """A row lacks a field the dataset's shape needs."""


class UnknownRowShapeError(DataError):
    """The first row's fields match none of the accepted shapes, or not the requested task."""


class EmptyDatasetError(DataError):
    """A dataset with no rows, or with no rows left after tokenisation."""


class UnseenLabelError(DataError):
    """Evaluation data holds labels (or tags) that never occur in the training data."""


class LabelTypeError(DataError):
    """Labels that cannot be mapped to class ids (floats, mixed ints and strings)."""


class TokenizerCapabilityError(DataError):
    """The tokenizer lacks something a row shape needs (chat template, word ids, pad token)."""


class TruncationError(DataError):
    """Truncation to ``max_length`` left a row with no token to train on."""


class SamplerStateError(DataError):
    """A sampler state that does not fit the sampler it is loaded into."""
