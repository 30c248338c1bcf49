"""The HTTP face: OpenAI's API over the gateway's cores (docs/openai.md). It only translates: an OpenAI
request becomes the answering core's `Ask` (gateway/validate.py) or the search core's embedding call,
and what comes back becomes OpenAI's JSON or server-sent events. Validation, cache, coalescing,
replicas, limits and metrics are the cores', shared with the gRPC face.

    POST /v1/chat/completions   text, pictures (data: URLs; http(s) with --allow-image-urls), several
                                turns; streamed (SSE) or whole; response_format; stop; vendor extras
    POST /v1/embeddings         when an embedding model is served: texts, or one turn of image and text parts
    GET  /v1/models, GET /v1/models/{id}, GET or HEAD /health

No request can hold the event loop: bodies are bounded (413 beyond MAX_BODY), and a large body's JSON,
its pydantic model and its base64 pictures are parsed on a worker thread. Errors are OpenAI's error
JSON with the status the failure deserves, never a stack trace.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import re
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from shelfsight import formats
from shelfsight.conversation import ASSISTANT, PICTURE, SYSTEM, USER, Conversation, Turn
from shelfsight.errors import InvalidArgument, NotFound, ShelfsightError
from shelfsight.gateway import openai_protocol as oa
from shelfsight.gateway.answers import CALL_LOG, Answers
from shelfsight.gateway.auth import KeyRing
from shelfsight.gateway.fetch import Fetcher
from shelfsight.gateway.metrics import GatewayMetrics
from shelfsight.gateway.search import SearchService
from shelfsight.gateway.validate import REQUEST_ID, Ask
from shelfsight.serving.pipeline import Item

log = logging.getLogger("shelfsight.gateway")
access = logging.getLogger("shelfsight.gateway.access")
MAX_BODY = 64 << 20  # as the gRPC face's largest message
PARSE_ON_LOOP = 256 << 10  # bytes: a larger body is parsed on a worker thread
STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
          "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
          "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "INTERNAL": 500}
ROLES = {"system": SYSTEM, "developer": SYSTEM, "user": USER, "assistant": ASSISTANT}
ROUTES = ("/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health")  # metric labels: few, fixed
ONE_MODEL = "/v1/models/{id}"  # (the label of GET /v1/models/NAME)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def refusal(field: str, why: str) -> HTTPError:
    return HTTPError(400, f"{field} {why}", param=field)


def error_response(e: Exception) -> JSONResponse:
    if isinstance(e, HTTPError):
        return JSONResponse(oa.error(e.status, e.message, e.param, e.code), status_code=e.status)
    if isinstance(e, ShelfsightError):
        status = STATUS.get(e.code, 500)
        retry = getattr(e, "retry_after", None)
        headers = {"Retry-After": str(max(1, math.ceil(retry or 1)))} if status in (429, 503) else None
        if status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(oa.error(status, e.message, code=e.code.lower()), status_code=status, headers=headers)
    log.error("unexpected error in the HTTP face", exc_info=e)
    return JSONResponse(oa.error(500, f"internal error: {type(e).__name__}"), status_code=500)


async def parse(request: Request, model):
    """The body as `model`: 413 past MAX_BODY, 400 naming the field that is wrong; large bodies parsed
    off the event loop."""
    if "json" not in request.headers.get("content-type", ""):
        raise HTTPError(415, "the body must be JSON (Content-Type: application/json)")
    size = int(request.headers.get("content-length") or 0)
    if size > MAX_BODY:
        raise HTTPError(413, f"the body is {size} bytes; the limit is {MAX_BODY}")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY:
            raise HTTPError(413, f"the body is larger than {MAX_BODY} bytes")

    def load():
        try:  # pydantic parses and validates in one pass (its JSON parser is Rust): no dict in between
            return model.model_validate_json(bytes(body))
        except ValidationError as e:
            found = e.errors()
            if found[0]["type"] == "json_invalid":
                raise HTTPError(400, f"the body is not valid JSON: {found[0]['msg']}") from None
            # Of a union's branches (content: a string or a list of parts) the one that got furthest says
            # what is wrong: "content[0].text", not "content.str".
            deepest = max(found, key=lambda err: len(_where(err["loc"])))
            where = _where(deepest["loc"]) or "body"
            raise HTTPError(400, f"{where}: {deepest['msg']}", param=where) from None
    return await asyncio.to_thread(load) if len(body) > PARSE_ON_LOOP else load()


def _where(loc) -> str:
    """pydantic's error location as the field path a client wrote (messages[0].content[1].text), without
    the names pydantic gives union branches (str, list[...], the part tags)."""
    out = ""
    for step in loc:
        if isinstance(step, int):
            out += f"[{step}]"
        elif step not in oa.PART_TAGS and step not in ("str", "int", "float") and "[" not in step:
            out += f".{step}" if out else step
    return out


def refuse_unsupported(r: oa.ChatCompletionRequest) -> None:
    """Fields whose meaning shelfsight cannot honour: a 400 naming them, never a silently different answer."""
    if r.n not in (None, 1):
        raise refusal("n", "must be 1: one choice per request (send several requests, with seeds, for more)")
    if r.logprobs or r.top_logprobs is not None:
        raise refusal("logprobs", "is not supported")
    if r.tools or r.functions or (r.tool_choice not in (None, "none")) or r.function_call not in (None, "none"):
        raise refusal("tools", "are not supported: shelfsight answers questions about products, it calls no tools")
    if r.logit_bias:
        raise refusal("logit_bias", "is not supported (use response_format to constrain the answer)")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(r, name):
            raise refusal(name, "is not supported (use repetition_penalty)")
    if r.modalities not in (None, ["text"]) or r.audio is not None:
        raise refusal("modalities", "other than text are not supported")
    if r.prediction is not None:
        raise refusal("prediction", "is not supported")


async def turn_parts(fetcher: Fetcher, i: int, content) -> tuple[list, list[bytes]]:
    """A message's content -> (parts: texts and PICTURE, pictures)."""
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    parts, pictures = [], []
    for j, part in enumerate(content):
        if isinstance(part, oa.TextPart):
            parts.append(part.text)
        elif isinstance(part, oa.ImagePart):
            try:
                pictures.append(await fetcher.picture(part.image_url.url))
            except InvalidArgument as e:
                raise refusal(f"messages[{i}].content[{j}]", e.message.removeprefix("image_url: ")) from None
            parts.append(PICTURE)
        else:
            raise refusal(f"messages[{i}].content[{j}].type", f"{part.type!r} is not supported (text or image_url)")
    return parts, pictures


