"""The gateway's side of Triton: one pipeline client, what the served model is (read from the
`pipeline` config), and whether Triton is ready - watched in the background so health is current and
the gateway recovers by itself when Triton comes back."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

from shelfsight.errors import Unavailable
from shelfsight.imaging import ImageLimits
from shelfsight.params import GenerationParams, Limits
from shelfsight.pipeline import PipelineClient

log = logging.getLogger("shelfsight.gateway")


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    scheme: str
    generation: GenerationParams
    limits: Limits
    image_limits: ImageLimits

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        return cls(model_id=d["model_id"], scheme=d.get("scheme", ""),
                   generation=GenerationParams(**d["generation"]), limits=Limits(**d["limits"]),
                   image_limits=ImageLimits(**d["image_limits"]))


class Upstream:
    def __init__(self, url: str, interval: float, on_change: Callable[[bool], None] = lambda ready: None):
        self.client: PipelineClient | None = None  # made in start(): an aio channel belongs to its loop
        self.url, self.interval, self.on_change = url, interval, on_change
        self.ready = False
        self.info: ModelInfo | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.client = PipelineClient(self.url)
        await self.check()
        self._task = asyncio.create_task(self._watch())

    async def check(self) -> bool:
        ready = await self.client.ready()
        if ready and self.info is None:
            try:
                self.info = ModelInfo.from_dict(await self.client.serving_info())
            except Exception as e:  # noqa: BLE001 - not servable until the model says what it is
                log.warning("triton at %s is up but its pipeline carries no usable info: %s", self.url, e)
                ready = False
        if ready != self.ready:
            log.info("triton at %s is %s", self.url, "ready" if ready else "NOT ready")
            self.ready = ready
            self.on_change(ready)
        return ready

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
                log.exception("readiness check failed")

    def model(self) -> ModelInfo:
        """What is served, or UNAVAILABLE while Triton is down or starting."""
        if self.info is None or not self.ready:
            raise Unavailable(f"the model server at {self.url} is not ready; retry shortly")
        return self.info

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        if self.client:
            await self.client.close()
