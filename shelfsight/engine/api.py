"""What the engine's users see: a prompt, a request to answer it, where its output goes (Sink) and the
events it reports (Observer). Its settings are in config.py."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from shelfsight.errors import ShelfsightError
from shelfsight.formats import ResponseFormat
from shelfsight.params import GenerationParams

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where a request's output goes. Called from the engine thread."""

    def is_cancelled(self) -> bool: ...

    def send(self, delta: str, prompt_tokens: int, completion_tokens: int, finish_reason: str | None) -> None:
        """A text delta; finish_reason marks the last call: "stop" (a stop token; with a response
        format, the answer is complete and matches it) or "length" (max_new_tokens reached; a
        constrained answer is then a prefix of a matching one, e.g. JSON cut off mid-object)."""

    def fail(self, error: ShelfsightError) -> None: ...


@dataclass
class Prompt:
    """A model's input: the prompt's tokens and the pictures it holds."""
    input_ids: torch.Tensor  # [L] int64, each picture's visual tokens as a run of <|image_pad|>
    pixels: torch.Tensor  # [N] uint8: every picture's resized H x W x 3, in order (0 bytes: text only);
    # the engine cuts and normalizes the patches on its device (model/preprocessing.py Patchifier.patches)
    grid_thw: torch.Tensor  # [n, 3] int64: (1, grid_h, grid_w) per picture
    image_keys: tuple[str, ...]  # per picture; equal keys mean equal patches (the vision cache's key)

    @staticmethod
    def tensors(inputs) -> tuple:
        """Preprocessing's ModelInputs (numpy) as this class's first four fields, copied into tensors."""
        return (torch.tensor(inputs.input_ids, dtype=torch.int64), torch.tensor(inputs.pixels, dtype=torch.uint8),
                torch.tensor(inputs.image_grid_thw, dtype=torch.int64).reshape(-1, 3), tuple(inputs.image_keys))

    @classmethod
    def of(cls, inputs) -> "Prompt":
        return cls(*cls.tensors(inputs))

    def picture_tokens(self, merge_size: int) -> list[int]:
        """Visual tokens per picture after the vision tower merges merge_size x merge_size patches."""
        return [int(t) // merge_size ** 2 for t in self.grid_thw.reshape(-1, 3).prod(-1).tolist()]

    def image_tokens(self, merge_size: int) -> int:
        return sum(self.picture_tokens(merge_size))


@dataclass
class Request(Prompt):
    """A prompt to answer: how, and where the answer goes."""
    params: GenerationParams = None
    sink: Sink = None
    arrival: float = field(default_factory=time.perf_counter)
    response_format: ResponseFormat | None = None  # the answer's required shape (shelfsight.formats)
    grammar: object | None = field(default=None, repr=False)  # its compiled form: set by Engine.submit
    stop: tuple[str, ...] = ()  # the answer ends before the first of these (output.py)

    @classmethod
    def of(cls, inputs, params: GenerationParams, sink: Sink, response_format: ResponseFormat | None = None,
           stop: tuple[str, ...] = ()) -> "Request":
        return cls(*cls.tensors(inputs), params, sink, response_format=response_format, stop=tuple(stop))


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

    @property
    def inner(self) -> Observer:
        """The observer given to the engine (what it exports; a test may listen on it)."""
        return self._inner

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
