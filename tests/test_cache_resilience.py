"""A shared cache that dies must not fail a request: the guarded Redis store against a dead port, a
Redis that accepts and never answers, and a real redis-server killed (-9) and restarted on its port;
then a real gateway in front of the tiny model serving through the same outage."""
from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time

import pytest

from shelfsight.client import AsyncShelfsightClient, ShelfsightClient
from shelfsight.conversation import Conversation
from shelfsight.gateway.cache import RedisStore
from shelfsight.gateway.metrics import GatewayMetrics
from shelfsight.gateway.resilient import GuardedStore
from shelfsight.gateway.server import CACHE_HEALTH
from shelfsight.gateway.settings import CacheSettings
from shelfsight.serving.tritonserver import free_port
from tests.conftest import running_gateway
from tests.test_gateway import GREEDY, metric, photo, target


class RedisServer:
    """A real redis-server on one port that a test can kill -9 and start again on the same port."""

    def __init__(self, folder):
        self.binary = shutil.which("redis-server")
        assert self.binary, "redis-server is missing: `make env` installs it (scripts/system-deps)"
        self.port, self.folder, self.proc = free_port(), folder, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server never listened on {self.port}")

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no goodbye to its clients, as in a crash or an OOM kill
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def guarded(url: str, timeout: float = 0.5, retry: float = 60.0, changes: list | None = None):
    metrics = GatewayMetrics()
    store = GuardedStore(RedisStore(url, timeout=timeout), timeout, retry, metrics,
                         changes.append if changes is not None else None)
    return store, metrics


def count(metrics: GatewayMetrics, name: str, op: str | None = None) -> float:
    return sum(s.value for fam in metrics.registry.collect() for s in fam.samples
               if s.name == name and (op is None or s.labels.get("op") == op))


def cache_log(caplog, words: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("shelfsight") and words in r.getMessage()]


# ---- the guarded store, no gateway ----

