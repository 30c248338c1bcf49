"""Next-token choice for a batch whose rows each carry their own parameters, as tensors on the device.

Same semantics and order as transformers' generate(): repetition penalty over every token the row has
seen (prompt included), then temperature, top-k, top-p; greedy rows (temperature 0) take the argmax of
the penalized logits. Nothing here syncs with the host or depends on data-dependent shapes, so the
whole choice runs inside a captured CUDA graph.

Sampling is Gumbel-max over the candidates that top-k/top-p keep: argmax(logit / T + g), g Gumbel
noise hashed from (seed, position, token id). A seeded row therefore draws the same answer whatever
else shares its batch and on whichever runner, and no torch.Generator is needed. Candidates are the
K_MAX largest logits: exact unless a row's top-k/top-p would keep more than K_MAX tokens.
Shapes: logits [B, V] float32; seen [B, V] bool; every per-row parameter [B].

Structured answers: a constrained step adds a bias [B, V] (0 where the row's grammar allows the token,
-inf elsewhere) after the repetition penalty, before temperature, top-k and top-p; x + 0.0 == x, so an
allowed token's logit, and a row whose bias is all zeros, are exactly as without it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

K_MAX = 1024
_M32 = 0xFFFFFFFF


@dataclass
class RowParams:
    """Per-row sampling parameters as tensors (one entry per batch row)."""

    temperature: torch.Tensor  # float32, 0 = greedy
    top_k: torch.Tensor  # int64, 0 = off
    top_p: torch.Tensor  # float32
    penalty: torch.Tensor  # float32, 1 = off
    seed: torch.Tensor  # int64 in [0, 2^63)

    def rows(self, n: int) -> "RowParams":
        return RowParams(*(t[:n] for t in (self.temperature, self.top_k, self.top_p, self.penalty, self.seed)))

    @classmethod
    def empty(cls, n: int, device) -> "RowParams":
        f = dict(device=device, dtype=torch.float32)
        i = dict(device=device, dtype=torch.int64)
        return cls(torch.zeros(n, **f), torch.zeros(n, **i), torch.ones(n, **f), torch.ones(n, **f),
                   torch.zeros(n, **i))

    def set_row(self, i, params, seed: int) -> None:
        """Row i <- one request's GenerationParams (host values; small device writes)."""
        self.temperature[i] = params.temperature
        self.top_k[i] = params.top_k
        self.top_p[i] = params.top_p
        self.penalty[i] = params.repetition_penalty
        self.seed[i] = seed


def seed_for(params) -> int:
    """The request's seed, or a fresh random one."""
    return params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Repetition penalty: seen tokens' logits divided by p when positive, multiplied when negative."""
    p = penalty[:, None]
    penalized = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen & (p != 1.0), penalized, logits)


def _top_p_keep(sorted_desc: torch.Tensor, top_p: torch.Tensor, tail: torch.Tensor,
                log_norm: torch.Tensor) -> torch.Tensor:
    """Which of the descending-sorted logits [B, K] survive nucleus filtering (transformers' rule:
    drop the lowest tokens whose cumulative probability stays <= 1 - top_p; keep at least one).
    Probabilities are exp(logit - log_norm [B, 1]); `tail` [B, 1] is the probability of the tokens below
    the K candidates (0 when top-k already cut there), which counts first in the ascending sum."""
    asc = (sorted_desc.flip(-1) - log_norm).exp()
    cum = tail + asc.cumsum(-1)
    drop = cum <= (1.0 - top_p)[:, None]
    drop[:, -1] = False
    return ~drop.flip(-1)


def candidates(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """The tokens top-k then top-p keep, per row of temperature-scaled logits [B, V], among the row's
    K_MAX largest. Returns (values [B, K] descending, vocabulary indices [B, K], keep [B, K] bool)."""
    K = min(K_MAX, scaled.shape[-1])
    values, indices = scaled.topk(K, dim=-1)
    cut = (top_k > 0) & (top_k <= K)  # top-k alone already bounds the row to its candidates
    ks = torch.where(cut, top_k, torch.full_like(top_k, K))
    keep = values >= values.gather(1, (ks - 1)[:, None])  # transformers keeps ties with the k-th too
    masked = values.masked_fill(~keep, float("-inf"))
    # nucleus over what top-k left: the candidates alone, or (no cut) the whole vocabulary
    log_norm = torch.where(cut, masked.logsumexp(-1), scaled.logsumexp(-1))[:, None]
    tail = torch.where(cut[:, None], torch.zeros_like(log_norm),
                       (1.0 - (masked - log_norm).exp().sum(-1, keepdim=True)).clamp(min=0.0))
    keep = keep & _top_p_keep(masked, top_p.to(scaled.dtype), tail, log_norm)
    return values, indices, keep


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2^32). Products may
    wrap past 2^63; their low 32 bits, which are all that is kept, are still right."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, position: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """U(0, 1) noise [B, K] that depends only on (seed [B], position [B], token id [B, K])."""
    h = _mix32((seed & _M32) ^ _mix32(((seed >> 32) & _M32) ^ _mix32(position & _M32)))
    h = _mix32(h[:, None] ^ token)
    # 24 bits -> (0, 1). The top value, (2^24 - 0.5) / 2^24, rounds to 1.0 in float32, whose Gumbel
    # noise is +inf: on a token already ruled out (-inf) that makes NaN, which wins the argmax
    return (((h >> 8).float() + 0.5) * (1.0 / (1 << 24))).clamp_(max=1.0 - 2.0 ** -24)


def bitmask_bias(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """xgrammar's token bitmask [B, ceil(V/32)] int32 (bit j of word w allows token 32w + j) -> bias
    [B, V] float32, 0 allowed / -inf not. Each byte looks up its 8 bits in a [256, 8] table (built on the
    device: no host copy, so it runs inside a CUDA graph); reading int32 words as bytes lowest first
    assumes a little-endian device, as CPUs and GPUs we run on are."""
    dev = bitmask.device
    bits = (torch.arange(256, device=dev)[:, None] >> torch.arange(8, device=dev)) & 1
    table = torch.zeros(256, 8, device=dev).masked_fill_(bits == 0, float("-inf"))
    B = bitmask.shape[0]
    return F.embedding(bitmask.contiguous().view(torch.uint8).int(), table).view(B, -1)[:, :vocab]


def sample(logits: torch.Tensor, seen: torch.Tensor, p: RowParams, position: torch.Tensor,
           greedy_only: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row -> [B] int64. `position` [B] is the index the new token takes in its sequence
    (it keys the noise). greedy_only skips the sampling work when the host knows every row is greedy.
    `bias` [B, V]: constrained rows' allowed tokens (bitmask_bias)."""
    logits = penalize(logits, seen, p.penalty)
    if bias is not None:
        logits.add_(bias)  # in place: penalize() returned a new tensor
    best = logits.argmax(-1)
    if greedy_only:
        return best
    scaled = logits / p.temperature.clamp(min=1e-5)[:, None]
    values, indices, keep = candidates(scaled, p.top_k, p.top_p)
    gumbel = -torch.log(-torch.log(uniform(p.seed, position, indices)))
    pick = (values.masked_fill(~keep, float("-inf")) + gumbel).argmax(-1, keepdim=True)
    sampled = indices.gather(1, pick)[:, 0]
    return torch.where(p.temperature == 0, best, sampled)
