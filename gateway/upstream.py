"""The gateway's side of one Triton (one replica): one pipeline client, what the served model is (read
from the `pipeline` config), and whether Triton can answer - watched in the background so health is
current and the gateway recovers by itself when Triton comes back. Several of them form the pool that
gateway/replicas.py balances over.

Ready means: both ensembles report ready *and* no model process is known dead. Triton keeps reporting
a model ready after its Python stub died (it only fails the model's requests with "Stub process is not
healthy", and never answers those it had in flight), so a failure seen on a call, or reported by the
process supervisor, marks the upstream broken: in-flight calls fail at once with UNAVAILABLE, health
says NOT_SERVING, and it stays so until Triton restarted (its readiness dropped and came back) or a
probe request through the whole pipeline succeeds again. Calls run through `call()` so that marking
the replica broken can end exactly its own calls (as UNAVAILABLE, which another replica may retry).

The model id is re-read every time Triton becomes ready, so answers cached after a restart with
another checkpoint carry the new id.
"""
from __future__ import annotations

import asyncio
import functools
import io
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from shelfsight.errors import ShelfsightError, Unavailable
from shelfsight.model.imaging import ImageLimits, PixelBounds
from shelfsight.params import GenerationParams, Limits
from shelfsight.serving import contract
from shelfsight.serving.pipeline import PipelineClient

log = logging.getLogger("shelfsight.gateway")
T = TypeVar("T")


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    scheme: str
    generation: GenerationParams
    limits: Limits
    image_limits: ImageLimits
    pixels: PixelBounds = PixelBounds()  # the resize bounds: how finely the model sees a picture

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        return cls(model_id=d["model_id"], scheme=d.get("scheme", ""),
                   generation=GenerationParams(**d["generation"]), limits=Limits(**d["limits"]),
                   image_limits=ImageLimits(**d["image_limits"]), pixels=PixelBounds(**d.get("pixels", {})))


@functools.cache
def _probe_image() -> bytes:
    """A 64x64 grey PNG: a real picture every stage accepts, small to send (preprocess enlarges it to
    the model's minimum size)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, "PNG")
    return buf.getvalue()


class Upstream:
    def __init__(self, url: str, interval: float, on_change: Callable[[bool], None] = lambda ready: None):
        self.client: PipelineClient | None = None  # made in start(): an aio channel belongs to its loop
        self.url, self.interval = url, interval
        self.on_change = on_change
        self.ready = False
        self.info: ModelInfo | None = None
        self.retrieval: dict[str, dict] = {}  # embed / rerank -> their public info, where served
        self.broken: str | None = None  # why the running Triton cannot answer, until it is restarted
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._calls: set[asyncio.Task] = set()  # model calls running on this replica
        self._cut: dict[asyncio.Task, ShelfsightError] = {}  # those ended by mark_broken, and why

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    async def start(self) -> None:
        self.client = PipelineClient(self.url)
        await self.check()
        self._task = asyncio.create_task(self._watch())

    async def check(self) -> bool:
        up = await self.client.ready()
        if not up:
            self.broken = None  # down (or restarting): whatever broke goes with it
        elif self.broken is not None and not await self._probe():
            up = False
        if up and not self.ready:  # (re)connected: what is served may have changed
            try:
                self.info = ModelInfo.from_dict(await self.client.serving_info())
                found = {m: await self.client.model_info(m) for m in (contract.EMBED, contract.RERANK)}
                self.retrieval = {m: info for m, info in found.items() if info is not None}
            except Exception as e:  # noqa: BLE001 - not servable until the model says what it is
                log.warning("triton at %s is up but its pipeline carries no usable info: %s", self.url, e)
                up = False
        self.set_ready(up)
        return up

    def set_ready(self, ready: bool) -> None:
        """Record whether this Triton can answer (check() and mark_broken() decide; tests set it by
        hand); `on_change` hears of each change."""
        if ready != self.ready:
            log.info("triton at %s is %s", self.url, "ready" if ready else
                     f"NOT ready{f' ({self.broken})' if self.broken else ''}")
            self.ready = ready
            self.on_change(ready)

    async def _probe(self) -> bool:
        """One real request through the pipeline, one token long: does every model process answer?"""
        try:
            await asyncio.wait_for(self.client.infer(_probe_image(), "ping", max_new_tokens=1, temperature=0.0,
                                                     request_id="shelfsight-probe"), timeout=30)
        except Exception as e:  # noqa: BLE001 - any failure means: still broken
            log.info("probe of the broken upstream failed: %s", e)
            return False
        log.info("probe through the pipeline succeeded; upstream repaired")
        self.broken = None
        return True

    def mark_broken(self, reason: str) -> None:
        """A model process is known dead (a call said so, or the supervisor saw it): stop serving,
        fail what is in flight, and check again soon."""
        if self.broken is None:
            log.error("triton at %s is broken: %s", self.url, reason)
        self.broken = reason
        self.set_ready(False)
        for task in self._calls:  # they would never be answered
            if not task.done() and task not in self._cut:
                self._cut[task] = Unavailable(f"the model server at {self.url} failed ({reason}); retry shortly")
                task.cancel()
        self._wake.set()

    async def call(self, work: Awaitable[T]) -> T:
        """Run one model call on this replica (counted in `in_flight`). Raises UNAVAILABLE when
        mark_broken ended it; the caller's own cancellation passes through as such."""
        task = asyncio.ensure_future(work)
        self._calls.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            cut = self._cut.get(task)
            if cut is not None and not asyncio.current_task().cancelling():
                raise cut from None
            raise
        finally:
            self._calls.discard(task)
            self._cut.pop(task, None)

    def poke(self) -> None:
        """Check now rather than at the next interval (e.g. the supervisor restarted Triton)."""
        self._wake.set()

    async def _watch(self) -> None:
        while True:
            try:
                # while not ready, look more often: recovery should not wait a whole interval
                await asyncio.wait_for(self._wake.wait(), self.interval if self.ready else min(0.25, self.interval))
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
                log.exception("readiness check failed")

    def model(self) -> ModelInfo:
        """What is served, or UNAVAILABLE while Triton is down, starting or broken."""
        if self.info is None or not self.ready:
            why = f" ({self.broken})" if self.broken else ""
            raise Unavailable(f"the model server at {self.url} is not ready{why}; retry shortly")
        return self.info

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        if self.client:
            await self.client.close()
