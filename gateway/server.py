"""The gateway process: gRPC server (ProductVision + health + reflection), metrics endpoint, the pool
of Triton replicas it watches, and graceful shutdown.

Cross-cutting work lives in one interceptor: per-RPC metrics (go-grpc-prometheus names), the mapping
of typed errors to gRPC statuses, and one structured JSON log line per call with its request id.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shelfsight.errors import Internal, InvalidArgument, ShelfsightError
from shelfsight.gateway.cache import ResultCache
from shelfsight.gateway.malformed import Malformed, lenient
from shelfsight.gateway.metrics import GatewayMetrics
from shelfsight.gateway.replicas import Replicas, parse_targets
from shelfsight.gateway.resilient import GuardedStore, open_store
from shelfsight.gateway.answers import CALL_LOG, Answers
from shelfsight.gateway.auth import KeyRing
from shelfsight.gateway.tls import CertFiles, TLSSettings
from shelfsight.gateway.vision_grpc import ProductVisionServicer
from shelfsight.gateway.settings import GatewaySettings
from shelfsight.gateway.tasks import Background
from shelfsight.gateway.catalog_grpc import CatalogServicer
from shelfsight.gateway.search import SearchService
from shelfsight.protos import CATALOG, SERVICE, SERVICES, pb, pb_grpc

log = logging.getLogger("shelfsight.gateway")
access = logging.getLogger("shelfsight.gateway.access")
# Health of the result cache's store, apart from the service's: NOT_SERVING while a shared Redis is down.
# The gateway still answers then (from the model), so "" and SERVICE must not follow it: a readiness
# probe on them would take every gateway out of service when Redis dies.
CACHE_HEALTH = "shelfsight.cache"


def _final_code(context, exc: BaseException | None) -> str:
    if exc is None:
        return "OK"
    if isinstance(exc, ShelfsightError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    if isinstance(exc, grpc.aio.AbortError):  # a handler (health's Check of an unknown service) set its own
        code = context.code()
        return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return "INTERNAL"


def _refuse_malformed(request) -> None:
    if isinstance(request, Malformed):
        raise InvalidArgument(request.message)


def _authorization(context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Who may call (gateway/auth.py: API keys, rights, per-client limits), metrics, error mapping and
    the access log for every RPC. Health and reflection are open to anyone."""

    def __init__(self, metrics: GatewayMetrics, keys: KeyRing):
        self.m, self.keys = metrics, keys

    def _admit(self, context, labels):
        if labels[1] not in SERVICES:
            return contextlib.nullcontext()
        return self.keys.admit(_authorization(context), labels[2])

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        service, _, method = details.method.strip("/").rpartition("/")
        deserialize = handler.request_deserializer
        if service in SERVICES:  # our own messages: a body that does not parse is INVALID_ARGUMENT
            deserialize = lenient(deserialize, pb.DESCRIPTOR.services_by_name[SERVICES[service]]
                                  .methods_by_name[method].input_type)
        if handler.unary_unary:
            labels = ("unary", service, method)
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, labels),
                                                       deserialize, handler.response_serializer)
        if handler.unary_stream:
            labels = ("server_stream", service, method)
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream, labels),
                                                        deserialize, handler.response_serializer)
        if handler.stream_stream:
            labels = ("bidi_stream", service, method)
            return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream, labels, refuse=False),
                                                         deserialize, handler.response_serializer)
        return handler

    def _begin(self, labels):
        self.m.started.labels(*labels).inc()
        CALL_LOG.set({})
        return time.perf_counter()

    async def _end(self, context, labels, t0, exc):
        code = _final_code(context, exc)
        elapsed = time.perf_counter() - t0
        self.m.handled.labels(*labels, code).inc()
        self.m.handling.labels(*labels).observe(elapsed)
        self.m.requests.labels("grpc", labels[2], code, CALL_LOG.get({}).get("client", "")).inc()
        self.m.request_seconds.labels("grpc", labels[2]).observe(elapsed)
        if labels[1] in SERVICES:
            entry = {"event": "rpc", "method": labels[2], "code": code, "seconds": round(elapsed, 4),
                     **CALL_LOG.get({})}
            if isinstance(exc, ShelfsightError):
                entry["error"] = exc.message
            access.info(json.dumps(entry, ensure_ascii=False))
        if isinstance(exc, ShelfsightError):
            retry = getattr(exc, "retry_after", None)  # gRPC's retry pushback: when trying again may work
            trailer = (("grpc-retry-pushback-ms", str(max(1, int(retry * 1000)))),) if retry else ()
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message, trailing_metadata=trailer)
        if exc is not None and not isinstance(exc, (asyncio.CancelledError, grpc.aio.AbortError)):
            log.error("unexpected error in %s", labels[2], exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    def _unary(self, behaviour, labels):
        async def call(request, context):
            t0 = self._begin(labels)
            try:
                with self._admit(context, labels) as client:
                    if client:
                        CALL_LOG.get({})["client"] = client
                    _refuse_malformed(request)
                    reply = await behaviour(request, context)
            except BaseException as e:  # noqa: BLE001 - classified, counted and re-raised as a status
                await self._end(context, labels, t0, e)
                raise
            await self._end(context, labels, t0, None)
            return reply
        return call

    def _stream(self, behaviour, labels, refuse: bool = True):
        """A server stream, or (refuse=False) a bidi stream, whose request is the client's message iterator:
        a malformed message in it is the servicer's to report, per message."""
        async def call(request, context):
            t0 = self._begin(labels)
            try:
                with self._admit(context, labels) as client:
                    if client:
                        CALL_LOG.get({})["client"] = client
                    if refuse:
                        _refuse_malformed(request)
                    async for item in behaviour(request, context):
                        self.m.msg_sent.labels(*labels).inc()
                        yield item
            except BaseException as e:  # noqa: BLE001
                await self._end(context, labels, t0, e)
                raise
            await self._end(context, labels, t0, None)
        return call


def return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system. By default it raises its mmap threshold
    to the size of each large block freed (up to 32 MB), so decoded pictures were later allocated in
    heaps that never shrink, one per decoding thread: the gateway's RSS grew from 88 MB to 561 MB over
    a fuzz run and stayed there. A fixed threshold keeps blocks of >= 1 MiB in mmap (freed = returned),
    and two arenas stop every worker thread from keeping a heap of its own."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    libc.mallopt(M_ARENA_MAX, 2)


class Gateway:
    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.health: health.aio.HealthServicer | None = None  # made in start(), inside its event loop
        self._tasks = Background()  # health updates started from the replicas' (sync) change callback
        self._stopping = False
        self.upstream = Replicas(parse_targets(settings.triton_url) if not settings.triton_dns else (),
                                 settings.health_interval, self.metrics, self._on_upstream,
                                 dns=settings.triton_dns, dns_interval=settings.dns_interval)
        self.cache_store = open_store(settings.cache, self.metrics, self._on_cache)
        self.cache = ResultCache(settings.cache, self.cache_store)
        self.answers = Answers(settings, self.upstream, self.cache, self.metrics)
        self.keys = KeyRing(settings.api_keys)
        self.tls = TLSSettings(settings.tls_cert, settings.tls_key, settings.tls_client_ca).check()
        if settings.cache_scope not in ("shared", "client"):
            raise InvalidArgument(f"cache scope must be shared or client, got {settings.cache_scope!r}")
        if settings.cache_scope == "client" and not self.keys.enabled:
            raise InvalidArgument("--cache-scope client keys the cache by the calling client: it needs --api-keys")
        self._http_ssl = None  # the HTTP face's SSL context, reloaded when the files change
        self.search = SearchService(settings, self.upstream, self.cache_store, self.metrics, self._on_catalog)
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http_server = None  # uvicorn, serving the HTTP face on this event loop
        self._http_task: asyncio.Task | None = None

    def _on_upstream(self, ready: bool) -> None:
        self.metrics.upstream_up.set(1 if ready else 0)
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            self._tasks.spawn(self.health.set(name, status), name=f"health {name or 'server'}")

    def _on_catalog(self, up: bool) -> None:
        if self._stopping:
            return
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        self._tasks.spawn(self.health.set(CATALOG, status), name="health catalog")

    def _on_cache(self, up: bool) -> None:
        if self._stopping:  # the probe may still succeed while requests drain: stay NOT_SERVING
            return
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        self._tasks.spawn(self.health.set(CACHE_HEALTH, status), name="health cache")

    async def start(self) -> "Gateway":
        s = self.settings
        return_freed_memory()
        self.health = health.aio.HealthServicer()
        http = self.metrics.serve(s.metrics_host, s.metrics_port, ready=lambda: self.upstream.ready)
        self._http = http
        self.metrics_port = http.server_port
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(CACHE_HEALTH, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(CATALOG, health_pb2.HealthCheckResponse.NOT_SERVING)  # until the catalog answers
        if isinstance(self.cache_store, GuardedStore):  # one bounded PING: NOT_SERVING at once if Redis is down
            await self.cache_store.start()
        self.server = grpc.aio.server(interceptors=[ObservingInterceptor(self.metrics, self.keys)],
                                      options=[("grpc.max_receive_message_length", 64 << 20)])
        pb_grpc.add_ProductVisionServicer_to_server(ProductVisionServicer(self.answers), self.server)
        pb_grpc.add_CatalogServicer_to_server(
            CatalogServicer(self.search, lambda context: self.answers.deadline(context.time_remaining())), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, CATALOG, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        if self.tls.enabled:
            self.port = self.server.add_secure_port(f"{s.host}:{s.port}", CertFiles(self.tls).grpc_credentials())
        else:
            self.port = self.server.add_insecure_port(f"{s.host}:{s.port}")
            if s.host not in ("127.0.0.1", "::1", "localhost"):
                log.warning("listening on %s without TLS: anyone who can reach it reads the traffic (give "
                            "--tls-cert and --tls-key; docs/security.md)", s.host)
        if s.host not in ("127.0.0.1", "::1", "localhost") and not self.keys.enabled:
            log.warning("listening on %s without --api-keys: anyone who can reach it may call it", s.host)
        if not self.port:
            raise Internal(f"cannot listen on {s.host}:{s.port}")
        await self.server.start()
        if s.http_port is not None:
            await self._start_http()
        await self.upstream.start()
        self.search.start()
        log.info("gateway listening on %s:%d (metrics :%d%s), triton %s", s.host, self.port, self.metrics_port,
                 f", HTTP :{self.http_port}" if self.http_port else "", s.triton_dns or s.triton_url)
        return self

    async def _start_http(self) -> None:
        """The OpenAI-compatible face (gateway/http_face.py), served by uvicorn on this event loop, on a
        socket bound here so that port 0 gives a free port we can report."""
        import socket

        import uvicorn

        from shelfsight.gateway.fetch import Fetcher
        from shelfsight.gateway.http_face import build_app

        s = self.settings
        fetcher = Fetcher(s.allow_image_urls, max_bytes=20 << 20)
        app = build_app(self.answers, self.search, self.metrics, fetcher, s.upstream_timeout, self.keys)
        # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose protocol says TCP.
        # With proto 0 every response on a kept-alive connection waited for the client's delayed ACK: 44 ms
        # a request instead of 0.5 ms (measured with curl and with the openai client).
        sock = socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.host, s.http_port))
        except OSError as e:
            sock.close()
            raise Internal(f"the HTTP face cannot listen on {s.host}:{s.http_port} ({e})") from None
        sock.listen(512)
        sock.setblocking(False)
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_keep_alive=30,
                                timeout_graceful_shutdown=s.shutdown_grace)
        config.load()
        if self.tls.enabled:  # our own context (uvicorn's would not reload): a second watcher of the same files
            files = CertFiles(self.tls)
            config.ssl = self._http_ssl = files.ssl_context()
            self._tasks.spawn(self._watch_certs(files), name="TLS certificate watch")
        self._http_server = uvicorn.Server(config)
        self._http_task = asyncio.create_task(self._http_server.serve(sockets=[sock]), name="http face")
        while not self._http_server.started and not self._http_task.done():
            await asyncio.sleep(0.01)
        if self._http_task.done():
            self._http_task.result()  # raises why it could not start

    async def _watch_certs(self, files: CertFiles, every: float = 2.0) -> None:
        while True:
            await asyncio.sleep(every)
            if files.changed():
                files.reload(self._http_ssl)

    def reload(self) -> None:
        """SIGHUP: the keys file now (it is also read again when it changes); certificates are read
        again by each face when their files change."""
        if self.keys.enabled:
            self.keys.reload()
            log.info("API keys reloaded")

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to `grace` seconds), then close."""
        self._stopping = True
        await self._tasks.close()  # a pending SERVING update must not land after the NOT_SERVING below
        for name in ("", SERVICE, CACHE_HEALTH, CATALOG):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._http_server is not None:  # stop accepting, let in-flight requests finish (within the grace)
            self._http_server.should_exit = True
        if self.server:
            await self.server.stop(self.settings.shutdown_grace if grace is None else grace)
        if self._http_task is not None:
            try:
                await asyncio.wait_for(self._http_task, self.settings.shutdown_grace if grace is None else grace)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - stopping regardless
                self._http_server.force_exit = True
        await self.search.close()
        await self.upstream.close()
        await self.cache.close()
        self._http.shutdown()
        self._http.server_close()
        log.info("gateway stopped")


async def serve_forever(settings: GatewaySettings, ready=None) -> None:
    """Run a gateway until SIGINT/SIGTERM. `ready(gateway)` is called once it listens."""
    gateway = await Gateway(settings).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload)
    if ready:
        ready(gateway)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests")
    await gateway.stop()
