"""The gateway's one settings object, built from flags in `shelfsight gateway` / `shelfsight serve`."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CacheSettings:
    enabled: bool = True
    max_bytes: int = 256 << 20  # answers kept in memory (text + keys); LRU beyond
    ttl_seconds: float = 24 * 3600.0
    perceptual: bool = True
    # 256-bit pHash: measured on product renders, re-encoded + 90%-resized copies sit at Hamming
    # distance <= 8 (p95), different products at >= 18. A 64-bit pHash put different products at 4,
    # inside the re-encode range, so it cannot be both useful and safe (see README).
    phash_bits: int = 256
    max_distance: int = 10
    # and the 4x4 colour thumbnails within this mean difference (0..255). On 300 product renders
    # (44,850 pairs), pHash alone put 3 pairs of different products within 10 bits; their colour
    # distances were >= 5.85, while re-encoded/resized/cropped copies stayed <= 2.65.
    max_colour_distance: float = 4.0
    # Sampled answers (temperature > 0, no seed - the serving defaults) are cached too: a stored draw is
    # as good an answer as a new one, and a platform asks the same photo and question again and again.
    # CACHE_POLICY_REFRESH / SKIP get a fresh draw; False caches only greedy and seeded answers.
    cache_sampled: bool = True
    redis_url: str | None = None  # shared cache for several gateway replicas


@dataclass(frozen=True)
class GatewaySettings:
    triton_url: str = "127.0.0.1:8001"
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    max_in_flight: int = 64  # model calls at once; more -> RESOURCE_EXHAUSTED
    upstream_timeout: float = 300.0  # when the client sets no deadline
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    health_interval: float = 1.0  # how often Triton's readiness is checked
    cache: CacheSettings = field(default_factory=CacheSettings)
