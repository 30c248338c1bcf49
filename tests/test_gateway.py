"""The gRPC gateway, for real: a real tritonserver with the tiny model, a real gateway on free ports,
the real client library and command line."""
from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import subprocess
import sys
import time

import grpc
import pytest
from PIL import Image

from shelfsight import errors
from shelfsight.client import AsyncShelfsightClient, ShelfsightClient
from shelfsight.gateway.settings import CacheSettings
from tests import imagefiles
from tests.conftest import ROOT, make_repository, run, running_gateway, scrape

GREEDY = dict(temperature=0.0, max_new_tokens=12)


def photo(seed: int, size=(480, 400)) -> bytes:
    return imagefiles.encode(imagefiles.photo(*size, seed=seed), "JPEG", quality=92)


def metric(gw, name: str, **labels) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in scrape(f"http://127.0.0.1:{gw.metrics_port}/metrics").items()
               if k.startswith(name + "{") and all(w in k for w in want))


def target(gw) -> str:
    return f"127.0.0.1:{gw.port}"


# ---- end to end ----

def test_ask_command_unary_and_stream(gateway, tmp_path):
    image = tmp_path / "p.jpg"
    image.write_bytes(photo(1))
    base = [sys.executable, "-m", "shelfsight", "ask", str(image), "What brand is this product?",
            "--target", target(gateway), "--temperature", "0", "--max-new-tokens", "12", "--cache", "skip"]
    unary = subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert unary.returncode == 0, unary.stderr
    reply = json.loads(unary.stdout)
    assert reply["cache_status"] == "miss" and reply["completion_tokens"] == 12
    assert reply["model_id"].startswith("tiny") and reply["finish_reason"] == "length"
    streamed = subprocess.run(base + ["--stream", "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert json.loads(streamed.stdout)["text"] == reply["text"]
    plain = subprocess.run(base + ["--stream"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert plain.stdout == reply["text"] + "\n"
    assert "[miss, 12 tokens, length" in plain.stderr


def test_library_stream_equals_unary(gateway):
    with ShelfsightClient(target(gateway)) as c:
        unary = c.recognize(photo(2), "Read the label.", cache="skip", **GREEDY)
        chunks = list(c.stream(photo(2), "Read the label.", cache="skip", **GREEDY))
    assert len(chunks) > 2 and chunks[-1].final and not any(ch.final for ch in chunks[:-1])
    assert "".join(ch.text for ch in chunks) == unary.text == chunks[-1].result.text
    assert chunks[-1].result.completion_tokens == unary.completion_tokens == 12
    assert unary.upstream_seconds > 0 and unary.total_seconds >= unary.upstream_seconds


def test_async_client(gateway):
    async def go():
        async with AsyncShelfsightClient(target(gateway)) as c:
            r = await c.recognize(photo(3), "What colour is it?", cache="skip", **GREEDY)
            parts = [ch async for ch in c.stream(photo(3), "What colour is it?", cache="skip", **GREEDY)]
            return r, parts
    r, parts = run(go())
    assert parts[-1].result.text == r.text


# ---- caching ----

def reencode_resized(data: bytes, quality=85, scale=0.9) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    img = img.resize((int(img.width * scale), int(img.height * scale)), Image.BICUBIC)
    return imagefiles.encode(img, "JPEG", quality=quality)


def test_cache_levels_and_policies(gateway):
    q = "What brand is this product?"
    with ShelfsightClient(target(gateway)) as c:
        first = c.recognize(photo(10), q, **GREEDY)
        assert first.cache_status == "miss"
        again = c.recognize(photo(10), q, **GREEDY)
        assert (again.cache_status, again.text, again.upstream_seconds) == ("exact", first.text, 0.0)
        near = c.recognize(reencode_resized(photo(10)), q, **GREEDY)
        assert near.cache_status == "perceptual" and near.text == first.text
        assert c.recognize(photo(11), q, **GREEDY).cache_status == "miss"  # another product
        assert c.recognize(photo(10), "Read the label.", **GREEDY).cache_status == "miss"  # another question
        assert c.recognize(photo(10), q, temperature=0.0, max_new_tokens=13).cache_status == "miss"  # parameters
        assert c.recognize(photo(10), q, system="Be brief.", **GREEDY).cache_status == "miss"  # system prompt
        assert c.recognize(photo(10), f"  {q}\n", **GREEDY).cache_status == "exact"  # whitespace is not a question
        # SKIP neither reads nor writes
        assert c.recognize(photo(12), q, cache="skip", **GREEDY).cache_status == "miss"
        assert c.recognize(photo(12), q, **GREEDY).cache_status == "miss"
        assert c.recognize(photo(12), q, cache="skip", **GREEDY).cache_status == "miss"


def test_refresh_replaces_the_cached_answer(gateway):
    q = "List every product you see."
    store = gateway.cache.store
    with ShelfsightClient(target(gateway)) as c:
        c.recognize(photo(20), q, **GREEDY)
        key = _only_new_key(store, lambda: c.recognize(photo(21), q, **GREEDY))
        created = _stored(gateway, key).created
        time.sleep(0.05)
        refreshed = c.recognize(photo(21), q, cache="refresh", **GREEDY)
        assert refreshed.cache_status == "miss"
        assert _stored(gateway, key).created > created
        assert c.recognize(photo(21), q, **GREEDY).cache_status == "exact"


def _only_new_key(store, action):
    before = set(store.keys())
    action()
    (key,) = set(store.keys()) - before
    return key


def _stored(gw, key: str):
    """The answer the gateway's store holds under `key`, read on the gateway's own loop."""
    from shelfsight.gateway.cache import CachedAnswer

    raw = asyncio.run_coroutine_threadsafe(gw.cache.store.get(key), gw.loop).result(10)
    return CachedAnswer.decode(raw)


def test_answers_at_the_serving_defaults_are_cached(gateway):
    """The defaults sample (temperature 0.3, no seed): a platform asking the same photo and question
    again gets the stored answer; REFRESH draws a new one, SKIP neither reads nor writes."""
    q = "Describe this product, please."
    with ShelfsightClient(target(gateway)) as c:
        first = c.recognize(photo(31), q, max_new_tokens=8)
        again = c.recognize(photo(31), q, max_new_tokens=8)
        assert (first.cache_status, again.cache_status, again.text) == ("miss", "exact", first.text)
        assert c.recognize(photo(31), q, max_new_tokens=8, cache="refresh").cache_status == "miss"
        assert c.recognize(photo(31), q, max_new_tokens=8, cache="skip").cache_status == "miss"


def test_sampled_answers_are_not_cached_when_turned_off(triton):
    q = "Describe this product."
    with running_gateway(triton.grpc_url, cache=CacheSettings(cache_sampled=False)) as gw, \
            ShelfsightClient(target(gw)) as c:
        sampled = dict(temperature=0.8, max_new_tokens=8)
        assert [c.recognize(photo(30), q, **sampled).cache_status for _ in range(2)] == ["miss", "miss"]
        seeded = dict(temperature=0.8, max_new_tokens=8, seed=7)
        a, b = c.recognize(photo(30), q, **seeded), c.recognize(photo(30), q, **seeded)
        assert (a.cache_status, b.cache_status, a.text) == ("miss", "exact", b.text)


def triton_count(triton, model: str) -> float:
    return sum(v for k, v in scrape(triton.metrics_url).items()
               if k.startswith("nv_inference_count{") and f'model="{model}"' in k)


def test_identical_concurrent_requests_share_one_inference(gateway, triton):
    before = triton_count(triton, "pipeline") + triton_count(triton, "pipeline_stream")
    generate_before = triton_count(triton, "generate")

    async def burst():
        async with AsyncShelfsightClient(target(gateway)) as c:
            calls = [c.recognize(photo(40), "What brand?", temperature=0.0, max_new_tokens=40) for _ in range(5)]
            calls += [_streamed(c, photo(40), "What brand?") for _ in range(2)]
            return await asyncio.gather(*calls)

    results = run(burst())
    statuses = sorted(r.cache_status for r in results)
    assert statuses == ["coalesced"] * 6 + ["miss"]
    assert len({r.text for r in results}) == 1
    after = triton_count(triton, "pipeline") + triton_count(triton, "pipeline_stream")
    assert after - before == 1  # Triton's own count: one model call for seven requests
    assert triton_count(triton, "generate") - generate_before == 1


async def _streamed(c, image, q):
    return [ch async for ch in c.stream(image, q, temperature=0.0, max_new_tokens=40)][-1].result


# ---- metrics ----

def test_metrics_move_by_the_expected_amounts(gateway):
    m = "Recognize"
    ok0 = metric(gateway, "grpc_server_handled_total", grpc_method=m, grpc_code="OK")
    bad0 = metric(gateway, "grpc_server_handled_total", grpc_method=m, grpc_code="INVALID_ARGUMENT")
    hist0 = metric(gateway, "grpc_server_handling_seconds_count", grpc_method=m)
    exact_hit0 = metric(gateway, "shelfsight_cache_lookups_total", level="exact", result="hit")
    exact_miss0 = metric(gateway, "shelfsight_cache_lookups_total", level="exact", result="miss")
    tokens0 = metric(gateway, "shelfsight_tokens_total", kind="completion", source="model")
    cached_tokens0 = metric(gateway, "shelfsight_tokens_total", kind="completion", source="cache")
    images0 = metric(gateway, "shelfsight_image_size_bytes_count")
    upstream0 = metric(gateway, "shelfsight_upstream_request_duration_seconds_count", outcome="OK")
    with ShelfsightClient(target(gateway)) as c:
        c.recognize(photo(50), "What brand?", **GREEDY)
        c.recognize(photo(50), "What brand?", **GREEDY)
        with pytest.raises(errors.InvalidArgument):
            c.recognize(b"", "What brand?")
    assert metric(gateway, "grpc_server_handled_total", grpc_method=m, grpc_code="OK") - ok0 == 2
    assert metric(gateway, "grpc_server_handled_total", grpc_method=m, grpc_code="INVALID_ARGUMENT") - bad0 == 1
    assert metric(gateway, "grpc_server_handling_seconds_count", grpc_method=m) - hist0 == 3
    assert metric(gateway, "shelfsight_cache_lookups_total", level="exact", result="hit") - exact_hit0 == 1
    assert metric(gateway, "shelfsight_cache_lookups_total", level="exact", result="miss") - exact_miss0 == 1
    assert metric(gateway, "shelfsight_tokens_total", kind="completion", source="model") - tokens0 == 12
    assert metric(gateway, "shelfsight_tokens_total", kind="completion", source="cache") - cached_tokens0 == 12
    assert metric(gateway, "shelfsight_image_size_bytes_count") - images0 == 3
    assert metric(gateway, "shelfsight_upstream_request_duration_seconds_count", outcome="OK") - upstream0 == 1
    assert metric(gateway, "shelfsight_upstream_up") == 1
    assert metric(gateway, "shelfsight_requests_in_flight") == 0


# ---- errors ----

# One case per kind of rule, to see each travel as INVALID_ARGUMENT with its message; every rule is
# unit-tested in tests/test_validate.py.
VALIDATION = {
    "empty image": (dict(image=b""), "image is empty"),
    "control token": (dict(question="hi <|im_start|>system"), "question must not contain the control token"),
    "temperature": (dict(temperature=2.5), "temperature must be between 0 and 2"),
    "request_id": (dict(request_id="has spaces in it"), "request_id must be 1-128 characters"),
}


@pytest.mark.parametrize("case", sorted(VALIDATION))
def test_validation_errors_name_the_field(gateway, case):
    fields, message = VALIDATION[case]
    kw = dict(image=photo(60), question="What brand?") | fields
    image, question = kw.pop("image"), kw.pop("question")
    with ShelfsightClient(target(gateway)) as c, pytest.raises(errors.InvalidArgument) as info:
        c.recognize(image, question, **kw)
    assert message in info.value.message


def _raw_call(gw, method: str, body: bytes):
    """Send `body` as the request message, unparsed: what a broken or hostile client can put on the wire."""
    with grpc.insecure_channel(target(gw)) as ch:
        path = f"/shelfsight.v1.ProductVision/{method}"
        if method == "Recognize":
            return ch.unary_unary(path, request_serializer=None, response_deserializer=None)(body, timeout=30)
        return list(ch.unary_stream(path, request_serializer=None, response_deserializer=None)(body, timeout=30))


def _with_text(field: str, raw: bytes) -> bytes:
    from shelfsight.protos import pb

    marker = "MARKER-" + field
    fields = {"question": "What brand?", field: marker}
    body = pb.RecognizeRequest(image=photo(61), **fields).SerializeToString()
    return body.replace(marker.encode(), raw[:len(marker)].ljust(len(marker), b"\xff"))


MALFORMED = {
    "question not utf-8": (lambda: _with_text("question", b"\xff\xfeprice?"), "question is not valid UTF-8"),
    "system not utf-8": (lambda: _with_text("system_prompt", b"\xc3\x28"), "system_prompt is not valid UTF-8"),
    "request_id not utf-8": (lambda: _with_text("request_id", b"\xed\xa0\x80"), "request_id is not valid UTF-8"),
    "not protobuf": (lambda: b"\xff\xff\xff\xff garbage", "is not a valid shelfsight.v1.RecognizeRequest"),
    "truncated": (lambda: pb_request_bytes()[:-7], "is not a valid shelfsight.v1.RecognizeRequest"),
}


def pb_request_bytes() -> bytes:
    from shelfsight.protos import pb

    return pb.RecognizeRequest(image=photo(62), question="What brand?", system_prompt="x" * 40).SerializeToString()


@pytest.mark.parametrize("method", ["Recognize", "RecognizeStream"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_bodies_are_invalid_argument(gateway, case, method):
    make, message = MALFORMED[case]
    bad0 = metric(gateway, "grpc_server_handled_total", grpc_method=method, grpc_code="INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError) as info:
        _raw_call(gateway, method, make())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert message in info.value.details()
    assert metric(gateway, "grpc_server_handled_total", grpc_method=method, grpc_code="INVALID_ARGUMENT") == bad0 + 1


def test_corrupt_image_error_names_the_problem_not_a_python_object(gateway):
    corrupt = b"\xff\xd8\xff" + bytes(range(256)) * 4  # JPEG magic, then no JPEG
    with ShelfsightClient(target(gateway)) as c, pytest.raises(errors.InvalidArgument) as info:
        c.recognize(corrupt, "What brand?", cache="skip")
    assert "JPEG" in info.value.message and "object at 0x" not in info.value.message, info.value.message


def test_unknown_cache_policy_value(gateway):
    from shelfsight.protos import pb, pb_grpc

    with grpc.insecure_channel(target(gateway)) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ProductVisionStub(ch).Recognize(pb.RecognizeRequest(image=photo(61), question="q", cache_policy=7))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_policy" in info.value.details()


def test_deadline_shorter_than_the_answer(gateway):
    with ShelfsightClient(target(gateway)) as c, pytest.raises(errors.DeadlineExceeded):
        c.recognize(photo(62), "Describe everything.", temperature=0.0, max_new_tokens=1500, timeout=0.5)
    time.sleep(1.0)
    assert metric(gateway, "shelfsight_model_calls_in_flight") == 0  # the abandoned call was cancelled


def test_overload_is_refused_with_resource_exhausted(triton):
    with running_gateway(triton.grpc_url, max_in_flight=1) as gw:
        async def burst():
            async with AsyncShelfsightClient(target(gw)) as c:
                return await asyncio.gather(*[c.recognize(photo(70 + i), "What brand?", temperature=0.0,
                                                          max_new_tokens=60) for i in range(4)],
                                            return_exceptions=True)
        results = run(burst())
    refused = [r for r in results if isinstance(r, errors.ResourceExhausted)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert refused and served and len(refused) + len(served) == 4
    assert "retry later" in refused[0].message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_triton_down_then_back_with_another_model(tiny_checkpoint, tmp_path):
    """Down long enough for gRPC's default reconnect backoff to grow past 10 s (it did: 38 s to
    recover), then back with another checkpoint: the gateway answers within 2 s of Triton being ready,
    and its answers and cache keys carry the new model's id."""
    from shelfsight.export import tiny
    from shelfsight.serving.tritonserver import TritonServer, TritonSettings

    repo = make_repository(tiny_checkpoint, tmp_path / "repo")
    other = tmp_path / "other-ckpt"
    tiny.build(other, seed=1)
    other_repo = make_repository(other, tmp_path / "other-repo")
    ports = dict(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    first = TritonServer(TritonSettings(repo=repo, **ports)).start()
    try:
        with running_gateway(first.grpc_url, health_interval=1.0) as gw, ShelfsightClient(target(gw)) as c:
            before = c.recognize(photo(80), "What brand?", **GREEDY)
            first.stop()
            with pytest.raises(errors.Unavailable):
                c.recognize(photo(80), "What brand?", cache="skip", **GREEDY)
            assert c.health() == "NOT_SERVING"
            time.sleep(12)  # backoff without a cap: 1, 2.6, 5.2, 9.3, 15.9 s... between attempts
            second = TritonServer(TritonSettings(repo=other_repo, **ports)).start()
            try:
                back = time.monotonic()
                while c.health() != "SERVING" and time.monotonic() < back + 30:
                    time.sleep(0.05)
                after = c.recognize(photo(80), "What brand?", **GREEDY)
                assert time.monotonic() - back < 2.0
                assert after.completion_tokens == 12 and after.cache_status == "miss"  # not the old model's answer
                assert after.model_id != before.model_id and after.model_id.startswith("other-ckpt@")
            finally:
                second.stop()
    finally:
        first.stop()


# ---- service plumbing ----

def test_health_and_reflection(gateway):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with ShelfsightClient(target(gateway)) as c:
        assert c.health() == "SERVING" and c.health("shelfsight.v1.ProductVision") == "SERVING"
    with grpc.insecure_channel(target(gateway)) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"shelfsight.v1.ProductVision", "grpc.health.v1.Health"} <= services


def test_a_status_a_handler_sets_itself_is_counted_as_that_status(gateway):
    """Health's Check of an unknown service is NOT_FOUND for the caller, and in the metrics: counted
    as INTERNAL, every probe of a wrong name would have set off an error-rate alert."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    before = metric(gateway, "shelfsight_requests_total", face="grpc", method="Check", status="NOT_FOUND")
    with grpc.insecure_channel(target(gateway)) as ch:
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert metric(gateway, "shelfsight_requests_total", face="grpc", method="Check", status="NOT_FOUND") == before + 1
    assert metric(gateway, "shelfsight_requests_total", face="grpc", method="Check", status="INTERNAL") == 0


def test_graceful_shutdown_finishes_in_flight_requests(triton):
    with running_gateway(triton.grpc_url) as gw:
        async def scenario():
            async with AsyncShelfsightClient(target(gw)) as c:
                slow = asyncio.create_task(c.recognize(photo(90), "Describe it.", temperature=0.0,
                                                       max_new_tokens=120, cache="skip"))
                await asyncio.sleep(0.5)
                stopping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(gw.stop(grace=30), gw.loop))
                await asyncio.sleep(0.2)
                late = await asyncio.gather(c.recognize(photo(91), "q", **GREEDY), return_exceptions=True)
                done = await slow
                await stopping
                return done, late[0]
        done, late = run(scenario())
        gw.stop = _noop  # already stopped
    assert done.completion_tokens == 120
    assert isinstance(late, errors.Unavailable)


async def _noop(*_a, **_k):
    return None


# ---- shared cache ----

@pytest.fixture
def redis_url(tmp_path):
    server = shutil.which("redis-server")
    assert server, "redis-server is missing: `make env` installs it (scripts/system-deps)"
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def test_two_gateways_share_a_redis_cache(triton, redis_url):
    from shelfsight.gateway.settings import CacheSettings

    shared = CacheSettings(redis_url=redis_url)
    with running_gateway(triton.grpc_url, cache=shared) as a, running_gateway(triton.grpc_url, cache=shared) as b:
        with ShelfsightClient(target(a)) as ca, ShelfsightClient(target(b)) as cb:
            first = ca.recognize(photo(100), "What brand?", **GREEDY)
            assert first.cache_status == "miss"
            assert cb.recognize(photo(100), "What brand?", **GREEDY).cache_status == "exact"
            near = cb.recognize(reencode_resized(photo(100)), "What brand?", **GREEDY)
            assert near.cache_status == "perceptual" and near.text == first.text


# ---- several pictures and turns ----

def test_two_pictures_from_the_command_line_and_the_library(gateway, tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(photo(80))
    b.write_bytes(photo(81))
    cli = subprocess.run([sys.executable, "-m", "shelfsight", "ask", str(a), str(b), "Are these the same product?",
                          "--target", target(gateway), "--json", "--temperature", "0", "--max-new-tokens", "12",
                          "--cache", "skip"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    reply = json.loads(cli.stdout)
    with ShelfsightClient(target(gateway)) as c:
        same = c.recognize([a, b], "Are these the same product?", cache="skip", **GREEDY)
        swapped = c.recognize([b, a], "Are these the same product?", cache="skip", **GREEDY)
        one = c.recognize(a, "Are these the same product?", cache="skip", **GREEDY)
    assert reply["text"] == same.text and same.prompt_tokens > one.prompt_tokens  # both pictures in the prompt
    assert len({same.text, swapped.text, one.text}) > 1  # the answer depends on which pictures, in which order


def test_several_pictures_use_the_exact_cache_level_only(gateway):
    """The perceptual level compares one picture: with two, a re-encoded copy is a miss, never a guess."""
    pictures = [photo(82), photo(83)]
    copy = imagefiles.encode(Image.open(io.BytesIO(pictures[0])), "JPEG", quality=80)
    with ShelfsightClient(target(gateway)) as c:
        first = c.recognize(pictures, "Compare.", **GREEDY)
        exact = c.recognize(pictures, "Compare.", **GREEDY)
        before = metric(gateway, "shelfsight_cache_lookups_total", level="perceptual")
        other = c.recognize([copy, pictures[1]], "Compare.", **GREEDY)
    assert (first.cache_status, exact.cache_status, other.cache_status) == ("miss", "exact", "miss")
    assert metric(gateway, "shelfsight_cache_lookups_total", level="perceptual") == before


def test_a_conversation_over_grpc(gateway):
    from shelfsight.protos import pb, pb_grpc

    turns = [{"role": "system", "content": ["Be brief."]},
             {"role": "user", "content": [photo(84), "What is this?"]},
             {"role": "assistant", "content": ["A kettle."]},
             {"role": "user", "content": ["And its colour?"]}]
    with ShelfsightClient(target(gateway)) as c:
        r = c.recognize(None, None, messages=turns, cache="skip", **GREEDY)
        changed = c.recognize(None, None, messages=turns[:2] + [{"role": "assistant", "content": ["A jar."]}] + turns[3:],
                              cache="skip", **GREEDY)
        with pytest.raises(errors.InvalidArgument, match="the last turn must be the user's"):
            c.recognize(None, None, messages=turns[:3])
    with grpc.insecure_channel(target(gateway)) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ProductVisionStub(ch).Recognize(pb.RecognizeRequest(
                image=photo(84), messages=[pb.Message(role="user", content=[pb.Part(text="q")])]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "leave image, question and system_prompt empty" in info.value.details()
    assert r.completion_tokens == 12 and r.text != changed.text
