"""The gateway's one settings object, built from flags in `shelfsight gateway` / `shelfsight serve`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shelfsight import ports


@dataclass(frozen=True)
class CacheSettings:
    enabled: bool = True
    max_bytes: int = 256 << 20  # the in-memory store: answers, their verification thumbnails, keys; LRU beyond
    ttl_seconds: float = 24 * 3600.0
    perceptual: bool = True
    # The hash only proposes candidates (verify decides): 256-bit pHash within `max_distance` bits and
    # 4x4 colour thumbnails within `max_colour_distance` (mean difference, 0..255), nearest colour
    # first. Re-encoded and resized copies sit <= 8 bits apart, but a one-sided 1% crop of a flat
    # render moves its pHash by up to 104 of 256 bits (bench/perceptual_pairs.py), so with
    # verification the pHash bound is wide; the colour layout stays <= 2.2 for all copies.
    phash_bits: int = 256
    max_distance: int = 112
    max_colour_distance: float = 4.0
    # A candidate is served when its thumbnail (at the model's view of the picture, >= verify_side px)
    # and the picture disagree by at most
    # `max_difference` at every pixel after alignment (likeness.difference: grey levels weighed up to 3x
    # where the local contrast is low, OKLab colour, and the faint-print residual, each in grey-level
    # units). Measured by bench/perceptual_pairs.py (907 text pairs, 130 colour, faint-print, shelf and
    # phone-photo pairs, 3,456 copies): copies (JPEG q70-95, 80-100% resizes, <= 1% crops) <= 45.8,
    # changed labels >= 100 (docs/gateway.md has the rates and margins per family). verify=False is the old rule (hash only,
    # max_distance 10), which served other labels' answers: it is there to measure, not to run.
    verify: bool = True
    # px, the thumbnail's smallest long side; it is the model's view of the picture up to 1024 px
    # (likeness.check_side), and a picture the model sees at more than 1280 px is cached exactly only
    verify_side: int = 512
    max_difference: float = 47.0
    # Sampled answers (temperature > 0, no seed - the serving defaults) are cached too: a stored draw is
    # as good an answer as a new one, and a platform asks the same photo and question again and again.
    # CACHE_POLICY_REFRESH / SKIP get a fresh draw; False caches only greedy and seeded answers.
    cache_sampled: bool = True
    redis_url: str | None = None  # shared cache for several gateway replicas
    # Pixels the perceptual level decodes at once (likeness.decoded_pixels: JPEGs decode drafted, others
    # whole). 64 M: one picture at the 40 MP limit and some smaller ones, ~200 MB of RGB at the peak.
    decode_pixels: int = 64_000_000
    # The shared cache is an optimisation, so it may cost a request little: each Redis operation gets
    # `redis_timeout` seconds (retries included; loopback answers in ~0.2 ms), and once one fails the
    # gateway answers without Redis and probes it every `redis_retry` seconds (gateway/resilient.py).
    redis_timeout: float = 0.5
    redis_retry: float = 1.0


@dataclass(frozen=True)
class SearchSettings:
    """Catalog search (gateway/search.py, docs/search.md)."""
    catalog_url: str | None = None  # postgresql://... with pgvector; None: Search and Index are unavailable
    catalog_name: str = "catalog"  # several catalogs may share one Postgres
    # Queries are embedded with a retrieval instruction, catalog items with the model's default
    # ("Represent the user's input."): the asymmetric use Qwen3-VL-Embedding is trained for.
    query_instruction: str = "Find the catalog product that matches this query"
    top_k: int = 10  # hits when a request sets none
    max_top_k: int = 100
    max_rerank: int = 50  # candidates the reranker may be asked to score in one search
    candidates: int = 100  # each ranked list's length before fusion (HNSW's ef_search)
    index_batch: int = 16  # items embedded and stored together (one transaction): acknowledged together
    index_batch_bytes: int = 64 << 20  # photo bytes held by one Index stream at once
    thumbnail_side: int = 256  # px, the long side of the JPEG kept with each item
    catalog_timeout: float = 10.0  # seconds one catalog statement may take
    health_interval: float = 2.0  # seconds between checks of the catalog while it is up (0.5 while down)


@dataclass(frozen=True)
class GatewaySettings:
    triton_url: str = ports.TRITON_ADDRESS  # HOST:PORT, or several comma-separated: one per Triton replica
    triton_dns: str | None = None  # NAME:PORT re-resolved for the replicas instead (a headless Service)
    dns_interval: float = 5.0  # seconds between resolutions of triton_dns
    host: str = ports.LOCALHOST
    port: int = ports.GATEWAY
    metrics_host: str = ports.LOCALHOST
    metrics_port: int = ports.GATEWAY_METRICS
    max_in_flight: int = 64  # model calls at once; more -> RESOURCE_EXHAUSTED
    upstream_timeout: float = 300.0  # seconds a model call may take; a shorter client deadline shortens it
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    health_interval: float = 1.0  # seconds between readiness checks of a ready Triton (<= 0.25 s while not)
    http_port: int | None = None  # the OpenAI-compatible HTTP face (0: any free port; None: off)
    allow_image_urls: bool = False  # fetch http(s) image_url pictures (public addresses only, bounded)
    # who may call (docs/security.md): TLS on both faces, API keys with rights and per-client limits
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS: client certificates required and verified
    api_keys: Path | None = None  # the keys file (`shelfsight keys add`); None: no keys asked for
    # "shared": one cache for every caller (one trusted platform); "client": every entry keyed by the
    # calling client too, so a cache hit's speed tells nobody what another client asked
    cache_scope: str = "shared"
    cache: CacheSettings = field(default_factory=CacheSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
