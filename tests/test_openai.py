"""The OpenAI-compatible HTTP face against the real stack (tritonserver + gateway on the tiny models),
driven by the official `openai` client and by raw HTTP: answers equal to the gRPC face's, OpenAI's
shapes (responses, SSE chunks, errors), several pictures and turns, structured answers, embeddings,
and every refusal with its status."""
from __future__ import annotations

import base64
import json

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from shelfsight.client import ShelfsightClient
from tests.conftest import running_gateway
from tests.test_gateway import metric, photo, target


def data_url(image: bytes, kind: str = "image/jpeg") -> str:
    return f"data:{kind};base64,{base64.b64encode(image).decode()}"


def picture(image: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


@pytest.fixture(scope="module")
def base(gateway) -> str:
    return f"http://127.0.0.1:{gateway.http_port}"


@pytest.fixture(scope="module")
def client(base):
    with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_models_and_health(client, base, gateway):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == gateway.upstream.model().model_id and any(i.startswith("tiny-embedding") for i in ids)
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}


def test_chat_with_one_picture_equals_the_grpc_answer(client, model, gateway):
    kw = dict(temperature=1.0, seed=21, max_new_tokens=16)
    with ShelfsightClient(target(gateway)) as c:
        grpc = c.recognize(photo(700), "What brand is this product?", cache="skip", **kw)
    r = client.chat.completions.create(
        model=model, max_tokens=16, temperature=1.0, seed=21, extra_body={"cache": "skip"},
        messages=[{"role": "user", "content": [picture(photo(700)), {"type": "text", "text": "What brand is this product?"}]}])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == grpc.text  # seeded: the same draw
    assert choice.finish_reason == grpc.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (grpc.prompt_tokens, grpc.completion_tokens)
    assert r.usage.total_tokens == grpc.prompt_tokens + grpc.completion_tokens


def test_streamed_two_pictures_equal_the_whole_answer(client, model):
    messages = [{"role": "user", "content": [picture(photo(701)), picture(photo(702)),
                                             {"type": "text", "text": "Are these the same product?"}]}]
    whole = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=20)
    chunks = list(client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)


def test_a_conversation_of_several_turns(client, model, gateway):
    messages = [{"role": "system", "content": "You recognise products."},
                {"role": "user", "content": [picture(photo(703)), {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A coffee grinder."},
                {"role": "user", "content": "Which brand?"}]
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)
    with ShelfsightClient(target(gateway)) as c:
        grpc = c.recognize(None, None, messages=[{"role": "system", "content": ["You recognise products."]},
                                                  {"role": "user", "content": [photo(703), "What is this?"]},
                                                  {"role": "assistant", "content": ["A coffee grinder."]},
                                                  {"role": "user", "content": ["Which brand?"]}],
                           temperature=0.0, max_new_tokens=12)
    assert r.choices[0].message.content == grpc.text
    assert grpc.cache_status == "exact"  # the two faces share one cache: the HTTP answer was stored


def test_response_format(client, model):
    schema = {"type": "object", "properties": {"brand": {"type": "string", "pattern": "^[a-z]{0,10}$"},
                                               "count": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["brand", "count"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=model, temperature=1.0, seed=3, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}},
        messages=[{"role": "user", "content": [picture(photo(704)), {"type": "text", "text": "Brand and count?"}]}])
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    obj = client.chat.completions.create(model=model, temperature=0, max_tokens=60,
                                         response_format={"type": "json_object"},
                                         messages=[{"role": "user", "content": "Describe a mug as JSON."}])
    assert obj.choices[0].finish_reason != "stop" or isinstance(json.loads(obj.choices[0].message.content), dict)


def test_stop_sequences(client, model):
    messages = [{"role": "user", "content": [picture(photo(705)), {"type": "text", "text": "Read the label."}]}]
    whole = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=30)
    text = whole.choices[0].message.content
    cut = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=30,
                                         stop=text[5:8])
    assert cut.choices[0].message.content == text[:text.find(text[5:8])]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra, status, message", [
    (dict(n=2), 400, "n must be 1"),
    (dict(logprobs=True), 400, "logprobs is not supported"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400, "tools are not supported"),
    (dict(presence_penalty=0.5), 400, "presence_penalty is not supported (use repetition_penalty)"),
    (dict(model="gpt-4o"), 404, "the model 'gpt-4o' does not exist here"),
    (dict(max_tokens=0), 400, "max_tokens must be between 1 and 2048, got 0"),
    (dict(temperature=7), 400, "temperature must be between 0 and 2"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]}]),
     400, "remote URLs are not fetched by this gateway (it was started without --allow-image-urls)"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(b"%PDF-1.4", "application/pdf")}}]}]),
     400, "a data URL of type 'application/pdf' is not a picture"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(b"not an image")}}, {"type": "text", "text": "q"}]}]),
     400, "image is not a supported format"),
    (dict(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]),
     400, "'input_audio' is not supported"),
    (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), 400, "'tool' is not supported"),
])
def test_refusals_name_the_field_with_the_right_status(client, model, extra, status, message):
    kw = dict(model=model, max_tokens=4, messages=[{"role": "user", "content": "hello"}]) | extra
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**kw)
    assert info.value.status_code == status
    body = info.value.body
    assert message in body["message"], body
    assert set(body) >= {"message", "type", "param", "code"}


