"""The Triton replicas one gateway sends to, and which one gets the next model call.

Each replica is an `Upstream` with its own watcher, readiness, model info and broken state. The pool
adds what only the whole can say:

- **which replica**: the ready one with the fewest calls in flight; ties go round robin, so an idle
  pool still spreads its calls;
- **what is served**: replicas must agree on the model id (answers are cached under it). The pool
  serves the id most ready replicas carry - sticking with the current one on a tie, so one replica
  restarted with another checkpoint cannot flip the pool - and leaves the others out, saying so in
  the log and in `shelfsight_replica_model_mismatch`;
- **health**: the gateway is SERVING while at least one replica is usable;
- **who the replicas are**: a fixed list (`--triton A:8001,B:8001`) or a DNS name re-resolved every
  few seconds (`--triton-dns NAME:PORT`, a Kubernetes headless Service), adding new addresses and
  retiring gone ones once their calls have ended.

Per-replica metrics carry the replica's address as a label: replicas are few, and a retired
replica's series are removed.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections import Counter
from typing import Awaitable, Callable, Iterable, TypeVar

from shelfsight.errors import FailedPrecondition, InvalidArgument, ModelProcessLost, ShelfsightError, Unavailable
from shelfsight.gateway.metrics import GatewayMetrics
from shelfsight.gateway.tasks import Background
from shelfsight.gateway.upstream import ModelInfo, Upstream
from shelfsight.serving import contract

log = logging.getLogger("shelfsight.gateway")
T = TypeVar("T")


def split_address(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); a clear error otherwise."""
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"{address!r} is not HOST:PORT")
    return host, int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_targets(spec: str) -> list[str]:
    """"A:8001,B:8001" -> the addresses, each checked, duplicates dropped, order kept."""
    out = [join_address(*split_address(a)) for a in spec.split(",") if a.strip()]
    if not out:
        raise InvalidArgument("no Triton address given (HOST:PORT[,HOST:PORT...])")
    return list(dict.fromkeys(out))


def resolve(name: str) -> list[str]:
    """NAME:PORT -> every address it resolves to (a headless Service: one per ready pod), sorted."""
    host, port = split_address(name)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({join_address(sockaddr[0], port) for *_, sockaddr in infos})


