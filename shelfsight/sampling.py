"""Next-token choice for a batch whose rows each carry their own parameters.

Same semantics and order as transformers' generate(): repetition penalty over every token the row has
seen (prompt included), then temperature, top-k, top-p; greedy rows (temperature 0) take the argmax of
the penalized logits. Each row samples with its own torch.Generator, so a seeded request gives the
same answer whatever else shares its batch.
Shapes: logits [B, V] float32; seen [B, V] bool; per-row parameters [B].
"""
from __future__ import annotations

import os

import torch

from shelfsight.params import GenerationParams


def new_generator(params: GenerationParams, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    g.manual_seed(seed)
    return g


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Repetition penalty: seen tokens' logits divided by p when positive, multiplied when negative."""
    p = penalty[:, None]
    penalized = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen & (p != 1.0), penalized, logits)


def _top_p_keep(sorted_desc: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which of the descending-sorted logits [B, K] survive nucleus filtering (transformers' rule:
    drop the lowest tokens whose cumulative probability stays <= 1 - top_p; keep at least one)."""
    asc = sorted_desc.flip(-1)
    cum = asc.softmax(-1).cumsum(-1)
    drop = cum <= (1.0 - top_p)[:, None]
    drop[:, -1] = False
    return ~drop.flip(-1)


def candidates(scaled: torch.Tensor, top_k: list[int], top_p: list[float]):
    """The tokens top-k then top-p keep, per row of temperature-scaled logits [S, V].

    Every token either filter can keep lies among the row's k largest (all V when top_k is 0), so the
    work happens on those only: the same kept set as filtering the whole vocabulary, at a fraction of
    the sort. Returns (values [S, K] descending, vocabulary indices [S, K], keep [S, K] bool).
    """
    dev, vocab = scaled.device, scaled.shape[-1]
    ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=dev)
    values, indices = scaled.topk(int(ks.max()), dim=-1)
    keep = values >= values.gather(1, (ks - 1)[:, None])  # transformers keeps ties with the k-th too
    masked = values.masked_fill(~keep, float("-inf"))
    keep &= _top_p_keep(masked, torch.tensor(top_p, device=dev, dtype=scaled.dtype))
    return values, indices, keep


def choose(logits: torch.Tensor, seen: torch.Tensor, rows: list[GenerationParams],
           generators: list[torch.Generator]) -> torch.Tensor:
    """Next token per row -> [B] int64."""
    dev = logits.device
    penalty = torch.tensor([r.repetition_penalty for r in rows], device=dev, dtype=logits.dtype)
    logits = penalize(logits, seen, penalty)
    out = logits.argmax(-1)
    sampled = [i for i, r in enumerate(rows) if not r.greedy]
    if not sampled:
        return out
    temperature = torch.tensor([rows[i].temperature for i in sampled], device=dev, dtype=logits.dtype)
    scaled = logits[torch.tensor(sampled, device=dev)] / temperature[:, None]
    values, indices, keep = candidates(scaled, [rows[i].top_k for i in sampled], [rows[i].top_p for i in sampled])
    probs = values.masked_fill(~keep, float("-inf")).softmax(-1)
    for j, i in enumerate(sampled):
        pick = torch.multinomial(probs[j], 1, generator=generators[i])
        out[i] = indices[j, pick[0]]
    return out