def test_raw_http_sse_framing_and_bad_bodies(base, model):
    body = {"model": model, "max_tokens": 6, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "hello"}]}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes())
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    assert all(e.startswith(b"data: ") for e in events[:-1])
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    bad = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    wrong_type = httpx.post(f"{base}/v1/chat/completions", content=b"x=1",
                            headers={"content-type": "application/x-www-form-urlencoded"})
    assert wrong_type.status_code == 415
    missing = httpx.post(f"{base}/v1/chat/completions", json={"model": model})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    huge = httpx.post(f"{base}/v1/chat/completions", content=b" " * (65 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413
    nothing = httpx.get(f"{base}/v1/nothing")
    assert nothing.status_code == 404 and nothing.json()["error"]["type"] == "not_found_error"


def test_embeddings(client, gateway):
    models = [m.id for m in client.models.list().data]
    name = next(m for m in models if m.startswith("tiny-embedding"))
    r = client.embeddings.create(model=name, input=["blue mug", "red kettle"])
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 0
    vectors = [np.array(d.embedding) for d in r.data]
    assert all(abs(np.linalg.norm(v) - 1) < 1e-4 for v in vectors) and vectors[0].shape == (128,)
    small = client.embeddings.create(model=name, input="blue mug", dimensions=32)
    assert len(small.data[0].embedding) == 32
    packed = httpx.post(f"http://127.0.0.1:{gateway.http_port}/v1/embeddings",
                        json={"model": name, "input": "blue mug", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype=np.float32)
    assert np.allclose(decoded, vectors[0], atol=1e-5)
    image = httpx.post(f"http://127.0.0.1:{gateway.http_port}/v1/embeddings", json={
        "model": name, "messages": [{"role": "user", "content": [picture(photo(706)), {"type": "text", "text": "mug"}]}]})
    assert image.status_code == 200 and len(image.json()["data"][0]["embedding"]) == 128


def test_the_http_face_is_counted_beside_the_grpc_face(client, model, gateway):
    client.chat.completions.create(model=model, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert metric(gateway, "shelfsight_requests_total", face="http", method="/v1/chat/completions", status="200") >= 1
    assert metric(gateway, "shelfsight_requests_total", face="grpc", method="Recognize") >= 1
    assert metric(gateway, "shelfsight_request_duration_seconds_count", face="http") >= 1


def test_unavailable_is_503(triton):
    with running_gateway("127.0.0.1:1", wait_ready=False, http_port=0) as gw:
        r = httpx.post(f"http://127.0.0.1:{gw.http_port}/v1/chat/completions",
                       json={"model": "x", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.headers.get("retry-after") == "1"
        assert "no model server is ready" in r.json()["error"]["message"]
        assert httpx.get(f"http://127.0.0.1:{gw.http_port}/health").status_code == 503


def chat_body(model, **extra) -> dict:
    return {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]} | extra


@pytest.mark.parametrize("extra, param, message", [
    (dict(max_tokens=0), "max_tokens", "max_tokens must be between 1 and 2048, got 0"),
    (dict(max_tokens=None, max_completion_tokens=0), "max_completion_tokens", "max_completion_tokens must be between"),
    (dict(cache="bogus"), "cache", "cache 'bogus' is not one of use, skip, refresh"),
    (dict(top_p=0), "top_p", "top_p"),
    (dict(max_tokens=True), "max_tokens", "max_tokens: Input should be a valid integer"),
    (dict(max_tokens="5"), "max_tokens", "max_tokens: Input should be a valid integer"),
    (dict(stream="yes"), "stream", "stream: Input should be a valid boolean"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": None}]}]),
     "messages[0].content[0].text", "messages[0].content[0].text: Input should be a valid string"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,AA"}]}]),
     "messages[0].content[0].image_url", "messages[0].content[0].image_url: Input should be an object"),
    (dict(messages=[{"role": "user", "content": [{"text": "hi"}]}]),
     "messages[0].content[0]", "a content part needs a type: text or image_url"),
    (dict(messages=[{"role": "user", "content": [{"type": ["text"], "text": "hi"}]}]),
     "messages[0].content[0].type", "messages[0].content[0].type: Input should be a valid string"),
    (dict(cache="USE"), "cache", "cache 'USE' is not one of use, skip, refresh"),
    (dict(request_id="\u65e5\u672c"), "request_id", "request_id must be 1-128 characters"),
    (dict(request_id="\u65e5\u672c", stream=True), "request_id", "request_id must be 1-128 characters"),
])
def test_refusals_speak_this_apis_field_names(base, model, extra, param, message):
    """The shared checks name the core's fields (max_new_tokens, cache_policy): the HTTP face says the
    ones the client sent, in `message` and `param`, and a malformed part is that part's error."""
    r = httpx.post(f"{base}/v1/chat/completions", json=chat_body(model, **extra), timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and message in error["message"] and error["param"] == param, error
    assert "max_new_tokens" not in error["message"] and "cache_policy" not in error["message"]


def test_a_stream_the_model_side_refuses_is_a_400_and_counted_so(base, model, gateway):
    """A prompt too long for the model is found by preprocess, after the request was accepted: the
    stream waits for its first text before its 200, so the refusal keeps its status (and its count)."""
    before = metric(gateway, "shelfsight_requests_total", face="http", method="/v1/chat/completions", status="400")
    long = chat_body(model, stream=True, messages=[{"role": "user", "content": "\U0001F9EA" * 4000}])
    del long["max_tokens"]
    r = httpx.post(f"{base}/v1/chat/completions", json=long, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages", error
    assert "max_tokens (the default)" in error["message"] and "the model length is" in error["message"]
    assert metric(gateway, "shelfsight_requests_total", face="http", method="/v1/chat/completions",
                  status="400") == before + 1


def test_a_stream_the_client_leaves_is_counted_as_499(base, model, gateway):
    import time

    label = dict(face="http", method="/v1/chat/completions", status="499")
    before = metric(gateway, "shelfsight_requests_total", **label)
    body = chat_body(model, stream=True, max_tokens=300, temperature=1.0, cache="skip")
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_bytes())  # the first events, then away
    deadline = time.time() + 20
    while metric(gateway, "shelfsight_requests_total", **label) == before and time.time() < deadline:
        time.sleep(0.1)
    assert metric(gateway, "shelfsight_requests_total", **label) == before + 1


def test_models_retrieve_head_health_and_a_proxys_request_id(client, base, model):
    assert client.models.retrieve(model).id == model
    assert client.models.retrieve(model.split("@")[0]).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert httpx.head(f"{base}/health").status_code == 200
    wrong = httpx.get(f"{base}/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"
    # a header a proxy added in another form is left out (a new id is made), never a 400
    r = httpx.post(f"{base}/v1/chat/completions", json=chat_body(model), headers={"x-request-id": "a b " * 40 + "z"})
    assert r.status_code == 200 and r.headers["x-request-id"] and " " not in r.headers["x-request-id"]
    kept = httpx.post(f"{base}/v1/chat/completions", json=chat_body(model), headers={"x-request-id": "trace-7"})
    assert kept.headers["x-request-id"] == "trace-7"
