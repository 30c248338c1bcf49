"""What the engine's users see: a request, where its output goes (Sink), the engine's settings and
the events it reports (Observer)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from shelfsight.errors import ShelfsightError
from shelfsight.params import GenerationParams

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where a request's output goes. Called from the engine thread."""

    def is_cancelled(self) -> bool: ...

    def send(self, delta: str, prompt_tokens: int, completion_tokens: int, finish_reason: str | None) -> None:
        """A text delta; finish_reason ("stop" | "length") marks the last call."""

    def fail(self, error: ShelfsightError) -> None: ...


@dataclass
class Request:
    input_ids: torch.Tensor  # [L] int64
    pixel_values: torch.Tensor  # [grid_h * grid_w, C*T*P*P] float32
    grid_thw: torch.Tensor  # [3] int64
    image_key: str
    params: GenerationParams
    sink: Sink
    arrival: float = field(default_factory=time.perf_counter)

    def image_tokens(self, merge_size: int) -> int:
        """Visual tokens after the vision tower merges merge_size x merge_size patches into one."""
        return int(self.grid_thw.prod()) // merge_size ** 2


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # rows decoded together = KV-cache slots
    max_waiting: int = 256  # queued beyond the running batch; more is refused (RESOURCE_EXHAUSTED)
    max_prefill_tokens: int = 8192  # prompt tokens admitted in one prefill (at least one request)
    # prompt + answer, and the length of every KV-cache slot: the cache holds max_batch + 1 slots of
    # this many tokens per layer, allocated once (2B shape, bf16: 112 KiB a token, 15 GB at 32 x 4096)
    max_model_len: int = 4096
    vision_cache_bytes: int = 256 << 20  # vision features kept for repeated pictures; 0 = off
    runner: str = "slots"  # slots: fixed KV slots + compact decoder | reference: transformers DynamicCache
    cuda_graphs: bool = True  # capture decode steps on CUDA (ignored on CPU)
    warm_kv_len: int = 1024  # on CUDA, capture every batch bucket up to this KV length at start
    # A stream gets at most one response per interval (the first token and the last at once): each
    # response, and each cancellation check, is a round trip through Triton's stub IPC. Per token, at
    # 32 streams, they made a step 13.8 ms through Triton against 3.7 ms in process (H100, 2B bf16);
    # measured through Triton at c=32: every token 15.1 req/s, 20 ms 28.0 req/s, 50 ms 34.7 req/s.
    # 50 ms is 20 updates a second: still a smooth stream to a person.
    stream_interval: float = 0.05


class Observer:
    """Engine events for metrics; the Triton adapter overrides what it exports. The engine calls it
    through SafeObserver: a failing metric must never stop generation."""

    def first_token(self, seconds: float) -> None: ...

    def finished(self, prompt_tokens: int, completion_tokens: int, e2e_seconds: float,
                 decode_seconds: float) -> None: ...

    def step(self, running: int, waiting: int) -> None: ...

    def vision_cache(self, hit: bool) -> None: ...


class SafeObserver:
    def __init__(self, inner: Observer):
        self._inner, self._warned = inner, False

    def __getattr__(self, name):
        method = getattr(self._inner, name)

        def call(*args):
            try:
                method(*args)
            except Exception:
                if not self._warned:
                    self._warned = True
                    log.exception("metrics observer failed (further failures not logged)")
        return call