class Replicas:
    def __init__(self, targets: Iterable[str], interval: float, metrics: GatewayMetrics,
                 on_change: Callable[[bool], None] = lambda ready: None, dns: str | None = None,
                 dns_interval: float = 5.0, resolver: Callable[[str], list[str]] = resolve):
        self.interval, self.metrics, self.on_change = interval, metrics, on_change
        self.dns, self.dns_interval, self.resolver = dns, dns_interval, resolver
        self.replicas: dict[str, Upstream] = {}  # address -> replica, in the order they were added
        self.model_id: str | None = None  # the id the pool serves; replicas with another are left out
        self.ready = False
        self._targets = list(targets)
        self._turn = itertools.count()
        self._mismatched: set[str] = set()
        self._tasks = Background()  # the DNS loop, replicas being retired

    # ---- membership ----
    async def start(self) -> None:
        if self.dns:
            split_address(self.dns)  # a malformed name fails at start, not silently in the loop
            await self._follow_dns_once()
            self._tasks.spawn(self._follow_dns(), name=f"follow {self.dns}")
        else:
            await self._add_all(self._targets)

    def add(self, address: str) -> Upstream:
        """A replica made without starting it (start() or the DNS loop start theirs)."""
        replica = Upstream(address, self.interval, on_change=lambda ready: self._refresh())
        self.replicas[address] = replica
        return replica

    async def _add_all(self, addresses: Iterable[str]) -> None:
        new = [self.add(a) for a in addresses if a not in self.replicas]
        await asyncio.gather(*(r.start() for r in new))
        self._refresh()

    async def _follow_dns_once(self) -> None:
        try:
            found = await asyncio.to_thread(self.resolver, self.dns)
        except OSError as e:  # keep what we have: a DNS hiccup must not empty the pool
            log.warning("cannot resolve %s: %s; keeping %d replicas", self.dns, e, len(self.replicas))
            return
        gone = [a for a in self.replicas if a not in found]
        if gone or any(a not in self.replicas for a in found):
            log.info("%s resolves to %s", self.dns, ", ".join(found) or "nothing")
        for address in gone:
            self._tasks.spawn(self._retire(self.replicas.pop(address)), name=f"retire {address}")
        await self._add_all(found)

    async def _follow_dns(self) -> None:
        while True:
            await asyncio.sleep(self.dns_interval)
            try:
                await self._follow_dns_once()
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                log.exception("following %s failed", self.dns)

    async def _retire(self, replica: Upstream) -> None:
        """A replica that left the pool takes no new calls; close it once its calls ended."""
        self._refresh()
        while replica.in_flight:
            await asyncio.sleep(0.1)
        await replica.close()
        self.metrics.forget_replica(replica.url)

    # ---- what is served ----
    def _refresh(self) -> None:
        """Recompute the served model id, which replicas are usable, and the pool's health."""
        up = [r for r in self.replicas.values() if r.ready and r.info is not None]
        ids = Counter(r.info.model_id for r in up)
        if ids and ids.get(self.model_id, 0) < max(ids.values()):
            self.model_id = ids.most_common(1)[0][0]
        for r in self.replicas.values():
            mismatched = r in up and r.info.model_id != self.model_id
            if mismatched and r.url not in self._mismatched:
                log.warning("triton at %s serves %s, the other replicas %s: not using it", r.url,
                            r.info.model_id, self.model_id)
            (self._mismatched.add if mismatched else self._mismatched.discard)(r.url)
            self.metrics.replica_mismatch.labels(r.url).set(1 if mismatched else 0)
            self.metrics.replica_up.labels(r.url).set(1 if r in up and not mismatched else 0)
        ready = any(self._usable(r) for r in self.replicas.values())
        if ready != self.ready:
            self.ready = ready
            self.on_change(ready)

    def _usable(self, r: Upstream) -> bool:
        return r.ready and r.info is not None and r.info.model_id == self.model_id

    def model(self) -> ModelInfo:
        """What is served, or UNAVAILABLE while no replica can answer."""
        for r in self.replicas.values():
            if self._usable(r):
                return r.info
        states = ", ".join(f"{r.url} {'broken: ' + r.broken if r.broken else 'not ready'}"
                           for r in self.replicas.values()) or f"none found at {self.dns}"
        raise Unavailable(f"no model server is ready ({states}); retry shortly")

    def serving(self, model: str) -> tuple[Upstream, dict]:
        """A usable replica that serves the retrieval model `model` (contract.EMBED / RERANK), and that
        model's public info; FAILED_PRECONDITION when the pool serves no such model."""
        usable = [r for r in self.replicas.values() if self._usable(r)]
        if not usable:
            self.model()  # raises UNAVAILABLE, naming each replica's state
        having = [r for r in usable if model in r.retrieval]
        if not having:
            what = {contract.EMBED: "embedding model (`serve --embedding DIR`)",
                    contract.RERANK: "reranker (`serve --reranker DIR`)"}[model]
            raise FailedPrecondition(f"this deployment serves no {what}")
        turn = next(self._turn) % len(having)
        best = min(having[turn:] + having[:turn], key=lambda r: r.in_flight)
        return best, best.retrieval[model]

    # ---- choosing and calling ----
    def pick(self, exclude: Iterable[Upstream] = ()) -> Upstream:
        """The usable replica with the fewest calls in flight (ties: round robin); UNAVAILABLE if none."""
        skip = set(map(id, exclude))
        usable = [r for r in self.replicas.values() if self._usable(r) and id(r) not in skip]
        if not usable:
            self.model()  # raises, naming each replica's state, when the whole pool is down
            raise Unavailable("no other model server is ready; retry shortly")
        turn = next(self._turn) % len(usable)
        rotated = usable[turn:] + usable[:turn]
        return min(rotated, key=lambda r: r.in_flight)  # min keeps the first of equals

    def has_other(self, tried: Iterable[Upstream]) -> bool:
        """Is a usable replica left that is not in `tried`?"""
        skip = set(map(id, tried))
        return any(self._usable(r) and id(r) not in skip for r in self.replicas.values())

    async def call(self, replica: Upstream, work: Awaitable[T]) -> T:
        """Run one model call on `replica`, counting it in the replica's metrics, and react to how it
        failed: a lost model process marks the replica broken, other UNAVAILABLEs check it now."""
        gauge = self.metrics.replica_calls.labels(replica.url)
        gauge.inc()
        t0, outcome = time.perf_counter(), "OK"
        try:
            return await replica.call(work)
        except ShelfsightError as e:
            outcome = e.code
            if isinstance(e, ModelProcessLost):
                replica.mark_broken(e.message)  # ends its other calls, which would hang
            elif isinstance(e, Unavailable):
                replica.poke()  # learn now whether that Triton is gone
            raise
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        finally:
            gauge.dec()
            self.metrics.replica_seconds.labels(replica.url, outcome).observe(time.perf_counter() - t0)

    # ---- the supervisor of `shelfsight serve` (its one local Triton) ----
    def mark_broken(self, reason: str) -> None:
        for r in self.replicas.values():
            r.mark_broken(reason)

    def poke(self) -> None:
        for r in self.replicas.values():
            r.poke()

    async def close(self) -> None:
        await self._tasks.close()
        await asyncio.gather(*(r.close() for r in self.replicas.values()), return_exceptions=True)