def test_dead_port_is_a_miss_counted_and_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="shelfsight")

    async def scenario():
        store, metrics = guarded(f"redis://127.0.0.1:{free_port()}/0", changes=(changes := []))
        t0 = time.perf_counter()
        got = await store.get("k")
        first = time.perf_counter() - t0
        found = await store.candidates("ctx", None, 10, 4.0)
        await store.put("k", "ctx", None, b"v", 60)  # an answer to store: dropped, not raised
        t1 = time.perf_counter()
        again = [await store.get("k") for _ in range(100)]
        skipped = (time.perf_counter() - t1) / 100
        await store.close()
        return got, found, again, first, skipped, changes, metrics
    got, found, again, first, skipped, changes, metrics = asyncio.run(scenario())
    assert got is None and found == [] and again == [None] * 100
    assert first < 0.25, f"connection refused took {first:.3f} s"  # refused at once, retry included
    assert skipped < 0.002, f"an operation while down took {skipped * 1e3:.2f} ms"  # Redis is not asked
    assert count(metrics, "shelfsight_cache_errors_total", "get") == 1
    assert count(metrics, "shelfsight_cache_skipped_total") == 102 and count(metrics, "shelfsight_cache_up") == 0
    assert changes == [False]
    down = cache_log(caplog, "result cache down")
    assert len(down) == 1 and "ConnectionError" in down[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_hung_redis_costs_one_bounded_wait():
    """A server that accepts connections and never answers (the kernel completes the handshake for a
    listening socket nobody accepts on): the first operation ends at the guard's bound, not redis-py's
    socket timeout times its retries, and the ones after it do not wait at all."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)

        async def scenario():
            store, metrics = guarded(f"redis://127.0.0.1:{hung.getsockname()[1]}/0", timeout=0.3)
            t0 = time.perf_counter()
            got = await store.get("k")
            first = time.perf_counter() - t0
            t1 = time.perf_counter()
            await store.put("k", "ctx", None, b"v", 60)
            second = time.perf_counter() - t1
            await store.close()
            return got, first, second, metrics
        got, first, second, metrics = asyncio.run(scenario())
    assert got is None
    assert 0.25 < first < 0.6, f"the first operation took {first:.3f} s (bound 0.3 s)"
    assert second < 0.01
    assert count(metrics, "shelfsight_cache_errors_total", "get") == 1
    assert count(metrics, "shelfsight_cache_skipped_total", "put") == 1


def test_store_comes_back_when_redis_restarts_on_its_port(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="shelfsight")

    async def scenario():
        store, metrics = guarded(redis_server.url, retry=0.2, changes=(changes := []))
        await store.start()
        keys = [f"k{i}" for i in range(8)]
        await asyncio.gather(*(store.put(k, "ctx", None, k.encode(), 60) for k in keys))  # 8 pooled connections
        before = await asyncio.gather(*(store.get(k) for k in keys))
        redis_server.kill()
        during = await asyncio.gather(*(store.get(k) for k in keys))
        redis_server.start()
        t0 = time.monotonic()
        while not store.up and time.monotonic() < t0 + 10:
            await asyncio.sleep(0.02)
        resumed = time.monotonic() - t0
        errors = count(metrics, "shelfsight_cache_errors_total")
        await asyncio.gather(*(store.put(k, "ctx", None, k.encode(), 60) for k in keys))
        after = await asyncio.gather(*(store.get(k) for k in keys))
        new_errors = count(metrics, "shelfsight_cache_errors_total") - errors
        await store.close()
        return before, during, after, resumed, new_errors, changes
    before, during, after, resumed, new_errors, changes = asyncio.run(scenario())
    assert before == [k.encode() for k in ("k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7")]
    assert during == [None] * 8
    assert changes == [False, True] and resumed < 2, f"back after {resumed:.2f} s"
    assert after == before and new_errors == 0  # no stale pooled connection failed an operation
    assert len(cache_log(caplog, "result cache down")) == 1 and len(cache_log(caplog, "back up")) == 1
    assert not [r for r in caplog.records if r.exc_info]


def test_an_error_redis_answers_with_is_counted_but_does_not_take_it_down(redis_server, caplog):
    """Out of memory under `noeviction`: writes are refused, reads still work. Marking Redis down would
    flap (its PING answers) and lose the hits it still gives."""
    caplog.set_level(logging.INFO, logger="shelfsight")

    async def scenario():
        store, metrics = guarded(redis_server.url, changes=(changes := []))
        await store.put("k", "ctx", None, b"v", 60)
        await store.inner.redis.config_set("maxmemory-policy", "noeviction")
        await store.inner.redis.config_set("maxmemory", 1)
        for i in range(3):
            await store.put(f"new{i}", "ctx", None, b"v", 60)
        got = await store.get("k")
        await store.inner.redis.config_set("maxmemory", 0)
        await store.close()
        return got, changes, metrics
    got, changes, metrics = asyncio.run(scenario())
    assert got == b"v" and changes == []
    assert count(metrics, "shelfsight_cache_errors_total", "put") == 3 and count(metrics, "shelfsight_cache_up") == 1
    refused = cache_log(caplog, "result cache failed")
    assert len(refused) == 1 and "OutOfMemoryError" in refused[0].getMessage()  # at most one line a minute


# ---- a real gateway through a Redis outage ----

def test_gateway_answers_while_redis_is_dead_and_caches_again_when_it_returns(triton, redis_server, caplog):
    caplog.set_level(logging.INFO, logger="shelfsight")
    settings = CacheSettings(redis_url=redis_server.url, redis_retry=0.2)
    question = "What brand is this product?"
    with running_gateway(triton.grpc_url, cache=settings) as gw, ShelfsightClient(target(gw)) as health:
        async def load(c, seconds: float, seeds: list[int]) -> list:
            """Three clients asking cache=USE in a loop: known photos (hits while Redis lives) and new
            ones. -> [(cache status or the exception, started at, seconds)]."""
            end, out = time.monotonic() + seconds, []

            async def client(k: int):
                i = 0
                while time.monotonic() < end:
                    seed = seeds[(i + k) % len(seeds)] if i % 2 == 0 else 1000 + 100 * k + i
                    t0 = time.monotonic()
                    try:
                        r = await c.recognize(photo(seed), question, cache="use", **GREEDY)
                        out.append((r.cache_status, t0, time.monotonic() - t0))
                    except Exception as e:  # noqa: BLE001 - counted: the test is that there are none
                        out.append((e, t0, time.monotonic() - t0))
                    i += 1
            await asyncio.gather(*(client(k) for k in range(3)))
            return out

        async def outage():
            async with AsyncShelfsightClient(target(gw)) as c:
                seeds = [300, 301, 302]
                for seed in seeds:
                    assert (await c.recognize(photo(seed), question, cache="use", **GREEDY)).cache_status == "miss"

                async def kill_later():
                    await asyncio.sleep(2.0)
                    redis_server.kill()  # while the three clients are in the middle of their calls
                    return time.monotonic()
                results, killed = await asyncio.gather(load(c, 6.0, seeds), kill_later())
                return [r for r in results if r[1] < killed], [r for r in results if r[1] >= killed]
        warm, dead = asyncio.run(outage())
        failed = [r for r, *_ in warm + dead if isinstance(r, Exception)]
        assert not failed, f"{len(failed)} of {len(warm) + len(dead)} requests failed: {failed[:3]}"
        assert any(r == "exact" for r, *_ in warm) and len(dead) >= 3
        assert metric(gw, "shelfsight_cache_up") == 0 and metric(gw, "shelfsight_cache_errors_total") >= 1
        assert metric(gw, "shelfsight_cache_skipped_total", op="get") >= 1
        assert health.health(CACHE_HEALTH) == "NOT_SERVING"
        assert health.health() == "SERVING" and health.health("shelfsight.v1.ProductVision") == "SERVING"
        assert len(cache_log(caplog, "result cache down")) == 1
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"

        redis_server.start()
        t0 = time.monotonic()
        while health.health(CACHE_HEALTH) != "SERVING" and time.monotonic() < t0 + 10:
            time.sleep(0.05)
        resumed = time.monotonic() - t0
        assert health.health(CACHE_HEALTH) == "SERVING", "the cache never came back"
        errors = metric(gw, "shelfsight_cache_errors_total")

        async def back():
            async with AsyncShelfsightClient(target(gw)) as c:
                ask = [c.recognize(photo(seed), question, cache="use", **GREEDY) for seed in (400, 401, 402, 403)]
                first = await asyncio.gather(*ask, return_exceptions=True)
                again = await asyncio.gather(*(c.recognize(photo(seed), question, cache="use", **GREEDY)
                                               for seed in (400, 401, 402, 403)), return_exceptions=True)
                return first, again
        first, again = asyncio.run(back())
        assert [r.cache_status for r in first] == ["miss"] * 4, first  # Redis restarted empty
        assert [r.cache_status for r in again] == ["exact"] * 4, again  # stored, then served from Redis
        assert metric(gw, "shelfsight_cache_errors_total") == errors  # no stale pooled connection failed
        assert metric(gw, "shelfsight_cache_up") == 1
        assert len(cache_log(caplog, "result cache down")) == 1 and len(cache_log(caplog, "back up")) == 1
    dead_s = sorted(s for *_, s in dead)
    print(f"\nredis dead: {len(dead)} requests, 0 failed, p50 {dead_s[len(dead_s) // 2] * 1e3:.0f} ms, "
          f"max {dead_s[-1] * 1e3:.0f} ms; cache back {resumed:.2f} s after redis-server restarted")


def test_pictures_are_not_decoded_for_a_store_that_is_down():
    """While Redis is down there are no candidates to check and nothing is stored: the perceptual level
    must not spend a decode (the gateway's CPU) on each request."""
    from bench import perceptual_pairs as pp
    from shelfsight.gateway import cache as cache_module
    from shelfsight.gateway.settings import CacheSettings

    a, _ = pp.issue_pair()
    decoded = []
    original = cache_module.decode_picture
    cache_module.decode_picture = lambda *args: decoded.append(1) or original(*args)

    async def scenario():
        store, _ = guarded(f"redis://127.0.0.1:{free_port()}/0")
        rc = cache_module.ResultCache(CacheSettings(), store)
        key = cache_module.make_key((a,), Conversation.ask("q"), {}, "m", False)
        try:
            await store.get("probe")  # refused: the store is down from here on
            assert not store.up
            probe = cache_module.Probe(key)
            found = await rc.lookup(probe, a, lambda *_: None)
            await rc.put(probe, a, cache_module.CachedAnswer("x", "m", 1, 1, "stop", 0.0))
            return found
        finally:
            await rc.close()
    try:
        assert asyncio.run(scenario()) is None
    finally:
        cache_module.decode_picture = original
    assert decoded == []
