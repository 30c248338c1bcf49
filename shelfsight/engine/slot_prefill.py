"""Prefill for the slot runner: admitted prompts are prefilled on the compact decoder's own weights
(decoder.py `extend`), their K/V written straight into their slots, in chunks that interleave with
decode steps.

Why chunks: a long prefill between two decode steps stalls every running stream for its whole length.
While streams are decoding, each engine iteration runs at most `budget` prompt tokens
(EngineConfig.prefill_chunk_tokens), oldest request first, then one decode step; a prompt longer than
what is left of the budget continues in the next iteration from where it stopped (its earlier tokens
are already in its slot). With nothing decoding, every queued prompt goes at once. A request joins the
decoding batch, with its first token, in the iteration that prefills its last prompt token.

At admission (`add`) each prompt gets, once: its input embeddings with its pictures' features in place
[n, hidden], its M-RoPE rotations [n, D] (transformers' own rope index and rotary embedding), and its
pictures' deepstack features with their positions. A chunk then only slices these.
"""
from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shelfsight.engine.batch import Row
from shelfsight.engine.prefill import Feature
from shelfsight.model import qwen

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """One admitted prompt on its way into its slot."""
    row: Row
    embeds: torch.Tensor  # [n, hidden] input embeddings, pictures' features in place
    cos: torch.Tensor  # [n, D] M-RoPE rotation of each position
    sin: torch.Tensor  # [n, D]
    visual: list[int]  # positions of picture tokens, ascending (host copy, for slicing)
    visual_at: torch.Tensor  # [v] the same positions on the device
    deep: list[torch.Tensor]  # per deepstack layer, [v, hidden]
    done: int = 0  # prompt tokens already in the slot

    @property
    def n(self) -> int:
        return self.embeds.shape[0]


@dataclass
class Chunk:
    """What one prefill iteration did."""
    finished: list[Row] = field(default_factory=list)  # prompts complete: their logits follow, in order
    logits: torch.Tensor | None = None  # [len(finished), V] float32 at each prompt's last token
    cancelled: list[Row] = field(default_factory=list)
    failed: list[Row] = field(default_factory=list)
    error: Exception | None = None
    tokens: int = 0  # prompt tokens prefilled


class PrefillQueue:
    """Admitted requests whose prompts are being prefilled, oldest first. Engine thread only."""

    def __init__(self, model, decoder, budget: int):
        self.model, self.decoder = model, decoder
        self.budget = budget  # prompt tokens per iteration; 0 = whole prompts, however long
        self._queue: deque[Pending] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def rows(self) -> list[Row]:
        return [p.row for p in self._queue]

    def clear(self) -> list[Row]:
        rows = self.rows()
        self._queue.clear()
        return rows

    def add(self, rows: list[Row], feats: list[list[Feature]]) -> None:
        """Queue freshly admitted rows (their pictures' features from prefill.vision); sets each row's
        M-RoPE delta."""
        for row, f in zip(rows, feats):
            self._queue.append(self._prepare(row, f))

    def _prepare(self, row: Row, feats: list[Feature]) -> Pending:
        model, dec = self.model, self.decoder
        ids = row.req.input_ids.to(dec.device)[None]  # [1, n]
        mm = (ids == qwen.IMAGE_PAD_ID).long()
        grid = row.req.grid_thw.reshape(-1, 3).to(dec.device) if feats else None
        position, delta = model.model.get_rope_index(ids, mm, image_grid_thw=grid, attention_mask=torch.ones_like(ids))
        embeds = F.embedding(ids[0], dec.embed)  # [n, hidden]
        visual = torch.nonzero(mm[0]).flatten()
        deep = []
        if feats:
            embeds[visual] = torch.cat([f[0] for f in feats]).to(embeds.dtype)
            deep = [torch.cat([f[1][layer] for f in feats]) for layer in range(len(feats[0][1]))]
        cos, sin = model.model.language_model.rotary_emb(embeds[None], position)  # [1, n, D] each
        row.delta = int(delta.view(-1)[0])
        return Pending(row, embeds, cos[0], sin[0], visual.tolist(), visual, deep)

    def step(self, decoding: bool = True) -> Chunk:
        """Prefill up to `budget` prompt tokens, oldest request first; with no stream decoding
        (`decoding` False) there is nothing to stall: every queued prompt at once."""
        out = Chunk()
        parts: list[tuple[Pending, int, int]] = []  # (prompt, first token, end)
        left = (self.budget if decoding else 0) or float("inf")
        for p in list(self._queue):
            if left <= 0:
                break
            if p.row.req.sink.is_cancelled():
                self._queue.remove(p)
                out.cancelled.append(p.row)
                continue
            end = int(min(p.n, p.done + left))
            parts.append((p, p.done, end))
            left -= end - p.done
        if not parts:
            return out
        try:
            hidden = self._run(parts)
        except Exception as e:  # these requests fail; their slots' contents are overwritten on reuse
            log.exception("prefill failed")
            for p, _, _ in parts:
                self._queue.remove(p)
                out.failed.append(p.row)
            out.error = e
            return out
        last = []
        offset = 0
        for p, a, b in parts:
            p.done = b
            offset += b - a
            if b == p.n:
                self._queue.remove(p)
                p.row.length = p.n
                out.finished.append(p.row)
                last.append(offset - 1)
            out.tokens += b - a
        if last:
            at = torch.tensor(last, device=hidden.device)
            out.logits = self.decoder.lm_head(hidden.index_select(0, at)).float()
        return out

    def _run(self, parts: list[tuple[Pending, int, int]]) -> torch.Tensor:
        """One packed `extend` over the parts -> final hidden states [T, hidden]."""
        x = torch.cat([p.embeds[a:b] for p, a, b in parts])
        cos = torch.cat([p.cos[a:b] for p, a, b in parts])
        sin = torch.cat([p.sin[a:b] for p, a, b in parts])
        segments = [(p.row.slot, a, b - a) for p, a, b in parts]
        layers = max((len(p.deep) for p, _, _ in parts), default=0)
        deep = []
        for layer in range(layers):
            index, values, offset = [], [], 0
            for p, a, b in parts:
                lo, hi = bisect.bisect_left(p.visual, a), bisect.bisect_left(p.visual, b)
                if hi > lo and layer < len(p.deep):
                    index.append(p.visual_at[lo:hi] - a + offset)
                    values.append(p.deep[layer][lo:hi])
                offset += b - a
            if index:
                deep.append((torch.cat(index), torch.cat(values)))
            else:
                empty = torch.zeros(0, dtype=torch.int64, device=x.device)
                deep.append((empty, x.new_zeros(0, x.shape[1])))
        return self.decoder.extend(x, cos, sin, segments, deep)
