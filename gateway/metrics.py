"""Prometheus metrics of the gateway, on their own HTTP port.

gRPC server metrics use the go-grpc-prometheus names that existing dashboards expect; the rest carry
one app prefix, base units, `_total` on counters, and never a label per image, request or user.
"""
from __future__ import annotations

from contextlib import suppress

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # *_created series add nothing to dashboards and double the sample count

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SIZES = (1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20)


class GatewayMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        grpc_labels = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter("grpc_server_started_total", "RPCs started on the server.", grpc_labels,
                               registry=r)
        self.handled = Counter("grpc_server_handled_total", "RPCs completed on the server, by status code.",
                               grpc_labels + ("grpc_code",), registry=r)
        self.handling = Histogram("grpc_server_handling_seconds", "Time to complete an RPC on the server.",
                                  grpc_labels, buckets=LATENCY, registry=r)
        self.msg_sent = Counter("grpc_server_msg_sent_total", "Stream messages sent by the server.",
                                grpc_labels, registry=r)
        # every call on either face (gRPC, HTTP), one family: dashboards compare the faces
        self.requests = Counter("shelfsight_requests_total", "Requests handled, by face (grpc, http), method (the RPC, "
                                "or the HTTP route), status (the gRPC status name, or the HTTP status code) and "
                                "client (its name in the API keys file; empty without keys).",
                                ("face", "method", "status", "client"), registry=r)
        self.request_seconds = Histogram("shelfsight_request_duration_seconds", "Time to handle a request, by face "
                                         "and method.", ("face", "method"), buckets=LATENCY, registry=r)
        self.upstream = Histogram("shelfsight_upstream_request_duration_seconds",
                                  "Time waiting on Triton for one model call, by outcome (a status name).",
                                  ("outcome",), buckets=LATENCY, registry=r)
        self.first_chunk = Histogram("shelfsight_time_to_first_chunk_seconds",
                                     "RecognizeStream: request to first text chunk.", buckets=LATENCY, registry=r)
        self.cache_lookups = Counter("shelfsight_cache_lookups_total", "Result-cache lookups by level and result.",
                                     ("level", "result"), registry=r)
        self.cache_up = Gauge("shelfsight_cache_up", "1 when the result cache's store answers (the in-memory "
                              "one always does), 0 while a shared one (Redis) is down and requests go without it.",
                              registry=r)
        self.cache_errors = Counter("shelfsight_cache_errors_total", "Result-cache operations that failed "
                                    "(unreachable, timed out or refused); the request went on without the cache.",
                                    ("op",), registry=r)
        self.cache_skipped = Counter("shelfsight_cache_skipped_total", "Result-cache operations not attempted "
                                     "because the shared cache was down; the request went on without it.",
                                     ("op",), registry=r)
        self.coalesced = Counter("shelfsight_coalesced_requests_total",
                                 "Requests answered by an identical call already in flight.", registry=r)
        self.cache_entries = Gauge("shelfsight_cache_entries", "Answers held in the in-memory cache.", registry=r)
        self.cache_bytes = Gauge("shelfsight_cache_size_bytes", "Bytes held in the in-memory cache.", registry=r)
        self.in_flight = Gauge("shelfsight_requests_in_flight", "Recognize requests being handled.", registry=r)
        self.model_calls = Gauge("shelfsight_model_calls_in_flight", "Calls to Triton in progress.", registry=r)
        self.tokens = Counter("shelfsight_tokens_total", "Tokens in answers, by kind (prompt|completion) and "
                              "source (model|cache).", ("kind", "source"), registry=r)
        self.image_bytes = Histogram("shelfsight_image_size_bytes", "Size of the images received.",
                                     buckets=SIZES, registry=r)
        self.upstream_up = Gauge("shelfsight_upstream_up", "1 when at least one Triton replica is ready, else 0.", registry=r)
        # one series per Triton replica (label: its address; replicas are few and leave no series behind)
        self.replica_up = Gauge("shelfsight_replica_up", "1 when this Triton replica is ready and serves the "
                                "pool's model, else 0.", ("replica",), registry=r)
        self.replica_mismatch = Gauge("shelfsight_replica_model_mismatch", "1 when this replica is ready but "
                                      "serves another model id than the pool (it is not used).", ("replica",),
                                      registry=r)
        self.replica_calls = Gauge("shelfsight_replica_calls_in_flight", "Model calls in progress on this "
                                   "replica.", ("replica",), registry=r)
        self.replica_seconds = Histogram("shelfsight_replica_request_duration_seconds",
                                         "One model call on one replica, by outcome (a status name; errors are "
                                         "the outcomes other than OK).", ("replica", "outcome"),
                                         buckets=LATENCY, registry=r)
        self.replica_retries = Counter("shelfsight_replica_retries_total", "Model calls retried on another "
                                       "replica after theirs was UNAVAILABLE before any text.", registry=r)
        self.search_seconds = Histogram("shelfsight_search_stage_seconds", "Catalog search and indexing: time in "
                                        "each stage (embed, catalog, rerank).", ("stage",), buckets=LATENCY,
                                        registry=r)
        self.index_items = Counter("shelfsight_index_items_total", "Catalog items received by Index, by result "
                                   "(indexed, unchanged, failed).", ("result",), registry=r)
        self.catalog_up = Gauge("shelfsight_catalog_up", "1 when the catalog (PostgreSQL) answers and an embedding "
                                "model is served, else 0.", registry=r)
        self.catalog_items = Gauge("shelfsight_catalog_items", "Items in the catalog, as last counted.", registry=r)
        for stage in ("embed", "catalog", "rerank"):
            self.search_seconds.labels(stage)
        for result in ("indexed", "unchanged", "failed"):
            self.index_items.labels(result)
        for level in ("exact", "perceptual"):
            for result in ("hit", "miss"):
                self.cache_lookups.labels(level, result)  # present from the start, at zero
        for op in ("get", "thumbnail", "candidates", "put"):
            self.cache_errors.labels(op)
            self.cache_skipped.labels(op)

    def forget_replica(self, replica: str) -> None:
        """Drop a retired replica's series."""
        for gauge in (self.replica_up, self.replica_mismatch, self.replica_calls):
            with suppress(KeyError):
                gauge.remove(replica)
        for family in self.replica_seconds.collect():
            for outcome in {s.labels["outcome"] for s in family.samples if s.labels.get("replica") == replica}:
                with suppress(KeyError):
                    self.replica_seconds.remove(replica, outcome)

    def serve(self, host: str, port: int, ready=lambda: True):
        """Start the plaintext HTTP endpoint beside the API: /metrics, and /ready (200 while `ready()`,
        else 503) - what Kubernetes probes when the API itself speaks TLS, which kubelet's gRPC probe
        cannot. Returns the server (its port when `port` is 0)."""
        import threading
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from prometheus_client import make_wsgi_app
        from prometheus_client.exposition import ThreadingWSGIServer

        metrics = make_wsgi_app(self.registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/ready":
                ok = ready()
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"ready\n" if ok else b"not ready\n"]
            return metrics(environ, start_response)

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args):
                pass

        server = make_server(host, port, app, ThreadingWSGIServer, handler_class=Quiet)
        threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
        return server
