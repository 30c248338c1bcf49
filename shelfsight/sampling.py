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
    idx = torch.tensor(sampled, device=dev)
    sub = logits[idx] / torch.tensor([rows[i].temperature for i in sampled], device=dev)[:, None]
    vocab = sub.shape[-1]
    # Every candidate that top-k or top-p can keep lies among the k largest, so work on those only:
    # the same kept set as filtering the whole vocabulary, at a fraction of the sort.
    ks = [rows[i].top_k if rows[i].top_k > 0 else vocab for i in sampled]
    kmax = max(ks)
    values, indices = sub.topk(kmax, dim=-1)  # [S, kmax], descending
    keep = torch.arange(kmax, device=dev)[None, :] < torch.tensor(ks, device=dev)[:, None]
    # transformers' top-k keeps ties with the k-th value too
    kth = values.gather(1, (torch.tensor(ks, device=dev) - 1)[:, None])
    keep |= values >= kth
    top_p = torch.tensor([rows[i].top_p for i in sampled], device=dev, dtype=sub.dtype)
    masked = values.masked_fill(~keep, float("-inf"))
    keep &= _top_p_keep(masked, top_p)
    probs = masked.masked_fill(~keep, float("-inf")).softmax(-1)
    for j, i in enumerate(sampled):
        pick = torch.multinomial(probs[j], 1, generator=generators[i])
        out[i] = indices[j, pick[0]]
    return out
