"""Grammars for structured answers (xgrammar): a ResponseFormat compiled once (cached by its text, on
the caller's thread), then, per running row, a matcher that says which tokens may come next.

Token bitmask (xgrammar's layout): [rows, ceil(V/32)] int32; bit j of word w allows token 32*w + j.
An all-ones row (-1) allows every token: unconstrained rows, padding rows, and rows whose grammar has
ended but which were already launched into one more step.

Costs measured on the 2-core CI machine (tiny checkpoint, real tokenizer): TokenizerInfo 0.8-1.3 s once
per engine (built on the first constrained request, not at start); compiling the product schema 60 ms
(then cached); filling one row's mask ~50-76 us a token.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch

from shelfsight.engine.batch import Row
from shelfsight.errors import InvalidArgument
from shelfsight.formats import ResponseFormat
from shelfsight.model import qwen

JSON_OBJECT = '{"type":"object"}'
CACHE_SIZE = 128  # compiled grammars kept (the product schema's is ~1 MB; most are far smaller)


def _threads() -> int:
    """Mask-filling threads: half the cores (the other half runs torch and the engine), 1..8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def literal(text: str) -> str:
    """A string as an EBNF literal: quote and backslash escaped, control characters as \\uHHHH (xgrammar
    reads \\x greedily: "\\x0aC" would be one character, U+00AC)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class Grammars:
    """The tokenizer's vocabulary as xgrammar sees it, and the compiled formats. Thread-safe: Engine.submit
    compiles on its caller's thread, so a new schema never stalls the engine thread."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: tuple[int, ...] = qwen.EOS_IDS,
                 cache_size: int = CACHE_SIZE):
        import xgrammar as xgr

        self.vocab_size = vocab_size
        # stop ids: a grammar allows them only once its text is complete (that ends the answer)
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_ids))
        # our own bounded cache (keyed by the format's text) instead of xgrammar's
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=min(8, os.cpu_count() or 1),
                                            cache_enabled=False)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, fmt: ResponseFormat):
        """-> xgrammar CompiledGrammar; InvalidArgument saying why xgrammar refused the format."""
        key = fmt.key
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = self._compile(fmt)  # outside the lock: one slow schema does not hold up the others
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, fmt: ResponseFormat):
        c = self.compiler
        try:
            if fmt.kind == "json_schema":
                # any_whitespace=False: one space after ':' and ',' only; a model left free to emit
                # whitespace can emit it until the budget runs out
                return c.compile_json_schema(fmt.spec, any_whitespace=False)
            if fmt.kind == "json_object":
                return c.compile_json_schema(JSON_OBJECT, any_whitespace=False)
            if fmt.kind == "regex":
                return c.compile_regex(fmt.spec)
            if fmt.kind == "choice":
                return c.compile_grammar("root ::= " + " | ".join(literal(s) for s in fmt.spec))
        except (RuntimeError, ValueError) as e:
            raise InvalidArgument(f"the {fmt.kind} response format cannot be compiled: {_reason(e)}") from None
        raise InvalidArgument(f"unknown response format kind {fmt.kind!r}")

    def matcher(self, compiled):
        """A fresh matcher (a row's grammar state); microseconds."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)


def _reason(e: Exception) -> str:
    """xgrammar's message without its '[time] /project/cpp/file.cc:line: ' prefix."""
    text = str(e).strip()
    head, sep, tail = text.partition(".cc:")
    if sep and "] " in head:
        text = tail.split(": ", 1)[-1]
    return text.strip()


class RowMasks:
    """The host side of a constrained step: advance each constrained row's matcher with the token it
    chose, then fill the next step's bitmask. Engine thread only.

    `host` [slots + 1, W] int32 holds one row per KV slot (pinned on CUDA: copied to the device with
    the step). It is refilled only after the step that last copied it has been read back, so one buffer
    is enough; prefill uses fresh tensors (it runs while a step may still be copying `host`)."""

    def __init__(self, slots: int, vocab_size: int, pin: bool):
        import xgrammar as xgr

        self.words = (vocab_size + 31) // 32
        self.host = torch.full((slots + 1, self.words), -1, dtype=torch.int32, pin_memory=pin)
        self._batch = xgr.BatchGrammarMatcher(_threads())
        self._dirty: list[int] = []  # slots holding a mask from the last fill

    def fill_slots(self, rows: list[Row]) -> torch.Tensor:
        """Every live constrained row's allowed tokens at its slot; all other rows all-ones -> `host`."""
        for s in self._dirty:
            self.host[s] = -1
        todo = [r for r in rows if r.matcher is not None and not r.matcher.is_terminated()]
        if todo:
            self._batch.batch_fill_next_token_bitmask([r.matcher for r in todo], self.host,
                                                      [r.slot for r in todo])
        self._dirty = [r.slot for r in todo]
        return self.host

    def fill_rows(self, rows: list[Row]) -> torch.Tensor:
        """The same, in `rows` order, into a fresh tensor [len(rows), W] (prefill's first token)."""
        out = torch.full((len(rows), self.words), -1, dtype=torch.int32)
        todo = [i for i, r in enumerate(rows) if r.matcher is not None and not r.matcher.is_terminated()]
        if todo:
            self._batch.batch_fill_next_token_bitmask([rows[i].matcher for i in todo], out, todo)
        return out

    @staticmethod
    def advance(rows: list[Row], tokens: list[int]) -> list[Row]:
        """Each constrained row's matcher takes its token; returns the rows whose token the grammar
        refused (cannot happen while masks are applied; such a row is failed, not streamed)."""
        import xgrammar as xgr

        pairs = [(r, t) for r, t in zip(rows, tokens) if r.matcher is not None]
        if not pairs:
            return []
        ok = xgr.BatchGrammarMatcher.batch_accept_token([r.matcher for r, _ in pairs], [t for _, t in pairs])
        return [r for (r, _), accepted in zip(pairs, ok) if not accepted]
