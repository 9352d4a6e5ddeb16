"""Incremental detokenization that never emits half a UTF-8 character.

Byte-level BPE tokens can end inside a multi-byte character; decoding such a prefix yields U+FFFD.
Text is emitted only when the decoded tail is complete; a character split across tokens is held
until its last byte arrives. The pieces always add up to `decode(all ids)` (tested). Each push decodes
only the ids since the last emitted piece began, not the whole reply, so a long reply costs linear
time (a server streams many at once).
"""

from __future__ import annotations

from .tokenizer import TextTokenizer

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed ids one at a time with `push`; each call returns the text that became final."""

    def __init__(self, tokenizer: TextTokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        # ids[start:emitted] decode to the last piece emitted; both points lie where a character ends
        self._start = self._emitted = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids[self._start :])
        if text.endswith(REPLACEMENT):
            return ""  # an incomplete character at the end: wait for its remaining bytes
        return self._take(text)

    def finish(self) -> str:
        """Whatever is still held (a character that never completed stays as U+FFFD)."""
        return self._take(self._tokenizer.decode(self._ids[self._start :]))

    def _take(self, text: str) -> str:
        piece = text[len(self._tokenizer.decode(self._ids[self._start : self._emitted])) :]
        self._start, self._emitted = self._emitted, len(self._ids)
        return piece
