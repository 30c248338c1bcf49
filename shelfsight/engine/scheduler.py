"""Admission: which waiting requests enter which free KV-cache slots. Pure Python, no tensors.

A request owns one slot from admission until it finishes, is cancelled or fails. Free slots are handed
out lowest first, so the running rows stay packed at the low slots and the decode step (which runs
over slots 0..bucket-1) stays as small as the load allows.
"""
from __future__ import annotations

import heapq
from collections import deque
from typing import Generic, TypeVar

from shelfsight.errors import ResourceExhausted

R = TypeVar("R")


class Scheduler(Generic[R]):
    """Requests need `.input_ids.numel()` and `.sink.is_cancelled()`. Not thread-safe: the engine
    calls it under its own lock."""

    def __init__(self, slots: int, max_waiting: int, max_prefill_tokens: int):
        self.slots, self.max_waiting, self.max_prefill_tokens = slots, max_waiting, max_prefill_tokens
        self.waiting: deque[R] = deque()
        self._free = list(range(slots))  # a heap
        self._owned: set[int] = set()

    @property
    def running(self) -> int:
        return len(self._owned)

    @property
    def free(self) -> list[int]:
        """The slots no request owns, lowest first."""
        return sorted(self._free)

    def enqueue(self, req: R) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise ResourceExhausted(f"{len(self.waiting)} requests already wait for the model; retry later")
        self.waiting.append(req)

    def admit(self) -> tuple[list[tuple[R, int]], list[R]]:
        """Take waiting requests, oldest first, while slots are free and the prefill token budget
        lasts (the first one always fits). Returns ([(request, slot)], [cancelled requests dropped])."""
        admitted, cancelled, tokens = [], [], 0
        while self.waiting and self._free:
            nxt = self.waiting[0]
            if nxt.sink.is_cancelled():
                cancelled.append(self.waiting.popleft())
                continue
            n = nxt.input_ids.numel()
            if admitted and tokens + n > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            slot = heapq.heappop(self._free)
            self._owned.add(slot)
            admitted.append((nxt, slot))
            tokens += n
        return admitted, cancelled

    def release(self, slot: int) -> None:
        if slot not in self._owned:
            raise ValueError(f"slot {slot} is not in use")
        self._owned.remove(slot)
        heapq.heappush(self._free, slot)

    def drain(self) -> list[R]:
        """Every waiting request, removed from the queue."""
        out = list(self.waiting)
        self.waiting.clear()
        return out
