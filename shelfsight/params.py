"""Generation parameters: their ranges, their defaults, and one validator used at every edge
(the gateway before it calls Triton, and the ensemble's preprocess step for direct Triton clients).

Defaults are the reference study's settings for structured recognition (temperature 0.3, top_p 0.85,
max_new_tokens 256, repetition_penalty 1.1); top_k comes from the checkpoint's generation config.
temperature 0 means greedy decoding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Callable

from shelfsight.errors import InvalidArgument
from shelfsight.model import qwen

MAX_SEED = 2**63 - 1
# Chat-control tokens that would let request text forge turns or images; refused in user text.
CONTROL_TOKENS = tuple(t for t in qwen.SPECIAL_TOKENS if t != "<|endoftext|>") + ("<|endoftext|>",)


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int = 2048
    max_question_chars: int = 4000  # one text of a user or assistant turn
    max_system_chars: int = 4000
    # a conversation (several pictures and turns): each bound applies to the whole request
    max_pictures: int = 8
    max_turns: int = 32
    max_conversation_chars: int = 16_000


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.3
    top_p: float = 0.85
    top_k: int = 20
    repetition_penalty: float = 1.1
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks only (fixed-length answers); never set from a request

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def deterministic(self) -> bool:
        """Same inputs give the same answer: greedy, or sampled with a fixed seed."""
        return self.greedy or self.seed is not None

    def as_request(self) -> dict:
        """The values a request can set (FIELDS), e.g. to send these parameters on to Triton."""
        return {name: getattr(self, name) for name in FIELDS}

    def to_json(self) -> bytes:
        """The resolved request-settable values as they travel from `preprocess` to `generate` (one
        tensor); ignore_eos is not one of them."""
        return json.dumps(self.as_request(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str, limits: Limits) -> "GenerationParams":
        """to_json's inverse, checked again: `generate` can be called directly, not only through the
        ensemble. Every field must be there (seed may be null) and in range; nothing else may."""
        try:
            doc = json.loads(raw)
        except (ValueError, TypeError):
            doc = None
        if not isinstance(doc, dict):
            raise InvalidArgument("generation parameters are not a JSON object")
        unknown, missing = set(doc) - set(FIELDS), [f for f in FIELDS if f not in doc]
        if unknown:
            raise InvalidArgument(f"unknown generation parameters {sorted(unknown)}")
        if missing:
            raise InvalidArgument(f"generation parameters lack {missing}")
        return resolve(cls(), limits, **doc)


@dataclass(frozen=True)
class Rule:
    """One generation parameter a request may set: its Python type, its type in the public Triton
    contract (input named FIELD.upper()), the range it allows, and a line of help for flags."""
    cast: type
    triton_type: str
    allowed: Callable[[Any, Limits], bool]
    range: Callable[[Limits], str]
    help: str


# The one list of request-settable parameters: the gateway, the clients, the CLI, the Triton contract
# and the repository's ensemble configs all derive theirs from it. Comparisons are written so that
# NaN fails them.
RULES: dict[str, Rule] = {
    "max_new_tokens": Rule(int, "INT32", lambda v, lim: 1 <= v <= lim.max_new_tokens,
                           lambda lim: f"must be between 1 and {lim.max_new_tokens}", "tokens to generate at most"),
    "temperature": Rule(float, "FP32", lambda v, lim: 0.0 <= v <= 2.0,
                        lambda lim: "must be between 0 and 2 (0 = greedy)", "sampling temperature; 0 = greedy"),
    "top_p": Rule(float, "FP32", lambda v, lim: 0.0 < v <= 1.0, lambda lim: "must be in (0, 1]",
                  "nucleus sampling: keep the most likely tokens up to this probability mass"),
    "top_k": Rule(int, "INT32", lambda v, lim: 0 <= v <= qwen.VOCAB_SIZE,
                  lambda lim: f"must be between 0 (off) and {qwen.VOCAB_SIZE}", "keep the k most likely tokens; 0 = off"),
    "repetition_penalty": Rule(float, "FP32", lambda v, lim: 0.0 < v <= 2.0, lambda lim: "must be in (0, 2]",
                               "divide the scores of tokens already seen; 1 = off"),
    "seed": Rule(int, "INT64", lambda v, lim: 0 <= v <= MAX_SEED, lambda lim: "must be between 0 and 2^63-1",
                 "fixes a sampled answer: the same seed gives the same answer"),
}
FIELDS = tuple(RULES)


def resolve(defaults: GenerationParams, limits: Limits, **given) -> GenerationParams:
    """Fill absent (None) values from `defaults` and check every given one; an error names the field
    and its range."""
    changes = {}
    for name, value in given.items():
        if value is None:
            continue
        rule = RULES.get(name)
        if rule is None:
            raise InvalidArgument(f"unknown generation parameter {name!r}")
        try:
            v = rule.cast(value)
        except (TypeError, ValueError, OverflowError):
            raise InvalidArgument(f"{name} must be a {rule.cast.__name__}, got {value!r}") from None
        if not rule.allowed(v, limits):
            raise InvalidArgument(f"{name} {rule.range(limits)}, got {v}")
        changes[name] = v
    return replace(defaults, **changes)


MAX_STOPS, MAX_STOP_CHARS = 4, 64


def check_stop(stop) -> tuple[str, ...]:
    """Stop sequences: at most MAX_STOPS strings of 1-MAX_STOP_CHARS characters."""
    if isinstance(stop, str) or not isinstance(stop, (list, tuple)):
        raise InvalidArgument("stop must be a list of strings")
    if len(stop) > MAX_STOPS:
        raise InvalidArgument(f"stop holds {len(stop)} sequences; at most {MAX_STOPS}")
    for s in stop:
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
            raise InvalidArgument(f"each stop sequence must be 1-{MAX_STOP_CHARS} characters, got "
                                  f"{len(s) if isinstance(s, str) else type(s).__name__}")
    return tuple(stop)


def check_text(field: str, text: str, limit: int, required: bool) -> str:
    """Validate a question or system prompt; returns it unchanged."""
    if required and not text.strip():
        raise InvalidArgument(f"{field} is empty")
    if len(text) > limit:
        raise InvalidArgument(f"{field} is {len(text)} characters; the limit is {limit}")
    for token in CONTROL_TOKENS:
        if token in text:
            raise InvalidArgument(f"{field} must not contain the control token {token}")
    return text
