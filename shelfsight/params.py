"""Generation parameters: their ranges, their defaults, and one validator used at every edge
(the gateway before it calls Triton, and the ensemble's preprocess step for direct Triton clients).

Defaults are the reference study's settings for structured recognition (temperature 0.3, top_p 0.85,
max_new_tokens 256, repetition_penalty 1.1); top_k comes from the checkpoint's generation config.
temperature 0 means greedy decoding.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from shelfsight import qwen
from shelfsight.errors import InvalidArgument

MAX_SEED = 2**63 - 1
# Chat-control tokens that would let request text forge turns or images; refused in user text.
CONTROL_TOKENS = tuple(t for t in qwen.SPECIAL_TOKENS if t != "<|endoftext|>") + ("<|endoftext|>",)


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int = 2048
    max_question_chars: int = 4000
    max_system_chars: int = 4000


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


# field -> (cast, is the value allowed, what the message says the range is)
_RULES = {
    "max_new_tokens": (int, lambda v, lim: 1 <= v <= lim.max_new_tokens,
                       lambda lim: f"must be between 1 and {lim.max_new_tokens}"),
    "temperature": (float, lambda v, lim: 0.0 <= v <= 2.0, lambda lim: "must be between 0 and 2 (0 = greedy)"),
    "top_p": (float, lambda v, lim: 0.0 < v <= 1.0, lambda lim: "must be in (0, 1]"),
    "top_k": (int, lambda v, lim: 0 <= v <= qwen.VOCAB_SIZE, lambda lim: f"must be between 0 (off) and {qwen.VOCAB_SIZE}"),
    "repetition_penalty": (float, lambda v, lim: 0.0 < v <= 2.0, lambda lim: "must be in (0, 2]"),
    "seed": (int, lambda v, lim: 0 <= v <= MAX_SEED, lambda lim: "must be between 0 and 2^63-1"),
}


def resolve(defaults: GenerationParams, limits: Limits, **given) -> GenerationParams:
    """Fill absent (None) values from `defaults` and check every given one; an error names the field
    and its range. Comparisons are written so that NaN fails them."""
    changes = {}
    for name, value in given.items():
        if value is None:
            continue
        if name not in _RULES:
            raise InvalidArgument(f"unknown generation parameter {name!r}")
        cast, allowed, limit = _RULES[name]
        v = cast(value)
        if not allowed(v, limits):
            raise InvalidArgument(f"{name} {limit(limits)}, got {v}")
        changes[name] = v
    return replace(defaults, **changes)


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
