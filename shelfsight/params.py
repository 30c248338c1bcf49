"""Generation parameters: their ranges, their defaults, and one validator used at every edge
(the gateway before it calls Triton, and the ensemble's preprocess step for direct Triton clients).

Defaults are the reference study's settings for structured recognition (temperature 0.3, top_p 0.85,
max_new_tokens 256, repetition_penalty 1.1); top_k comes from the checkpoint's generation config.
temperature 0 means greedy decoding.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

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

    def to_dict(self) -> dict:
        return asdict(self)


def resolve(defaults: GenerationParams, limits: Limits, *, max_new_tokens=None, temperature=None,
            top_p=None, top_k=None, repetition_penalty=None, seed=None) -> GenerationParams:
    """Fill absent values from `defaults` and check every value; errors name the field and its range."""
    p = defaults
    if max_new_tokens is not None:
        v = int(max_new_tokens)
        if not 1 <= v <= limits.max_new_tokens:
            raise InvalidArgument(f"max_new_tokens must be between 1 and {limits.max_new_tokens}, got {v}")
        p = replace(p, max_new_tokens=v)
    if temperature is not None:
        v = float(temperature)
        if not 0.0 <= v <= 2.0:  # NaN fails too
            raise InvalidArgument(f"temperature must be between 0 and 2 (0 = greedy), got {v}")
        p = replace(p, temperature=v)
    if top_p is not None:
        v = float(top_p)
        if not 0.0 < v <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1], got {v}")
        p = replace(p, top_p=v)
    if top_k is not None:
        v = int(top_k)
        if not 0 <= v <= qwen.VOCAB_SIZE:
            raise InvalidArgument(f"top_k must be between 0 (off) and {qwen.VOCAB_SIZE}, got {v}")
        p = replace(p, top_k=v)
    if repetition_penalty is not None:
        v = float(repetition_penalty)
        if not 0.0 < v <= 2.0:
            raise InvalidArgument(f"repetition_penalty must be in (0, 2], got {v}")
        p = replace(p, repetition_penalty=v)
    if seed is not None:
        v = int(seed)
        if not 0 <= v <= MAX_SEED:
            raise InvalidArgument(f"seed must be between 0 and 2^63-1, got {v}")
        p = replace(p, seed=v)
    return p


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
