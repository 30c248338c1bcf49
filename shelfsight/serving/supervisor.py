"""Keep one tritonserver serving: the process `shelfsight serve` and `shelfsight triton` run under.

A tritonserver that dies (killed, crashed) or loses one of its Python-backend stubs (then it stays up
but fails that model's requests, and never answers the ones it had in flight) is reaped, everything
it left - stubs, shared memory - is removed, and a new one starts on the same ports after a backoff.
A server that keeps failing (`RestartPolicy.max_failures` times without staying up `stable_after`
seconds in between) is given up on: `run()` raises, and the command exits non-zero so that a process
supervisor above it (systemd, Kubernetes) sees the failure instead of a process that only pretends
to serve.

    on_down(reason)  called at once when a failure is seen (the gateway fails in-flight calls with
                     UNAVAILABLE and reports NOT_SERVING)
    on_up(server)    called when a restarted server is ready (the gateway re-reads the model at once)
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

from shelfsight.errors import ShelfsightError, Unavailable
from shelfsight.serving.tritonserver import TritonServer, TritonSettings

log = logging.getLogger("shelfsight.serving.supervisor")


@dataclass(frozen=True)
class RestartPolicy:
    max_failures: int = 5  # failures in a row (crashes or failed starts) before giving up
    backoff_initial: float = 1.0  # seconds before the first restart; doubles per failure in a row
    backoff_max: float = 30.0
    stable_after: float = 60.0  # a server that served this long resets the count
    poll_interval: float = 0.25  # how often the process and its stubs are looked at


class Supervisor:
    def __init__(self, settings: TritonSettings, policy: RestartPolicy = RestartPolicy(),
                 on_down: Callable[[str], None] = lambda reason: None,
                 on_up: Callable[[TritonServer], None] = lambda server: None):
        self.settings, self.policy = settings, policy
        self.on_down, self.on_up = on_down, on_up
        self.server: TritonServer | None = None
        self.restarts = 0
        self.exit_code: int | None = None  # the last server's, once run() has stopped it
        self._up_since = 0.0

    def start(self) -> TritonServer:
        """The first start (blocking). A server that cannot start at all is an error for the caller."""
        self.server = TritonServer(self.settings).start()
        self._up_since = time.monotonic()
        return self.server

    async def run(self, stop: asyncio.Event, drain: float | None = None) -> None:
        """Watch and restart until `stop` is set; then stop the server, its requests in flight given
        `drain` seconds (default: the settings' drain_timeout). Raises Unavailable on giving up."""
        failures = 0
        try:
            while not await _wait(stop, self.policy.poll_interval):
                reason = self.server.failure()
                if reason is None:
                    continue
                log.error("%s; restarting tritonserver (log: %s)", reason, self.server.log_path)
                self.on_down(reason)
                stable = time.monotonic() - self._up_since >= self.policy.stable_after
                failures = 1 if stable else failures + 1
                await asyncio.to_thread(self.server.stop, False)  # what it had in flight is lost already
                failures = await self._restart(stop, failures, reason)
                if failures is None:
                    return
        finally:
            if self.server is not None:
                self.exit_code = await asyncio.to_thread(self.server.stop, True, drain)

    async def _restart(self, stop: asyncio.Event, failures: int, reason: str) -> int | None:
        """Start a new server after a backoff; the failure count, or None when stopped meanwhile."""
        p = self.policy
        while True:
            if failures > p.max_failures:
                raise Unavailable(f"tritonserver failed {failures} times in a row; giving up (last: {reason})")
            delay = min(p.backoff_max, p.backoff_initial * 2 ** (failures - 1))
            log.info("restarting tritonserver in %.1fs (failure %d of at most %d)", delay, failures, p.max_failures)
            if await _wait(stop, delay):
                return None
            try:
                self.server = await asyncio.to_thread(TritonServer(self.settings).start)
            except ShelfsightError as e:
                reason = f"restart failed: {e.message.splitlines()[0]}"
                log.error("%s", reason)
                failures += 1
                continue
            self.restarts += 1
            self._up_since = time.monotonic()
            log.info("tritonserver restarted: %s", self.server.addresses())
            self.on_up(self.server)
            return failures


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True when `event` was set."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
        return True
    except asyncio.TimeoutError:
        return event.is_set()
