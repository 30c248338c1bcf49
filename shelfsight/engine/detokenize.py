"""Token ids -> text deltas, one token at a time, without re-decoding the whole answer each step.

Byte-level BPE can split one character over several tokens; a delta is held back while the text
ends in U+FFFD (an incomplete UTF-8 sequence). Concatenating every delta (push ... flush) equals
decoding all ids at once, which is what makes streamed text equal unary text.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    # Decoding restarts a few tokens back so that merges across the boundary render as they would
    # in a full decode; 5 covers any byte-level split of one character (at most 4 bytes).
    CONTEXT = 5

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""  # text already sent
        self._prefix = 0  # ids[_prefix:_read] decode to the tail of `emitted`
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix = max(0, len(self.ids) - self.CONTEXT)
        self._read = len(self.ids)
        # keep the window's text aligned with what was emitted
        self.emitted += delta
        return delta

    def flush(self) -> str:
        """The rest of the text, including any held-back partial character."""
        full = self._decode(self.ids)
        if not full.startswith(self.emitted):  # cannot happen with byte-level BPE; stay correct anyway
            return ""
        delta = full[len(self.emitted):]
        self.emitted = full
        return delta
