"""Tasks the gateway starts and does not await where it starts them (health updates, DNS following,
retiring replicas).

asyncio holds only a weak reference to a running task: one whose handle is dropped can be garbage-
collected before it ends, and an exception nobody retrieves surfaces, if ever, as "Task exception was
never retrieved" at collection time. A `Background` keeps each task until it is done and logs how it
failed.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Coroutine

log = logging.getLogger("shelfsight.gateway")


class Background:
    def __init__(self):
        self._tasks: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Coroutine, name: str | None = None) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        """Cancel what still runs and wait until it has ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
