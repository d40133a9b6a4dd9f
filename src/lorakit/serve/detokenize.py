"""A request's completion text, token by token: increments, held text and stop strings."""

from __future__ import annotations

from typing import Any

INCOMPLETE_CHARACTER = "\ufffd"  # what decoding shows for a cut multi-byte character


class TextStream:
    """Turns a request's generated tokens into text increments, stopping at stop strings.

    Each token's increment is the new text of decoding all generated tokens, except text that
    might still become the start of a stop string or is an incomplete character: that is held
    and sent with a later token, or at the end.

    Args:
        tokenizer: Decodes token ids (None: no text; stop strings are refused by the engine).
        stop: Stop strings.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._token_ids: list[int] = []
        self._sent = 0
        self.text = ""

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add a generated token; returns (text to send now, whether a stop string ended it)."""
        if self._tokenizer is None:
            return "", False
        self._token_ids.append(token_id)
        text = self._tokenizer.decode(self._token_ids, skip_special_tokens=True)
        search_from = max(self._sent - self._hold, 0)
        found = [i for i in (text.find(s, search_from) for s in self._stop) if i >= 0]
        if found:
            end = min(found)
            increment, self.text = text[self._sent : end], text[:end]
            self._sent = end
            return increment, True
        self.text = text
        safe = len(text) - self._hold
        while safe > self._sent and text[safe - 1] == INCOMPLETE_CHARACTER:
            safe -= 1
        if safe <= self._sent:
            return "", False
        increment = text[self._sent : safe]
        self._sent = safe
        return increment, False

    def flush(self) -> str:
        """The text still held, at the end of the completion."""
        increment = self.text[self._sent :]
        self._sent = len(self.text)
        return increment
