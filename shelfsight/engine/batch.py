"""The running batch: one Row per occupied KV-cache slot, with the host-side counters of its request.

Per slot the runner needs two counters: `length`, the tokens whose K/V are in the cache (the next
token is written at that index), and the RoPE position of that token, `length + delta`, where delta is
the request's M-RoPE offset from its prompt (negative with an image: the picture's tokens span fewer
positions than their count). In decode every token is text, so 1-D RoPE at that position is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

from shelfsight.engine.api import Request
from shelfsight.engine.detokenize import IncrementalDetokenizer


@dataclass
class Row:
    req: Request
    slot: int
    seed: int  # sampling noise key (the request's seed or a random one)
    detok: IncrementalDetokenizer
    length: int = 0  # tokens in the cache
    delta: int = 0  # M-RoPE position offset
    generated: int = 0  # tokens streamed so far (not counting a stop token)
    first_token_at: float | None = None
    pending: str = ""  # text decoded but not yet sent (see OutputStage: responses are paced)
    last_sent: float = 0.0
    matcher: object | None = None  # a constrained row's grammar state (engine/grammar.py); None when free

    @property
    def grammar_ended(self) -> bool:
        """The row's grammar accepted a stop token: its answer is complete."""
        return self.matcher is not None and self.matcher.is_terminated()

    @property
    def prompt_tokens(self) -> int:
        return self.req.input_ids.numel()

    @property
    def rope_position(self) -> int:
        """RoPE position of the token written next (at cache index `length`)."""
        return self.length + self.delta


class Batch:
    """Rows by slot. The engine thread owns it."""

    def __init__(self):
        self._rows: dict[int, Row] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, row: Row) -> None:
        if row.slot in self._rows:
            raise ValueError(f"slot {row.slot} already holds a request")
        self._rows[row.slot] = row

    def get(self, slot: int) -> Row | None:
        return self._rows.get(slot)

    def remove(self, slot: int) -> Row:
        return self._rows.pop(slot)

    def rows(self) -> list[Row]:
        """Running rows in slot order."""
        return [self._rows[s] for s in sorted(self._rows)]

    def greedy(self) -> bool:
        return all(r.req.params.greedy for r in self._rows.values())

    def constrained(self) -> bool:
        """Some row follows a grammar (its steps are split; see runner.py)."""
        return any(r.matcher is not None for r in self._rows.values())
