"""Decode steps as CUDA graphs, one per (batch bucket, KV-length bucket, variant).

The step reads and writes only static buffers (the runner's), so a graph is just `fn(B, L, variant)`
recorded once and replayed. Variants: True / False, a whole step (greedy-only or not); "forward" and
"masked", the two halves of a step with constrained rows (the grammar masks are a static input buffer
written between them; "masked" keys use L = 0). Buckets: B in 1, 2, 4, 8, 16, 24, 32, then every 16
up to the slot count; L in powers of two from 128 up to the slot length. Everything here but `_capture`
runs on CPU too (with graphs disabled the step simply runs eagerly), so the bucket logic is tested
without a GPU.
Graphs share one memory pool: they only keep scratch there, never run concurrently, and read their
inputs and leave their outputs in buffers allocated outside the pool.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

import torch

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8, 16, 24, 32) if b < max_batch]
    return small + [b for b in range(48, max_batch, 16)] + [max_batch]


def kv_buckets(max_len: int, smallest: int = 128) -> list[int]:
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return out + [max_len]


def pick(buckets: list[int], n: int) -> int:
    """The smallest bucket that holds n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class StepGraphs:
    """fn(B, L, greedy) through graphs on CUDA (captured on first use or by warm_up), eagerly elsewhere.

    `harmless` is a context manager under which one run of fn changes nothing that matters (the runner
    points every row at the spare slot): capturing needs one eager warm-up run first."""

    def __init__(self, fn: Callable[[int, int, bool | str], None], enabled: bool,
                 harmless: Callable[[int], contextlib.AbstractContextManager]):
        self.fn, self.enabled, self.harmless = fn, enabled, harmless
        self.graphs: dict[tuple[int, int, bool | str], object] = {}
        self.pool = None
        self.capture_seconds = 0.0

    def run(self, B: int, L: int, variant: bool | str) -> None:
        if not self.enabled:
            self.fn(B, L, variant)
            return
        key = (B, L, variant)
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = self._capture(key)
            except Exception:  # serve eagerly (slower, same answers) rather than not at all
                log.exception("CUDA graph capture failed for B=%d L=%d variant=%s; decoding eagerly from now on", *key)
                self.enabled, self.graphs = False, {}
                torch.cuda.synchronize()
                self.fn(B, L, variant)
                return
        graph.replay()

    def warm_up(self, keys: list[tuple[int, int, bool | str]]) -> None:
        """Capture these keys now, largest first (later, smaller graphs reuse the pool's blocks)."""
        for key in sorted(keys, key=lambda k: k[:2], reverse=True):
            if not self.enabled:
                return
            if key not in self.graphs:
                try:
                    self._capture(key)
                except Exception:
                    log.exception("CUDA graph capture failed for B=%d L=%d variant=%s; decoding eagerly", *key)
                    self.enabled, self.graphs = False, {}
                    torch.cuda.synchronize()

    def _capture(self, key: tuple[int, int, bool | str]):
        t0 = time.perf_counter()
        with self.harmless(key[0]):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.fn(*key)  # warm-up: lazy initialisations happen outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.fn(*key)
            if self.pool is None:
                self.pool = graph.pool()
        self.graphs[key] = graph
        self.capture_seconds += time.perf_counter() - t0
        log.info("captured decode graph B=%d L=%d variant=%s in %.0f ms", *key, 1000 * (time.perf_counter() - t0))
        return graph
