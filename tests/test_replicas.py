"""The replica pool's own logic, in seconds: which replica gets a call, what the pool serves when replicas
disagree, health, broken replicas, and following a DNS name. Replicas here are real `Upstream`s whose
readiness is set by hand (no Triton runs in this file; tests/test_replicas_triton.py runs two); calls are
real coroutines held open by events, so `in_flight` is what the pool really counts."""
from __future__ import annotations

import asyncio

import pytest

from shelfsight.errors import InvalidArgument, Unavailable
from shelfsight.gateway.metrics import GatewayMetrics
from shelfsight.gateway.replicas import Replicas, parse_targets, resolve
from shelfsight.gateway.upstream import ModelInfo
from shelfsight.model.imaging import ImageLimits
from shelfsight.params import GenerationParams, Limits
from shelfsight.serving.tritonserver import free_port
from tests.conftest import run


def info(model_id: str) -> ModelInfo:
    return ModelInfo(model_id, "bf16", GenerationParams(), Limits(), ImageLimits())


def pool(*ids: str | None, changes: list | None = None) -> Replicas:
    """Replicas at fake addresses (never connected), ready with the given model ids (None: not ready)."""
    p = Replicas((), 1.0, GatewayMetrics(), on_change=(changes.append if changes is not None else lambda r: None))
    for i, model_id in enumerate(ids):
        r = p.add(f"10.0.0.{i + 1}:8001")
        if model_id is not None:
            r.info = info(model_id)
            r.set_ready(True)  # the pool hears of it as from a readiness check
    return p


def sample(p: Replicas, name: str, replica: str) -> float:
    return p.metrics.registry.get_sample_value(name, {"replica": replica}) or 0.0


def test_targets_are_checked_and_deduplicated():
    assert parse_targets("a:8001, b:8001,a:8001,[::1]:9") == ["a:8001", "b:8001", "[::1]:9"]
    for bad in ("", "a", "a:port", "a:0", ":8001", "a:8001,b"):
        with pytest.raises(InvalidArgument):
            parse_targets(bad)


def test_dns_names_resolve_to_every_address():
    assert "127.0.0.1:8001" in resolve("localhost:8001")


def test_idle_replicas_take_turns():
    p = pool("m", "m", "m")
    picked = [p.pick().url for _ in range(6)]
    assert sorted(picked) == sorted([r for r in p.replicas] * 2)
    assert picked[:3] != picked[1:4]  # not the same one twice in a row


def test_busiest_replica_is_avoided_and_counts_are_real():
    async def main():
        p = pool("m", "m")
        a, b = p.replicas.values()
        release = asyncio.Event()
        held = [asyncio.create_task(p.call(a, release.wait())) for _ in range(2)]
        held.append(asyncio.create_task(p.call(b, release.wait())))
        await asyncio.sleep(0)
        assert (a.in_flight, b.in_flight) == (2, 1)
        assert sample(p, "shelfsight_replica_calls_in_flight", a.url) == 2
        assert {p.pick().url for _ in range(5)} == {b.url}
        release.set()
        await asyncio.gather(*held)
        assert (a.in_flight, b.in_flight) == (0, 0)
        assert p.metrics.registry.get_sample_value("shelfsight_replica_request_duration_seconds_count",
                                                   {"replica": a.url, "outcome": "OK"}) == 2
    run(main())


def test_not_ready_and_excluded_replicas_are_skipped():
    p = pool("m", None, "m")
    first, down, third = p.replicas.values()
    assert {p.pick().url for _ in range(4)} == {first.url, third.url}
    assert p.pick(exclude=[first]) is third
    assert p.has_other([first]) and not p.has_other([first, third])
    with pytest.raises(Unavailable, match="no other"):
        p.pick(exclude=[first, third])


def test_replica_with_another_model_is_left_out_and_said_so(caplog):
    p = pool("old", "new", "new")
    odd = next(iter(p.replicas.values()))
    assert p.model_id == "new" and p.model().model_id == "new"
    assert odd.url not in {p.pick().url for _ in range(6)}
    assert sample(p, "shelfsight_replica_model_mismatch", odd.url) == 1
    assert sample(p, "shelfsight_replica_up", odd.url) == 0
    assert "serves old" in caplog.text


