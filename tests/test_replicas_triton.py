"""One gateway over two real tritonservers (the tiny model on CPU, on loopback): the load spreads over
both (by Triton's own counters), one killed mid-load loses no request that had not streamed text yet and
is taken out at once, and once restarted it takes traffic again. The session's `triton` is one replica;
this module starts the second (and restarts it once), so it keeps to a few short requests."""
from __future__ import annotations

import threading
import time

import pytest

from shelfsight import errors
from shelfsight.client import ShelfsightClient
from shelfsight.gateway.settings import CacheSettings
from shelfsight.serving.tritonserver import TritonServer, TritonSettings
from tests.conftest import running_gateway, scrape
from tests.test_gateway import GREEDY, metric, photo, redis_url, target  # noqa: F401 - redis_url is a fixture

pytestmark = pytest.mark.slow
LONG = dict(temperature=0.0, max_new_tokens=400, cache="skip")


class Replica:
    """A tritonserver that can be killed and started again on the same ports."""

    def __init__(self, settings: TritonSettings):
        self.server = TritonServer(settings).start()

    def restart(self) -> None:
        self.server = TritonServer(self.server.settings).start()


@pytest.fixture(scope="module")
def second(triton):
    """A second tritonserver on the session server's repository."""
    replica = Replica(TritonSettings(repo=triton.settings.repo, startup_timeout=240))
    yield replica
    replica.server.stop(graceful=False)


def inferences(server: TritonServer) -> float:
    """Triton's own count of `pipeline_stream` requests it executed."""
    return sum(v for k, v in scrape(server.metrics_url).items()
               if k.startswith("nv_inference_count{") and 'model="pipeline_stream"' in k)


def both_ready(gw, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(r.ready for r in gw.upstream.replicas.values()):
        assert time.monotonic() < deadline, {r.url: (r.ready, r.broken) for r in gw.upstream.replicas.values()}
        time.sleep(0.05)


def start(gw, n: int, seed: int, **kw) -> tuple[list, list[threading.Thread]]:
    """n streaming requests, each on its own thread; each result ends as ("OK" | status code, chunks of
    text it had received)."""
    results: list = [None] * n

    def ask(i):
        texts = 0
        try:
            with ShelfsightClient(target(gw)) as c:
                for chunk in c.stream(photo(seed + i), f"Question {seed + i}: read the label.", timeout=120, **kw):
                    texts += bool(chunk.text)
            results[i] = ("OK", texts)
        except errors.ShelfsightError as e:
            results[i] = (e.code, texts)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return results, threads


def concurrently(gw, n: int, seed: int, during=None, **kw) -> list:
    """n streaming requests at once; `during()` runs 1.5 s in, while they decode."""
    results, threads = start(gw, n, seed, **kw)
    if during is not None:
        time.sleep(1.5)
        during()
    for t in threads:
        t.join(150)
    return results


def test_load_spreads_over_both_replicas(triton, second):
    servers = (triton, second.server)
    with running_gateway(f"{triton.grpc_url},{second.server.grpc_url}") as gw:
        both_ready(gw)
        before = [inferences(s) for s in servers]
        results = concurrently(gw, 8, seed=300, temperature=0.0, max_new_tokens=24, cache="skip")
        split = [inferences(s) - b for s, b in zip(servers, before)]
        print(f"8 requests over two replicas: {split[0]:.0f} on one, {split[1]:.0f} on the other (nv_inference_count)")
        assert [r[0] for r in results] == ["OK"] * 8, results
        assert sum(split) == 8 and min(split) >= 3, split  # fewest-in-flight: 4 + 4 when all arrive together
        for s in servers:
            assert metric(gw, "shelfsight_replica_request_duration_seconds_count",
                          replica=s.grpc_url, outcome="OK") == split[servers.index(s)]
            assert metric(gw, "shelfsight_replica_up", replica=s.grpc_url) == 1


def test_two_gateways_over_two_replicas_share_the_redis_cache(triton, second, redis_url):  # noqa: F811
    shared = CacheSettings(redis_url=redis_url)
    pair = f"{triton.grpc_url},{second.server.grpc_url}"
    with running_gateway(pair, cache=shared) as a, running_gateway(pair, cache=shared) as b:
        with ShelfsightClient(target(a)) as ca, ShelfsightClient(target(b)) as cb:
            first = ca.recognize(photo(350), "What brand?", **GREEDY)
            again = cb.recognize(photo(350), "What brand?", **GREEDY)
        assert (first.cache_status, again.cache_status, again.text) == ("miss", "exact", first.text)


def test_killed_replica_loses_only_streamed_requests_and_comes_back(triton, second):
    with running_gateway(f"{triton.grpc_url},{second.server.grpc_url}") as gw:
        both_ready(gw)
        killed = second.server.grpc_url
        out = {}

        def kill():
            # 4 more requests just before the kill: those sent to the doomed replica have no text yet
            out["late"], late_threads = start(gw, 4, seed=450, **LONG)
            time.sleep(0.05)
            out["at"] = time.monotonic()
            second.server.stop(graceful=False)  # SIGKILL to its process group: the replica is gone
            while gw.upstream.replicas[killed].ready:
                time.sleep(0.01)
            out["taken_out"] = time.monotonic() - out["at"]
            for t in late_threads:
                t.join(150)

        results = concurrently(gw, 8, seed=400, during=kill, **LONG) + out["late"]
        lost = [r for r in results if r[0] != "OK"]
        print(f"killed one of two replicas under {len(results)} long requests: {len(results) - len(lost)} "
              f"answered, {len(lost)} failed (all after streaming text), taken out after {out['taken_out']:.2f}s, "
              f"{metric(gw, 'shelfsight_replica_retries_total'):.0f} retried on the other replica")
        # a request fails only if it had already streamed text from the killed replica, and as UNAVAILABLE
        assert all(code == "UNAVAILABLE" and texts > 0 for code, texts in lost), results
        assert len(lost) <= 6, results  # at most its share; the other replica's requests all finished
        assert out["taken_out"] < 2.0
        assert metric(gw, "shelfsight_replica_up", replica=killed) == 0
        with ShelfsightClient(target(gw)) as c:
            assert c.health() == "SERVING"

        second.restart()
        deadline = time.monotonic() + 10
        while not gw.upstream.replicas[killed].ready:
            assert time.monotonic() < deadline, "the restarted replica was not taken back"
            time.sleep(0.05)
        results = concurrently(gw, 4, seed=500, temperature=0.0, max_new_tokens=24, cache="skip")
        assert [r[0] for r in results] == ["OK"] * 4, results
        assert inferences(second.server) >= 1, "the restarted replica took no traffic"


def test_request_sent_to_a_dead_replica_not_yet_noticed_is_retried(triton, second):
    """The watcher looks only every 30 s here, so the pool still counts the dead replica as ready:
    calls sent to it fail UNAVAILABLE before any text and are retried on the other one."""
    with running_gateway(f"{triton.grpc_url},{second.server.grpc_url}", health_interval=30.0) as gw:
        both_ready(gw)
        second.server.stop(graceful=False)
        results = concurrently(gw, 2, seed=600, temperature=0.0, max_new_tokens=8, cache="skip")
        assert [r[0] for r in results] == ["OK", "OK"], results
        assert metric(gw, "shelfsight_replica_retries_total") >= 1
        assert metric(gw, "shelfsight_replica_request_duration_seconds_count",
                      replica=second.server.grpc_url, outcome="UNAVAILABLE") >= 1
        assert not gw.upstream.replicas[second.server.grpc_url].ready  # the failure made it look at once
