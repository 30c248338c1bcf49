"""A Locust user for the ProductVision gRPC API.

Locust's workers are gevent greenlets, so the *sync* gRPC stub is made gevent-friendly
(grpc.experimental.gevent.init_gevent) and a client interceptor reports every call to Locust:
request_type "grpc", name = the method, response time in ms, response length = output tokens. A
streaming call also reports its time to first chunk as a separate "grpc-ttft" event.
"""
from __future__ import annotations

import time

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User
from locust.exception import LocustError

from shelfsight.protos import pb, pb_grpc

grpc_gevent.init_gevent()

CACHE_STATUS = {v: k for k, v in pb.CacheStatus.items()}


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, environment):
        self.env = environment

    def _fire(self, kind, name, t0, length=0, exception=None, **context):
        self.env.events.request.fire(request_type=kind, name=name, response_time=(time.perf_counter() - t0) * 1000,
                                     response_length=length, exception=exception, context=context)

    def intercept_unary_unary(self, continuation, details, request):
        name = details.method.rsplit("/", 1)[-1]
        t0 = time.perf_counter()
        call = continuation(details, request)
        try:
            reply = call.result()
        except grpc.RpcError as e:
            self._fire("grpc", name, t0, exception=e)
            return call
        self._fire("grpc", name, t0, reply.usage.completion_tokens, cache=CACHE_STATUS.get(reply.cache_status))
        return call

    def intercept_unary_stream(self, continuation, details, request):
        name = details.method.rsplit("/", 1)[-1]
        t0 = time.perf_counter()
        call = continuation(details, request)

        def chunks():
            first = True
            try:
                for chunk in call:
                    if first and chunk.text:
                        self._fire("grpc-ttft", name, t0)
                        first = False
                    if chunk.final:
                        self._fire("grpc", name, t0, chunk.usage.completion_tokens,
                                   cache=CACHE_STATUS.get(chunk.cache_status))
                    yield chunk
            except grpc.RpcError as e:
                self._fire("grpc", name, t0, exception=e)
        return chunks()


class GrpcUser(User):
    """Holds a ProductVision stub on a channel to `host` (HOST:PORT, optionally grpc:// in front)."""

    abstract = True
    stub_class = pb_grpc.ProductVisionStub

    def __init__(self, environment):
        super().__init__(environment)
        if not self.host:
            raise LocustError("give the gateway as --host HOST:PORT")
        target = self.host.removeprefix("grpc://")
        channel = grpc.intercept_channel(grpc.insecure_channel(target), LocustInterceptor(environment))
        self.stub = self.stub_class(channel)
