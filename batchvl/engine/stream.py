"""A row's text as it grows, for streaming: the engine hands over a row's tokens so far (`Engine.on_tokens`), and
`TextStream` says what text is new since the last time.

What it hands out is always a prefix of the text the finished row will have (the engine's Result), so the
pieces joined are exactly that text: tokens after a stop token are not shown; text that may still become part
of a stop string, or that ends in an incomplete UTF-8 character (the replacement character a byte-level
tokenizer decodes half a character to), is held back until the next tokens settle it; `finish` hands out what
is left of the final text.
"""

from __future__ import annotations

from typing import Any

from batchvl.engine.base import GenerationParams, finish

REPLACEMENT = "\ufffd"


class TextStream:
    """The new text of one row, piece by piece. Not thread-safe: one consumer."""

    def __init__(self, tokenizer: Any, params: GenerationParams, max_new_tokens: int | None = None):
        self.tokenizer, self.params = tokenizer, params
        self.limit = max_new_tokens or params.max_new_tokens
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # a stop string's start, not yet whole
        self.sent = ""
        self.tokens = 0  # ids seen so far

    def update(self, ids: list[int]) -> str:
        """The text that `ids` (the row's tokens so far) add to what was handed out; often empty."""
        if len(ids) <= self.tokens:
            return ""
        self.tokens = len(ids)
        kept, _ = finish(ids[: self.limit], self.params)
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.params.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        elif self.hold:
            text = text[: max(len(text) - self.hold, 0)]
        text = text.rstrip(REPLACEMENT)
        return self._advance(text)

    def finish(self, text: str) -> str:
        """What is left to hand out of the row's final `text`."""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""  # nothing new, or a decode that disagrees with what was sent (never retracted)
        new, self.sent = text[len(self.sent):], text
        return new