async def ask_of(r: oa.ChatCompletionRequest, fetcher: Fetcher, request_id: str) -> Ask:
    refuse_unsupported(r)
    turns, pictures = [], []
    for i, m in enumerate(r.messages):
        role = ROLES.get(m.role)
        if role is None:
            raise refusal(f"messages[{i}].role", f"{m.role!r} is not supported (system, developer, user, assistant)")
        if m.tool_calls:
            raise refusal(f"messages[{i}].tool_calls", "are not supported")
        parts, pics = await turn_parts(fetcher, i, m.content)
        if role == SYSTEM and turns and turns[-1].role == SYSTEM:  # consecutive system turns: one
            turns[-1] = Turn(SYSTEM, (turns[-1].text + "\n\n" + "".join(p for p in parts if p is not PICTURE),))
            continue
        turns.append(Turn(role, tuple(parts)))
        pictures += pics
    gen = {"max_new_tokens": r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens,
           "temperature": r.temperature, "top_p": r.top_p, "seed": r.seed, "top_k": r.top_k,
           "repetition_penalty": r.repetition_penalty}
    stop = (r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ())
    return Ask(tuple(pictures), Conversation(tuple(turns)), params={k: v for k, v in gen.items() if v is not None},
               policy=r.cache or "use", enhance=bool(r.enhance), request_id=request_id, stop=stop,
               response_format=response_format(r.response_format))


