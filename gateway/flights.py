"""Request coalescing: identical requests in flight at the same time share one model call.

A Flight is one upstream call run as its own task. Every request that wants that answer - the one that
started it and any identical request arriving before it ends - follows it: streaming followers get
every delta from the first, unary followers the final answer. The call stops early only when every
follower has gone (client cancelled or deadline passed).
"""
from __future__ import annotations

import asyncio
import itertools
from typing import AsyncIterator, Awaitable, Callable

from shelfsight.errors import ResourceExhausted
from shelfsight.serving.pipeline import Answer


class Flight:
    def __init__(self, key: str):
        self.key = key
        self.deltas: list[str] = []
        self.answer: Answer | None = None
        self.error: BaseException | None = None
        self.upstream_seconds = 0.0
        self.model_id = ""  # of the replica that answered
        self.followers = 0
        self.task: asyncio.Task | None = None
        self._changed = asyncio.Condition()

    @property
    def done(self) -> bool:
        return self.answer is not None or self.error is not None

    async def push(self, delta: str) -> None:
        async with self._changed:
            self.deltas.append(delta)
            self._changed.notify_all()

    async def finish(self, answer: Answer | None, error: BaseException | None = None) -> None:
        async with self._changed:
            self.answer, self.error = answer, error
            self._changed.notify_all()

    async def follow(self) -> AsyncIterator[str]:
        """Every delta so far, then each new one; ends when the call does (raising its error)."""
        seen = 0
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.deltas) > seen or self.done)
                new, seen = self.deltas[seen:], len(self.deltas)
                done = self.done
            for delta in new:
                yield delta
            if done and seen == len(self.deltas):
                if self.error is not None:
                    raise self.error
                return

    async def result(self) -> Answer:
        async with self._changed:
            await self._changed.wait_for(lambda: self.done)
        if self.error is not None:
            raise self.error
        return self.answer


class Flights:
    """The calls in progress, keyed by what they answer; bounded (over it: RESOURCE_EXHAUSTED)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._flights: dict[str, Flight] = {}
        self._unique = itertools.count()

    def join(self, key: str | None, run: Callable[[Flight], Awaitable[None]]) -> tuple[Flight, bool]:
        """Follow the call answering `key`, starting it with `run` if none is in flight.
        key None: never share. Returns (flight, coalesced)."""
        if key is not None and key in self._flights:
            flight = self._flights[key]
            flight.followers += 1
            return flight, True
        if len(self._flights) >= self.limit:
            raise ResourceExhausted(f"{len(self._flights)} model calls are in flight (limit {self.limit}); retry later")
        flight = Flight(key if key is not None else f"unique-{next(self._unique)}")
        flight.followers = 1
        self._flights[flight.key] = flight

        async def runner():
            try:
                await run(flight)
            except asyncio.CancelledError:
                await flight.finish(None, asyncio.CancelledError())
                raise
            except BaseException as e:  # noqa: BLE001 - handed to every follower
                await flight.finish(None, e)
            finally:
                self._flights.pop(flight.key, None)

        flight.task = asyncio.create_task(runner())
        return flight, False

    def leave(self, flight: Flight) -> None:
        """A follower is gone; the last one to leave an unfinished call cancels it."""
        flight.followers -= 1
        if flight.followers <= 0 and not flight.done and flight.task:
            flight.task.cancel()