def test_a_tie_keeps_the_model_already_served():
    p = pool("a", None)
    second = list(p.replicas.values())[1]
    second.info = info("b")
    second.set_ready(True)  # one says a, one says b: the pool stays with a
    assert p.model_id == "a" and p.pick(exclude=[]).info.model_id == "a"


def test_health_follows_the_first_and_the_last_ready_replica():
    changes = []
    p = pool(None, None, changes=changes)
    a, b = p.replicas.values()
    with pytest.raises(Unavailable, match="10.0.0.1:8001 not ready"):
        p.model()
    a.info = b.info = info("m")
    a.set_ready(True)
    b.set_ready(True)
    a.set_ready(False)
    assert changes == [True]
    b.set_ready(False)
    assert changes == [True, False] and not p.ready


def test_broken_replica_ends_only_its_own_calls_as_unavailable():
    async def main():
        p = pool("m", "m")
        a, b = p.replicas.values()
        release = asyncio.Event()
        on_a = asyncio.create_task(p.call(a, release.wait()))
        on_b = asyncio.create_task(p.call(b, release.wait()))
        await asyncio.sleep(0)
        a.mark_broken("Stub process 'generate_0' is not healthy")
        with pytest.raises(Unavailable, match="10.0.0.1:8001 failed"):
            await on_a
        assert not on_b.done() and not a.ready and p.ready
        assert {p.pick().url for _ in range(3)} == {b.url}
        release.set()
        assert await on_b is True
    run(main())


def test_cancelling_the_caller_is_not_turned_into_unavailable():
    async def main():
        p = pool("m")
        (a,) = p.replicas.values()
        task = asyncio.create_task(p.call(a, asyncio.Event().wait()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert a.in_flight == 0
    run(main())


def test_dns_name_adds_and_retires_replicas():
    """Nothing listens at these ports: the replicas are found and dropped, never ready."""
    ports = [free_port(), free_port()]
    answers = [[f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"]]

    async def main():
        p = Replicas((), 0.2, GatewayMetrics(), dns="shelfsight-triton:8001", dns_interval=0.05,
                     resolver=lambda name: answers[-1])
        await p.start()
        assert list(p.replicas) == answers[0] and not p.ready
        assert sample(p, "shelfsight_replica_up", answers[0][1]) == 0  # present, at zero
        answers.append([f"127.0.0.1:{ports[1]}"])
        for _ in range(100):
            await asyncio.sleep(0.05)
            if list(p.replicas) == answers[-1] and p.metrics.registry.get_sample_value(
                    "shelfsight_replica_up", {"replica": answers[0][0]}) is None:
                break
        assert list(p.replicas) == answers[-1]
        assert p.metrics.registry.get_sample_value("shelfsight_replica_up", {"replica": answers[0][0]}) is None

        def fails(name):
            raise OSError("temporary failure in name resolution")
        p.resolver = fails
        await asyncio.sleep(0.2)
        assert list(p.replicas) == answers[-1]  # a failed lookup keeps the pool
        await p.close()
    run(main())


def test_background_tasks_are_held_until_done_and_their_failures_logged(caplog):
    """The pool's DNS loop and retirements run as Background tasks: referenced while they run (asyncio
    keeps only a weak reference), a failure logged with the task's name, close() ends the rest."""
    from shelfsight.gateway.tasks import Background

    async def fail():
        await asyncio.sleep(0)
        raise RuntimeError("resolver exploded")

    async def main():
        tasks, forever = Background(), asyncio.Event()
        tasks.spawn(fail(), name="follow shelfsight-triton:8001")
        held = tasks.spawn(forever.wait(), name="retire 10.0.0.1:8001")
        assert len(tasks) == 2
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(tasks) == 1
        await tasks.close()
        assert held.cancelled() and len(tasks) == 0
    run(main())
    failed = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(failed) == 1 and "follow shelfsight-triton:8001 failed" in failed[0].getMessage()
    assert "resolver exploded" in caplog.text