def response_format(f: oa.ResponseFormat | None):
    if f is None or f.type == "text":
        return None
    if f.type == "json_object":
        return formats.parse("json_object")
    if f.type == "json_schema":
        if not f.json_schema or "schema" not in f.json_schema:
            raise refusal("response_format.json_schema", "needs a schema: {\"name\": ..., \"schema\": {...}}")
        return formats.parse("json_schema", f.json_schema["schema"])
    raise refusal("response_format.type", f"{f.type!r} is not one of text, json_object, json_schema")


def vendor(o) -> dict:
    return {"cache_status": o.cache_status, "request_id": o.request_id, "model_id": o.model_id,
            "timings": {"total_seconds": round(o.total_seconds, 6), "upstream_seconds": round(o.upstream_seconds, 6)}}


def build_app(answers: Answers, search: SearchService, metrics: GatewayMetrics, fetcher: Fetcher,
              timeout: float, keys: KeyRing):
    app = FastAPI(title="shelfsight", docs_url=None, redoc_url=None, openapi_url=None)


    @app.exception_handler(HTTPError)
    async def http_error(request, e: HTTPError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def routing(request, e: StarletteHTTPException):  # no such route, method not allowed
        return JSONResponse(oa.error(e.status_code, f"{request.method} {request.url.path}: {e.detail}"),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):  # a failure of ours, in OpenAI's shape: never a stack trace
        return error_response(e)

    @app.exception_handler(ShelfsightError)
    async def typed_error(request, e: ShelfsightError):
        return error_response(e)

    def served_model(name: str) -> str:
        model_id = answers.upstream.model().model_id
        if name not in (model_id, model_id.split("@")[0]):
            raise NotFound(f"the model {name!r} does not exist here; this server serves {model_id!r}")
        return model_id

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        r = await parse(request, oa.ChatCompletionRequest)
        model = served_model(r.model)
        try:
            c = answers.check(await ask_of(r, fetcher, r.request_id or header_request_id(request)))
            cid, created = oa.completion_id(), oa.now()
            if r.stream:
                return await opened_stream(request, c, cid, created, model, r, t0)
            async with answers.answer(c, None, t0) as a:  # HTTP carries no deadline: the gateway's cap bounds the call
                text = await until_disconnected(request, a.text())
        except InvalidArgument as e:
            raise in_openai_terms(e, r) from None
        o = a.outcome
        body = oa.completion(cid, created, model, text, o.finish_reason, o.prompt_tokens, o.completion_tokens, vendor(o))
        return JSONResponse(body, headers={"x-shelfsight-cache": o.cache_status, "x-request-id": o.request_id,
                                           "x-shelfsight-total-ms": f"{o.total_seconds * 1000:.1f}"})

    async def opened_stream(request: Request, c, cid: str, created: int, model: str, r: oa.ChatCompletionRequest,
                            t0: float):
        """The stream's 200 goes out with its first piece of text: a refusal that only the model's side
        can make (a prompt longer than the model takes) is still a 400, not an error event after a 200."""
        stack = contextlib.AsyncExitStack()
        try:
            a = await stack.enter_async_context(answers.answer(c, None, t0))
            pieces = a.pieces()
            first = await until_disconnected(request, anext(pieces, None))
            return ClosingStream(stack, stream(a, pieces, first, cid, created, model, r),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "x-request-id": c.request_id})
        except BaseException:
            await stack.aclose()
            raise

    async def stream(a, pieces, first: str | None, cid: str, created: int, model: str, r: oa.ChatCompletionRequest):
        def event(doc: dict) -> bytes:
            return b"data: " + json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
        log = CALL_LOG.get({})
        try:
            yield event(oa.chunk(cid, created, model, {"role": "assistant", "content": ""}))
            if first is not None:  # (None: the answer ended before any text)
                yield event(oa.chunk(cid, created, model, {"content": first}))
                async for piece in pieces:
                    yield event(oa.chunk(cid, created, model, {"content": piece}))
            o = a.outcome
            yield event(oa.chunk(cid, created, model, {}, o.finish_reason))
            if r.stream_options and r.stream_options.include_usage:
                yield event(oa.usage_chunk(cid, created, model, o.prompt_tokens, o.completion_tokens, vendor(o)))
        except ShelfsightError as e:  # after the 200: the error as one last event, as OpenAI's servers do
            log["http_status"] = STATUS.get(e.code, 500)  # counted with the status it deserved
            yield event(oa.error(STATUS.get(e.code, 500), e.message, code=e.code.lower()))
        except (asyncio.CancelledError, GeneratorExit):
            log.setdefault("http_status", 499)  # the client left mid-stream
            raise
        log["stream_done"] = True
        yield b"data: [DONE]\n\n"

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        r = await parse(request, oa.EmbeddingRequest)
        if r.encoding_format not in ("float", "base64"):
            raise refusal("encoding_format", "must be float or base64")
        if (r.input is None) == (r.messages is None):
            raise refusal("input", "or messages (one user turn of text and image_url parts) is required, not both")
        if r.messages is not None:
            if len(r.messages) != 1 or r.messages[0].role != "user":
                raise refusal("messages", "must be one user turn")
            parts, pictures = await turn_parts(fetcher, 0, r.messages[0].content)
            items = [Item("".join(p for p in parts if p is not PICTURE), tuple(pictures))]
        else:
            texts = [r.input] if isinstance(r.input, str) else list(r.input)
            if not texts or len(texts) > 256:
                raise refusal("input", "must hold 1-256 texts")
            items = [Item(t) for t in texts]
        model_id, vectors = await search.embed(items, r.instruction or "", r.dimensions or 0, timeout)
        if r.model not in (model_id, model_id.split("@")[0]):
            raise NotFound(f"the model {r.model!r} does not exist here; embeddings come from {model_id!r}")
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(e.vector.astype(np.float32).tobytes()).decode()
                 if r.encoding_format == "base64" else e.vector.tolist()} for i, e in enumerate(vectors)]
        tokens = sum(e.prompt_tokens for e in vectors)
        return {"object": "list", "data": data, "model": model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.get("/v1/models")
    async def models():
        info = answers.upstream.model()
        found = [info.model_id] + [m["model_id"] for m in _retrieval(answers)]
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "shelfsight"}
                                           for m in found]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        """What the openai client's models.retrieve asks; a model's short name (before "@") finds it too."""
        for m in (await models())["data"]:
            if name in (m["id"], m["id"].split("@")[0]):
                return m
        raise NotFound(f"the model {name!r} does not exist here; GET /v1/models lists those served")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if answers.upstream.ready:
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable"}, status_code=503)

    return Observed(app, metrics, keys)


