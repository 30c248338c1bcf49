"""Python client for shelfsight's ProductVision API, sync and asyncio.

    from shelfsight.client import ShelfsightClient
    with ShelfsightClient("127.0.0.1:50051") as c:
        r = c.recognize("photo.jpg", "What brand is this product?")
        print(r.text, r.cache_status)

Every failure raises one exception class per kind (shelfsight.errors: InvalidArgument,
ResourceExhausted, Unavailable, DeadlineExceeded, ...), all subclasses of ShelfsightError.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

import grpc

from shelfsight import errors, ports
from shelfsight.formats import ResponseFormat
from shelfsight.client.catalog import AsyncCatalogCalls, CatalogCalls
from shelfsight.params import FIELDS as PARAMETERS
from shelfsight.protos import pb, pb_grpc

CACHE_POLICIES = {"use": pb.CACHE_POLICY_USE, "skip": pb.CACHE_POLICY_SKIP, "refresh": pb.CACHE_POLICY_REFRESH}
CACHE_STATUS = {pb.CACHE_STATUS_MISS: "miss", pb.CACHE_STATUS_EXACT: "exact",
                pb.CACHE_STATUS_PERCEPTUAL: "perceptual", pb.CACHE_STATUS_COALESCED: "coalesced"}


@dataclass(frozen=True)
class Recognition:
    text: str
    model_id: str
    cache_status: str  # miss | exact | perceptual | coalesced
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    total_seconds: float
    upstream_seconds: float
    request_id: str

    @classmethod
    def from_message(cls, m, text: str | None = None) -> "Recognition":
        return cls(text=m.text if text is None else text, model_id=m.model_id,
                   cache_status=CACHE_STATUS.get(m.cache_status, "unspecified"),
                   prompt_tokens=m.usage.prompt_tokens, completion_tokens=m.usage.completion_tokens,
                   finish_reason=m.finish_reason, total_seconds=m.timings.total_seconds,
                   upstream_seconds=m.timings.upstream_seconds, request_id=m.request_id)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Chunk:
    text: str
    final: bool = False
    result: Recognition | None = None  # on the final chunk: the whole answer and its metadata


def _picture(image) -> bytes:
    return Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)


def format_message(fmt: ResponseFormat) -> pb.ResponseFormat:
    if fmt.kind == "json_object":
        return pb.ResponseFormat(json_object=True)
    if fmt.kind == "choice":
        return pb.ResponseFormat(choice=pb.Choices(values=list(fmt.spec)))
    return pb.ResponseFormat(**{fmt.kind: fmt.spec})


def build_request(image, question: str, *, system: str | None = None, cache: str = "use",
                  request_id: str | None = None, enhance: bool = False, response_format: ResponseFormat | None = None,
                  stop: list[str] | None = None, messages: list[dict] | None = None, **parameters):
    """`image`: one picture (bytes or a path), or a list of them (asked about together, in order, before
    `question`). `messages`: a whole conversation instead - [{"role": ..., "content": [str | picture, ...]}],
    a picture being bytes or a Path; then `image` and `question` are None."""
    if cache not in CACHE_POLICIES:
        raise errors.InvalidArgument(f"cache must be one of {', '.join(CACHE_POLICIES)}, got {cache!r}")
    unknown = set(parameters) - set(PARAMETERS)
    if unknown:
        raise errors.InvalidArgument(f"unknown generation parameter(s): {', '.join(sorted(unknown))}")
    gen = pb.GenerationParameters(**{k: v for k, v in parameters.items() if v is not None}, stop=stop or [])
    common = dict(parameters=gen, cache_policy=CACHE_POLICIES[cache], request_id=request_id or "", enhance=enhance)
    if response_format is not None:
        common["response_format"] = format_message(response_format)
    if isinstance(image, (list, tuple)):
        content = [pb.Part(image=_picture(p)) for p in image] + [pb.Part(text=question)]
        messages = ([{"role": "system", "content": [system]}] if system else []) + [{"role": "user", "content": content}]
        system = None
    if messages is not None:
        turns = [pb.Message(role=m["role"], content=[p if isinstance(p, pb.Part) else pb.Part(text=p)
                                                     if isinstance(p, str) else pb.Part(image=_picture(p))
                                                     for p in ([m["content"]] if isinstance(m["content"], str)
                                                               else m["content"])]) for m in messages]
        return pb.RecognizeRequest(messages=turns, **common)
    return pb.RecognizeRequest(image=_picture(image), question=question, system_prompt=system or "", **common)


class _Joiner:
    """Turns RecognizeChunk messages into Chunk objects, joining the text for the final one."""

    def __init__(self):
        self.parts: list[str] = []

    def __call__(self, m) -> Chunk:
        if m.final:
            return Chunk(m.text, True, Recognition.from_message(m, "".join(self.parts) + m.text))
        self.parts.append(m.text)
        return Chunk(m.text)


@dataclass(frozen=True)
class Connection:
    """How to reach a gateway: its address, TLS (the CA that signed its certificate; a client certificate
    and key for mutual TLS) and an API key (sent as `authorization: Bearer <key>`). A plain "HOST:PORT"
    string anywhere a target is taken means: plaintext, no key."""
    target: str = ports.GATEWAY_ADDRESS
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    api_key: str | None = None

    @classmethod
    def of(cls, target: "str | Connection") -> "Connection":
        return target if isinstance(target, Connection) else cls(target)

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def _credentials(self) -> grpc.ChannelCredentials:
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        if (self.tls_cert is None) != (self.tls_key is None):
            raise errors.InvalidArgument("--tls-cert and --tls-key go together")
        return grpc.ssl_channel_credentials(read(self.tls_ca), read(self.tls_key), read(self.tls_cert))

    def channel(self, aio: bool = False):
        options = [("grpc.max_send_message_length", 64 << 20)]
        module = grpc.aio if aio else grpc
        if self.tls:
            return module.secure_channel(self.target, self._credentials(), options=options)
        return module.insecure_channel(self.target, options=options)

    @property
    def metadata(self) -> tuple:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


class ShelfsightClient(CatalogCalls):
    def __init__(self, target: "str | Connection" = ports.GATEWAY_ADDRESS, timeout: float | None = None):
        self.connection = Connection.of(target)
        self.target, self.timeout = self.connection.target, timeout
        self._metadata = self.connection.metadata
        self._channel = self.connection.channel()
        self._stub = pb_grpc.ProductVisionStub(self._channel)

    def recognize(self, image, question: str, *, timeout: float | None = None, **kw) -> Recognition:
        try:
            reply = self._stub.Recognize(build_request(image, question, **kw), timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise errors.from_grpc(e) from None
        return Recognition.from_message(reply)

    def stream(self, image, question: str, *, timeout: float | None = None, **kw) -> Iterator[Chunk]:
        call = self._stub.RecognizeStream(build_request(image, question, **kw), timeout=timeout or self.timeout, metadata=self._metadata)
        join = _Joiner()
        try:
            for m in call:
                yield join(m)
        except grpc.RpcError as e:
            raise errors.from_grpc(e) from None
        finally:
            call.cancel()

    def health(self, service: str = "") -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            r = health_pb2_grpc.HealthStub(self._channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                 timeout=5, metadata=self._metadata)
        except grpc.RpcError as e:
            raise errors.from_grpc(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ShelfsightClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncShelfsightClient(AsyncCatalogCalls):
    def __init__(self, target: "str | Connection" = ports.GATEWAY_ADDRESS, timeout: float | None = None):
        self.connection = Connection.of(target)
        self.target, self.timeout = self.connection.target, timeout
        self._metadata = self.connection.metadata
        self._channel = self.connection.channel(aio=True)
        self._stub = pb_grpc.ProductVisionStub(self._channel)

    async def recognize(self, image, question: str, *, timeout: float | None = None, **kw) -> Recognition:
        try:
            reply = await self._stub.Recognize(build_request(image, question, **kw), timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise errors.from_grpc(e) from None
        return Recognition.from_message(reply)

    async def stream(self, image, question: str, *, timeout: float | None = None, **kw) -> AsyncIterator[Chunk]:
        call = self._stub.RecognizeStream(build_request(image, question, **kw), timeout=timeout or self.timeout, metadata=self._metadata)
        join = _Joiner()
        try:
            async for m in call:
                yield join(m)
        except grpc.RpcError as e:
            raise errors.from_grpc(e) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncShelfsightClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