class Observed:
    """Who may call (gateway/auth.py: the `Authorization: Bearer` header OpenAI clients send), metrics
    and the access log line for every HTTP request, as plain ASGI: Starlette's decorator middleware
    (BaseHTTPMiddleware) runs each request through a task group and memory streams, which cost about a
    millisecond a request here. /health is open to anyone."""

    def __init__(self, app, metrics: GatewayMetrics, keys: KeyRing):
        self.app, self.metrics, self.keys = app, metrics, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        CALL_LOG.set({})
        t0 = time.perf_counter()
        path = scope["path"]
        route = path if path in ROUTES else ONE_MODEL if path.startswith("/v1/models/") else "other"
        status = [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            try:
                admitted = contextlib.nullcontext() if route == "/health" else self.keys.admit(authorization, route)
                with admitted as client:
                    if client:
                        CALL_LOG.get({})["client"] = client
                    await self.app(scope, receive, sending)
            except ShelfsightError as e:  # refused at the door: 401, 403, 429
                await error_response(e)(scope, receive, sending)
        finally:
            elapsed = time.perf_counter() - t0
            log = CALL_LOG.get({})
            final = log.pop("http_status", status[0])  # a stream's: what its end deserved, not the 200 it began with
            self.metrics.requests.labels("http", route, str(final), log.get("client", "")).inc()
            self.metrics.request_seconds.labels("http", route).observe(elapsed)
            if route != "/health":
                access.info(json.dumps({"event": "http", "method": scope["method"], "path": route,
                                        "status": final, "seconds": round(elapsed, 4), **log},
                                       ensure_ascii=False))


class ClosingStream(StreamingResponse):
    """A stream that lets go of its answer (the model call it follows, the in-flight count) however the
    response ends: also when the client left before the body began, and the body was never iterated."""

    def __init__(self, stack: contextlib.AsyncExitStack, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stack = stack

    async def __call__(self, scope, receive, send):
        log = CALL_LOG.get({})
        try:
            await super().__call__(scope, receive, send)
        except (OSError, ClientDisconnect, asyncio.CancelledError):
            log.setdefault("http_status", 499)  # the client went away while it was sent
            raise
        except Exception:
            log.setdefault("http_status", 500)  # ours: counted where error alerts look
            raise
        finally:
            try:
                # A client that leaves while a send waits can end the response without closing the body
                # (Starlette's task group takes the cancellation): close it now, so that it ends here.
                await self.body_iterator.aclose()
                if not log.pop("stream_done", False):
                    log.setdefault("http_status", 499)
            finally:
                await self.stack.aclose()


RENAMED = {"max_new_tokens": "max_tokens", "cache_policy": "cache"}  # the core's names -> this API's
PARAM_OF = (("picture", "messages"), ("image", "messages"), ("the prompt", "messages"),
            ("response format", "response_format"), ("schema", "response_format"), ("regex", "response_format"),
            ("stop", "stop"))  # (a message's words -> the field it is about, where it names none of them)


def in_openai_terms(e: InvalidArgument, r: oa.ChatCompletionRequest) -> HTTPError:
    """A refusal of the shared checks (gateway/validate.py, the model's side) named in this API's fields:
    "max_tokens must be between 1 and 2048", param "max_tokens"; a default the client never sent is
    said to be one."""
    message = e.message
    tokens = "max_completion_tokens" if r.max_completion_tokens is not None else "max_tokens"
    if r.max_tokens is None and r.max_completion_tokens is None:
        tokens += " (the default)"
    message = re.sub(r"\bmax_new_tokens\b", tokens, message)
    message = re.sub(r"\bcache_policy (\S+) is not one of .*", lambda m: f"cache {r.cache!r} is not one of "
                     "use, skip, refresh", message)
    head = re.match(r"[a-z_]+(\[\d+\])?", message)
    field = head[0].split("[")[0] if head else ""
    if field in oa.ChatCompletionRequest.model_fields or field in RENAMED.values():
        param = head[0] if field == "messages" else field
    else:
        param = next((p for cue, p in PARAM_OF if cue in message.lower()), None)
    return HTTPError(400, message, param=param, code="invalid_argument")


def header_request_id(request: Request) -> str:
    """x-request-id when it is a valid id; a proxy's header in another form is left out, never a 400
    (the body's request_id is checked strictly: the client chose it)."""
    given = request.headers.get("x-request-id", "")
    return given if REQUEST_ID.fullmatch(given) else ""


def _retrieval(answers: Answers) -> list[dict]:
    found = {}
    for r in answers.upstream.replicas.values():
        for info in r.retrieval.values():
            found[info["model_id"]] = info
    return list(found.values())


async def until_disconnected(request: Request, work):
    """`work`, unless the client goes away first (then it is cancelled: its model call too, if nobody
    else follows it)."""
    task = asyncio.ensure_future(work)

    async def gone():
        while True:
            if (await request.receive())["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the request itself cancelled (a shutdown past its grace): the work goes too
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise HTTPError(499, "the client closed the connection")
    return task.result()
